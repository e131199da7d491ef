"""The promises of :mod:`dispoold.backend`, written once, for every backend.

:class:`BackendContract` holds the tests; a test module subclasses it and provides an
``env`` fixture giving a :class:`BackendEnv`: an open backend on some host, a guest that
has booted, and the means to act behind the backend's back and to look at the host
without it. ``tests/test_backend_contract.py`` runs the contract against the test double
(:class:`tests.doubles.FakeBackend`), ``tests/xen/test_backend_contract.py`` against
``XenBackend`` on real Xen in the lab: the engine's tests trust the double only as far as
both pass the same tests.

The tests run in the order written and share the booted guest (booting one costs tens
of seconds under the lab's emulation); each leaves it running and unpaused.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, Literal

import pytest

from dispoold.backend import (
    Backend,
    BackendError,
    DomainEvent,
    DomainEventKind,
    Marker,
    NoSuchDomain,
    NotPaused,
    NotReady,
)
from dispoold.config import TemplateSettings

State = Literal["running", "paused", "shutdown"]
DIED, UNPAUSED = DomainEventKind.DIED, DomainEventKind.UNPAUSED


class EventRecorder:
    """The single consumer of a backend's ``events()``, keeping what it saw."""

    def __init__(self, backend: Backend) -> None:
        self.events: list[DomainEvent] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._run(backend))

    async def _run(self, backend: Backend) -> None:
        async for event in backend.events():
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    def count(self, kind: DomainEventKind, name: str) -> int:
        return sum(1 for e in self.events if e.kind is kind and e.name == name)

    async def wait_for(
        self, kind: DomainEventKind, name: str, timeout: float, after: int = 0
    ) -> None:
        """Until more than ``after`` such events were seen; raises TimeoutError."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.count(kind, name) > after)

    @property
    def ended(self) -> bool:
        return self._task.done()

    async def ends_within(self, timeout: float) -> bool:
        """True once the event stream has ended, False if it still runs after ``timeout``."""
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        return bool(done)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class BackendEnv(abc.ABC):
    """A backend under test and the host it runs on."""

    #: Open, and told its owner (``list_owned``), as the engine does first thing.
    backend: Backend
    owner: str
    #: The only consumer of ``backend.events()``.
    events: EventRecorder
    #: A guest of ours that has booted (created from :meth:`template`, marker
    #: :meth:`marker` of :attr:`shared_dispid`), left running and unpaused by every test.
    shared: str
    shared_dispid: int
    #: Seconds a guest may take to boot; a readiness timeout for a guest that never
    #: reports; how long the backend may take to notice something (a death, an unpause
    #: behind its back, memory freed after a destroy).
    boot_timeout: float
    short_timeout: float
    notice_timeout: float
    #: MiB the hypervisor spends on a domain beyond its memory (free-memory accounting).
    overhead_mib: int

    def marker(self, dispid: int) -> Marker:
        return Marker(self.owner, "contract-dvm", dispid)

    @abc.abstractmethod
    def template(self, **changes: Any) -> TemplateSettings:
        """A template whose guest boots and reports readiness."""

    @abc.abstractmethod
    def never_ready_template(self) -> TemplateSettings:
        """A guest that runs but never reports readiness."""

    @abc.abstractmethod
    def dying_template(self) -> TemplateSettings:
        """A guest that crashes while booting (a broken init or ramdisk)."""

    @abc.abstractmethod
    def failing_templates(self) -> dict[str, TemplateSettings]:
        """Templates that cannot be created, by what is wrong with them."""

    @abc.abstractmethod
    def new_dispid(self) -> int:
        """A dispid whose name (``disp<dispid>``) no domain has."""

    # -- the host, seen without the backend -------------------------------------------

    @abc.abstractmethod
    def names(self) -> set[str]:
        """Every domain on the host but dom0."""

    @abc.abstractmethod
    def state(self, name: str) -> State | None:
        """The domain's state as the host's own tools show it, or None if it is gone."""

    # -- what happens behind the backend's back ---------------------------------------

    @abc.abstractmethod
    async def unpause_behind(self, name: str) -> None:
        """Someone else unpauses the domain."""

    @abc.abstractmethod
    async def destroy_behind(self, name: str) -> None:
        """Someone else destroys the domain."""

    @abc.abstractmethod
    async def make_unmarked(self, name: str) -> None:
        """A paused domain made with the host's own tools: it carries no marker."""

    @abc.abstractmethod
    def other_owner(self) -> AbstractAsyncContextManager[tuple[Backend, str]]:
        """Another daemon's open backend on this host, and its owner. Its domains are
        destroyed when it ends."""

    @abc.abstractmethod
    def another_process(self) -> AbstractAsyncContextManager[Backend]:
        """A new backend instance on this host, open, told nothing (a restarted daemon)."""

    @abc.abstractmethod
    def unopened(self) -> Backend:
        """A backend instance never opened."""


def name_of(dispid: int) -> str:
    return f"disp{dispid}"


async def yields(operation: Awaitable[Any]) -> bool:
    """True if ``operation`` gave the event loop a turn before it finished: a callback
    scheduled just before it ran by then. An operation that never yields runs to the end
    without other tasks getting a look in, which no real hypervisor call does."""
    ran = False

    def mark() -> None:
        nonlocal ran
        ran = True

    asyncio.get_running_loop().call_soon(mark)
    await operation
    return ran


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(min(0.2, timeout / 10))
    return True


async def steady_free_memory(env: BackendEnv) -> int:
    """The hypervisor's free memory once it stops moving (balloons on their way, or a
    domain's memory being scrubbed after its destroy, move it for a while)."""
    pause = env.notice_timeout / 30
    last = await env.backend.free_memory_mib()
    for _ in range(30):
        await asyncio.sleep(pause)
        now = await env.backend.free_memory_mib()
        if abs(now - last) <= 1:
            return now
        last = now
    raise AssertionError(f"free memory still moving after {env.notice_timeout:g} s")


class BackendContract:
    """The tests; a subclass provides the ``env`` fixture (see the module docstring)."""

    # -- creating ----------------------------------------------------------------------

    async def test_create_gives_a_running_domain_carrying_its_marker(self, env: BackendEnv) -> None:
        info = await env.backend.domain_info(env.shared)
        template = env.template()
        assert info is not None
        assert info.name == env.shared
        assert (info.paused, info.shutdown) == (False, False)
        assert info.marker == env.marker(env.shared_dispid)
        assert info.memory_mib == template.memory
        assert info.maxmem_mib == template.max_memory
        assert env.state(env.shared) == "running"
        owned = {i.name: i for i in await env.backend.list_owned(env.owner)}
        assert owned[env.shared].marker == env.marker(env.shared_dispid)
        assert owned[env.shared].domid == info.domid

    async def test_a_name_in_use_is_refused_and_its_domain_left_as_it_was(
        self, env: BackendEnv
    ) -> None:
        before = await env.backend.domain_info(env.shared)
        with pytest.raises(BackendError) as caught:
            await env.backend.create(env.shared, env.template(), env.marker(env.new_dispid()))
        assert (caught.value.operation, caught.value.domain) == ("create", env.shared)
        after = await env.backend.domain_info(env.shared)
        assert after is not None and before is not None and after.domid == before.domid
        assert env.state(env.shared) == "running"

    async def test_a_creation_that_fails_leaves_nothing_behind(self, env: BackendEnv) -> None:
        for what, template in env.failing_templates().items():
            dispid = env.new_dispid()
            name = name_of(dispid)
            before = env.names()
            with pytest.raises(BackendError) as caught:
                await env.backend.create(name, template, env.marker(dispid))
            assert (caught.value.operation, caught.value.domain) == ("create", name), what
            assert env.names() == before, f"{what}: left {env.names() - before}"
            assert await env.backend.domain_info(name) is None, what
            assert name not in {i.name for i in await env.backend.list_owned(env.owner)}, what

    # -- booting -----------------------------------------------------------------------

    async def test_wait_ready_returns_at_once_for_a_guest_that_has_booted(
        self, env: BackendEnv
    ) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        await env.backend.wait_ready(env.shared, env.short_timeout)
        assert loop.time() - start < env.short_timeout

    async def test_a_guest_that_never_reports_is_not_ready_after_the_timeout(
        self, env: BackendEnv
    ) -> None:
        dispid = env.new_dispid()
        name = name_of(dispid)
        await env.backend.create(name, env.never_ready_template(), env.marker(dispid))
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            with pytest.raises(NotReady) as caught:
                await env.backend.wait_ready(name, env.short_timeout)
            elapsed = loop.time() - start
            assert caught.value.domain == name
            assert env.short_timeout * 0.95 <= elapsed <= env.short_timeout * 1.5 + 1, elapsed
            assert env.state(name) == "running"  # not ready is not dead
        finally:
            await env.backend.destroy(name)
        assert env.state(name) is None

    async def test_a_guest_that_dies_while_booting_is_not_ready_and_reported_dead_once(
        self, env: BackendEnv
    ) -> None:
        dispid = env.new_dispid()
        name = name_of(dispid)
        await env.backend.create(name, env.dying_template(), env.marker(dispid))
        loop = asyncio.get_running_loop()
        start = loop.time()
        # A second process that knows the domain but does not listen yet: it hears of the
        # death, once, when it does.
        async with env.another_process() as restarted:
            await restarted.list_owned(env.owner)
            try:
                with pytest.raises(NotReady, match="died"):
                    await env.backend.wait_ready(name, env.boot_timeout)
                # Learnt from the death, not from the timeout.
                assert loop.time() - start < env.boot_timeout * 0.9
                await env.events.wait_for(DIED, name, env.notice_timeout)
                # A Xen domain that crashed lingers until destroyed, and says it is dead.
                info = await env.backend.domain_info(name)
                assert info is not None and info.shutdown
                owned = {i.name: i for i in await env.backend.list_owned(env.owner)}
                assert owned[name].shutdown
                assert env.state(name) == "shutdown"
                late = EventRecorder(restarted)
                try:
                    await late.wait_for(DIED, name, env.notice_timeout)
                    await asyncio.sleep(env.notice_timeout / 10)
                    assert late.count(DIED, name) == 1
                finally:
                    await late.stop()
            finally:
                await env.backend.destroy(name)
        assert env.state(name) is None
        await asyncio.sleep(env.notice_timeout / 10)
        assert env.events.count(DIED, name) == 1

    # -- a domain that does not exist --------------------------------------------------

    async def test_a_missing_domain_raises_no_such_domain_and_destroying_it_is_fine(
        self, env: BackendEnv
    ) -> None:
        name = name_of(env.new_dispid())
        operations: dict[str, Callable[[], Awaitable[None]]] = {
            "pause": lambda: env.backend.pause(name),
            "unpause": lambda: env.backend.unpause(name),
            "memory": lambda: _drop(env.backend.memory(name)),
            "set_memory_target": lambda: env.backend.set_memory_target(name, 100),
        }
        for operation, call in operations.items():
            with pytest.raises(NoSuchDomain) as caught:
                await call()
            assert (caught.value.operation, caught.value.domain) == (operation, name)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(NotReady):
            await env.backend.wait_ready(name, env.boot_timeout)
        assert loop.time() - start < env.short_timeout  # at once, not after the timeout
        assert await env.backend.domain_info(name) is None
        await env.backend.destroy(name)

    # -- pause and unpause -------------------------------------------------------------

    async def test_pause_and_unpause(self, env: BackendEnv) -> None:
        await env.backend.pause(env.shared)
        info = await env.backend.domain_info(env.shared)
        assert info is not None and info.paused
        assert env.state(env.shared) == "paused"
        await env.backend.unpause(env.shared)
        info = await env.backend.domain_info(env.shared)
        assert info is not None and not info.paused
        assert env.state(env.shared) == "running"

    async def test_unpausing_a_running_domain_raises_not_paused(self, env: BackendEnv) -> None:
        with pytest.raises(NotPaused) as caught:
            await env.backend.unpause(env.shared)
        assert (caught.value.operation, caught.value.domain) == ("unpause", env.shared)
        assert env.state(env.shared) == "running"

    async def test_pausing_twice_needs_one_unpause(self, env: BackendEnv) -> None:
        await env.backend.pause(env.shared)
        await env.backend.pause(env.shared)
        await env.backend.unpause(env.shared)
        assert env.state(env.shared) == "running"

    async def test_a_foreign_unpause_is_reported_once_and_our_unpause_then_refuses(
        self, env: BackendEnv
    ) -> None:
        seen = env.events.count(UNPAUSED, env.shared)
        await env.backend.pause(env.shared)
        await env.unpause_behind(env.shared)
        await env.events.wait_for(UNPAUSED, env.shared, env.notice_timeout, after=seen)
        with pytest.raises(NotPaused):
            await env.backend.unpause(env.shared)
        await asyncio.sleep(env.notice_timeout / 10)
        assert env.events.count(UNPAUSED, env.shared) == seen + 1

    async def test_a_foreign_unpause_not_yet_noticed_is_caught_by_unpause(
        self, env: BackendEnv
    ) -> None:
        await env.backend.pause(env.shared)
        await env.unpause_behind(env.shared)
        with pytest.raises(NotPaused):  # at once: the check and the unpause are one step
            await env.backend.unpause(env.shared)

    async def test_our_own_unpause_is_not_reported(self, env: BackendEnv) -> None:
        await asyncio.sleep(env.notice_timeout / 10)  # echoes of the tests before
        seen = env.events.count(UNPAUSED, env.shared)
        await env.backend.pause(env.shared)
        await env.backend.unpause(env.shared)
        await asyncio.sleep(env.notice_timeout / 10)
        assert env.events.count(UNPAUSED, env.shared) == seen

    # -- memory ------------------------------------------------------------------------

    async def test_memory_figures_and_the_balloon_target_capped_at_maxmem(
        self, env: BackendEnv
    ) -> None:
        template = env.template()
        memory = await env.backend.memory(env.shared)
        assert memory.maxmem_mib == template.max_memory
        assert memory.target_mib == template.memory
        assert 0 < memory.actual_mib <= template.max_memory
        assert memory.used_mib is None or 0 < memory.used_mib <= template.max_memory
        try:
            await env.backend.set_memory_target(env.shared, template.memory + 32)
            assert (await env.backend.memory(env.shared)).target_mib == template.memory + 32
            await env.backend.set_memory_target(env.shared, template.max_memory * 16)
            assert (await env.backend.memory(env.shared)).target_mib == template.max_memory
        finally:
            await env.backend.set_memory_target(env.shared, template.memory)

        async def back() -> bool:
            return abs((await env.backend.memory(env.shared)).actual_mib - template.memory) <= 2

        # The guest's balloon follows in its own time; the next test counts free memory.
        assert await eventually(back, env.notice_timeout)

    async def test_free_memory_drops_by_a_domains_memory_and_comes_back(
        self, env: BackendEnv
    ) -> None:
        template = env.never_ready_template()
        before = await steady_free_memory(env)
        dispid = env.new_dispid()
        name = name_of(dispid)
        await env.backend.create(name, template, env.marker(dispid))
        try:
            taken = before - await steady_free_memory(env)
            assert template.memory <= taken <= template.memory + env.overhead_mib, taken
        finally:
            await env.backend.destroy(name)

        async def back() -> bool:
            return await env.backend.free_memory_mib() >= before - env.overhead_mib

        assert await eventually(back, env.notice_timeout)

    # -- destroying --------------------------------------------------------------------

    async def test_destroy_is_idempotent_and_our_own_destroy_is_not_a_death(
        self, env: BackendEnv
    ) -> None:
        dispid = env.new_dispid()
        name = name_of(dispid)
        await env.backend.create(name, env.never_ready_template(), env.marker(dispid))
        await env.backend.destroy(name)
        await env.backend.destroy(name)
        assert env.state(name) is None and name not in env.names()
        assert await env.backend.domain_info(name) is None
        await asyncio.sleep(env.notice_timeout / 10)
        assert env.events.count(DIED, name) == 0

    async def test_a_domain_destroyed_behind_our_back_is_a_death_and_then_no_such_domain(
        self, env: BackendEnv
    ) -> None:
        dispid = env.new_dispid()
        name = name_of(dispid)
        await env.backend.create(name, env.never_ready_template(), env.marker(dispid))
        await env.destroy_behind(name)
        await env.events.wait_for(DIED, name, env.notice_timeout)
        for call in (env.backend.pause, env.backend.unpause, env.backend.memory):
            with pytest.raises(NoSuchDomain):
                await call(name)
        with pytest.raises(NotReady):
            await env.backend.wait_ready(name, env.short_timeout)
        assert await env.backend.domain_info(name) is None
        await env.backend.destroy(name)  # gone already: fine
        await asyncio.sleep(env.notice_timeout / 10)
        assert env.events.count(DIED, name) == 1

    # -- domains that are not ours -----------------------------------------------------

    async def test_a_domain_without_our_marker_is_left_alone(self, env: BackendEnv) -> None:
        name = name_of(env.new_dispid())
        await env.make_unmarked(name)
        try:
            info = await env.backend.domain_info(name)
            assert info is not None and info.marker is None
            assert name not in {i.name for i in await env.backend.list_owned(env.owner)}
            for operation in (env.backend.pause, env.backend.unpause, env.backend.memory):
                with pytest.raises(NoSuchDomain, match="no marker of this daemon"):
                    await operation(name)
            with pytest.raises(NoSuchDomain):
                await env.backend.set_memory_target(name, 64)
            await env.backend.destroy(name)  # not ours: left alone, and not an error
            assert env.state(name) == "paused"
        finally:
            await env.destroy_behind(name)

    async def test_another_daemons_domain_is_left_alone(self, env: BackendEnv) -> None:
        dispid = env.new_dispid()
        name = name_of(dispid)
        async with env.other_owner() as (other, owner):
            await other.create(name, env.never_ready_template(), Marker(owner, "x", dispid))
            await other.pause(name)
            assert name not in {i.name for i in await env.backend.list_owned(env.owner)}
            with pytest.raises(NoSuchDomain, match="no marker of this daemon"):
                await env.backend.unpause(name)
            await env.backend.destroy(name)
            assert env.state(name) == "paused"
            info = await env.backend.domain_info(name)
            assert info is not None and info.marker == Marker(owner, "x", dispid)
        assert env.state(name) is None

    # -- another process on the same host (a daemon restarted) -------------------------

    async def test_a_new_process_finds_our_paused_domain_and_takes_it_over(
        self, env: BackendEnv
    ) -> None:
        await env.backend.pause(env.shared)
        try:
            async with env.another_process() as restarted:
                recorder = EventRecorder(restarted)
                try:
                    owned = await restarted.list_owned(env.owner)
                    assert [i.name for i in owned] == [env.shared]
                    assert owned[0].marker == env.marker(env.shared_dispid) and owned[0].paused
                    assert await restarted.list_owned(env.owner + "-else") == []
                    # Found paused: from now on an unpause by someone else is news to it,
                    # which is how the engine learns that a re-adopted preload is tainted.
                    await env.unpause_behind(env.shared)
                    await recorder.wait_for(UNPAUSED, env.shared, env.notice_timeout)
                    await restarted.pause(env.shared)
                    await restarted.unpause(env.shared)
                    assert env.state(env.shared) == "running"
                finally:
                    await recorder.stop()
        finally:
            if env.state(env.shared) == "paused":
                await env.unpause_behind(env.shared)

    async def test_a_new_process_hears_of_a_death_from_before_it_listened_once(
        self, env: BackendEnv
    ) -> None:
        dispid = env.new_dispid()
        name = name_of(dispid)
        await env.backend.create(name, env.never_ready_template(), env.marker(dispid))
        async with env.another_process() as restarted:
            await restarted.list_owned(env.owner)
            await env.destroy_behind(name)
            await env.events.wait_for(DIED, name, env.notice_timeout)
            await asyncio.sleep(env.notice_timeout / 10)  # nobody listens to it yet
            recorder = EventRecorder(restarted)
            try:
                await recorder.wait_for(DIED, name, env.notice_timeout)
                await asyncio.sleep(env.notice_timeout / 10)
                assert recorder.count(DIED, name) == 1
            finally:
                await recorder.stop()

    async def test_the_event_stream_ends_when_the_backend_closes(self, env: BackendEnv) -> None:
        async with env.another_process() as restarted:
            recorder = EventRecorder(restarted)
            await asyncio.sleep(0.1)
            assert not recorder.ended
            await restarted.close()
            assert await recorder.ends_within(env.notice_timeout)
            await recorder.stop()

    # -- manners -----------------------------------------------------------------------

    async def test_every_operation_yields_to_the_event_loop(self, env: BackendEnv) -> None:
        backend, shared = env.backend, env.shared
        dispid = env.new_dispid()
        name = name_of(dispid)
        assert await yields(backend.create(name, env.never_ready_template(), env.marker(dispid)))
        assert await yields(backend.destroy(name))
        assert await yields(backend.destroy(name))  # even with nothing to do
        checks: dict[str, Callable[[], Awaitable[Any]]] = {
            "domain_info": lambda: backend.domain_info(shared),
            "domain_info of a missing domain": lambda: backend.domain_info(name),
            "list_owned": lambda: backend.list_owned(env.owner),
            "free_memory_mib": backend.free_memory_mib,
            "memory": lambda: backend.memory(shared),
            "set_memory_target": lambda: backend.set_memory_target(shared, env.template().memory),
            "wait_ready": lambda: backend.wait_ready(shared, env.short_timeout),
            "pause": lambda: backend.pause(shared),
            "unpause": lambda: backend.unpause(shared),
        }
        for what, operation in checks.items():
            assert await yields(operation()), what

    async def test_nothing_works_before_open_and_nothing_but_backend_errors_escape(
        self, env: BackendEnv
    ) -> None:
        backend = env.unopened()
        for call in (
            lambda: backend.list_owned(env.owner),
            lambda: backend.domain_info(env.shared),
            backend.free_memory_mib,
        ):
            with pytest.raises(BackendError):
                await call()
        with pytest.raises(BackendError):
            await anext(aiter(backend.events()))


async def _drop(awaitable: Awaitable[Any]) -> None:
    await awaitable
