"""Test doubles for the pool engine's two collaborators: a hypervisor and a memory manager.

They behave like what they stand for, so that the engine's tests meet the races and
crashes a real host has:

- Every operation yields to the event loop at least once, and each can be told to take
  time (``Steps.delays``). Their timings come from ``asyncio.sleep``, so virtual-time
  tests (``tests/virtual_time.py``) run instantly.
- A creation happens in steps, as libxl builds a domain: ``create`` (the toolstack's
  checks; nothing exists yet), ``create.build`` (the domain exists, paused, with its
  marker; this is the step that takes ``create_delay``), ``create.start`` (the unpause),
  ``create.return`` (the domain runs; the answer is on its way back to the caller). A
  daemon killed between two of them leaves what a killed daemon leaves on Xen.
- A failure can be injected at every step (:meth:`Steps.fail`); a test can stop an
  operation at a step and hold it there (:meth:`Steps.hold`), or watch every step
  (:attr:`Steps.observers`), e.g. to kill the daemon inside an operation.

The contract suite (``tests/contracts/backend.py``, run by
``tests/test_backend_contract.py`` here and by ``tests/xen/test_backend_contract.py``
against Xen in the lab) holds :class:`FakeBackend` to the promises of
:mod:`dispoold.backend`, the same ones ``XenBackend`` is held to.

Both load as out-of-tree plug-ins (``[backend] name = "tests.doubles:FakeBackend"``,
``[memory] manager = "tests.doubles:FakeMemory"``), which is how the daemon tests run a
real daemon process without Xen. They never ship: they live under ``tests/``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from dispoold.backend import (
    NO_PROVISION,
    BackendError,
    DomainEvent,
    DomainEventKind,
    DomainInfo,
    Marker,
    MemoryInfo,
    NoSuchDomain,
    NotPaused,
    NotReady,
    Provision,
)
from dispoold.config import MemorySettings, TemplateSettings
from dispoold.memory import MemoryManagerError, NoMemory, ShrinkResult

#: Every step a double yields at. Those of :class:`FakeMemory` start with ``memory.``.
BACKEND_STEPS = (
    "create",
    "create.build",
    "create.start",
    "create.return",
    "create.cleanup",
    "wait_ready",
    "pause",
    "unpause",
    "set_memory_target",
    "memory",
    "destroy",
    "domain_info",
    "list_owned",
    "free_memory",
)
MEMORY_STEPS = ("memory.available", "memory.allocation", "memory.shrink", "memory.give_back")
#: A half-built domain is always cleaned up (libxl's own destroy does not fail that way).
#: Once the domain runs, its creation has succeeded: ``create.return`` can be held or
#: killed at, never fail.
_UNFAILING = frozenset({"create.cleanup", "create.return", "memory.give_back"})
#: The longest a fake guest's boot is left unlooked-at (seconds): wait_ready polls.
POLL = 0.5


# -- steps: where the doubles yield, and what a test can make happen there ----------------


@dataclass(eq=False)
class Fault:
    """A failure waiting at a step (see :meth:`Steps.fail`)."""

    step: str
    #: Only for this domain, or this template's domains (None: any).
    name: str | None
    template: str | None
    #: How many more times it fires; None: every time.
    times: int | None
    error: BaseException | None
    hits: int = 0

    def matches(self, step: str, name: str | None, template: str | None) -> bool:
        return (
            self.step == step
            and (self.name is None or self.name == name)
            and (self.template is None or self.template == template)
            and (self.times is None or self.times > 0)
        )


@dataclass(eq=False)
class Hold:
    """An operation parked at a step until :meth:`release` (see :meth:`Steps.hold`)."""

    step: str
    name: str | None
    _reached: asyncio.Future[str] | None = None
    _gate: asyncio.Future[None] | None = None

    @property
    def reached(self) -> asyncio.Future[str]:
        """Done, with the domain's name, once an operation is parked here."""
        if self._reached is None:
            self._reached = asyncio.get_running_loop().create_future()
        return self._reached

    def release(self) -> None:
        if self._gate is not None and not self._gate.done():
            self._gate.set_result(None)

    async def park(self, name: str | None) -> None:
        self._gate = asyncio.get_running_loop().create_future()
        if not self.reached.done():
            self.reached.set_result(name or "")
        await self._gate


class Steps:
    """The points where the doubles yield to the event loop, and what happens there.

    A test sets ``delays[step]`` (seconds), injects failures (:meth:`fail`), parks an
    operation (:meth:`hold`), adds ``observers`` (called with the step and domain name
    just before the double yields: the place to stop the world), or sets ``jitter`` to
    a seeded :class:`random.Random` that adds a few extra yields here and there, so that
    concurrent operations interleave in other orders.
    """

    def __init__(self, delays: dict[str, float] | None = None) -> None:
        self.delays: dict[str, float] = dict(delays or {})
        self.faults: list[Fault] = []
        self.holds: list[Hold] = []
        self.observers: list[Callable[[str, str | None], None]] = []
        self.jitter: random.Random | None = None
        #: Steps reached so far, all doubles together.
        self.count = 0

    def fail(
        self,
        step: str,
        *,
        name: str | None = None,
        template: str | None = None,
        times: int | None = 1,
        error: BaseException | None = None,
    ) -> Fault:
        """Make ``step`` fail (the next time, ``times`` times, or always with None) for
        ``name`` or ``template`` (a creation's) or any domain. Without ``error``, the step
        raises what the real thing raises there: :class:`~dispoold.backend.NotReady` for
        ``wait_ready``, :class:`~dispoold.backend.BackendError` for the other backend
        steps, :class:`~dispoold.memory.MemoryManagerError` for the memory ones."""
        if step not in BACKEND_STEPS + MEMORY_STEPS or step in _UNFAILING:
            raise ValueError(f"no step {step!r} can fail")
        fault = Fault(step, name, template, times, error)
        self.faults.append(fault)
        return fault

    def hold(self, step: str, *, name: str | None = None) -> Hold:
        """Park the next operation that reaches ``step`` (for ``name``, or any) there,
        until the hold is released: a test can then kill the daemon in the middle of it."""
        if step not in BACKEND_STEPS + MEMORY_STEPS:
            raise ValueError(f"no step {step!r}")
        hold = Hold(step, name)
        self.holds.append(hold)
        return hold

    def clear(self) -> None:
        """No more injected failures or holds (the ones parked stay parked)."""
        self.faults.clear()
        self.holds.clear()

    async def reach(
        self, step: str, name: str | None, default: float = 0.0, template: str | None = None
    ) -> None:
        """Called by the doubles at each step: yield (for the step's delay), then raise
        the injected failure, if any."""
        self.count += 1
        for observer in list(self.observers):
            observer(step, name)
        for hold in self.holds:
            if hold.step == step and (hold.name is None or hold.name == name):
                self.holds.remove(hold)
                await hold.park(name)
                break
        await asyncio.sleep(self.delays.get(step, default))
        if self.jitter is not None:
            for _ in range(self.jitter.choice((0, 0, 0, 1, 2))):
                await asyncio.sleep(0)
        for fault in self.faults:
            if fault.matches(step, name, template):
                fault.hits += 1
                if fault.times is not None:
                    fault.times -= 1
                raise fault.error if fault.error is not None else _injected(step, name)


def _injected(step: str, name: str | None) -> Exception:
    message = "injected failure"
    if step.startswith("memory."):
        return MemoryManagerError(f"{step.removeprefix('memory.')} {name or ''}: {message}")
    operation = step.partition(".")[0]
    if step == "wait_ready":
        return NotReady(operation, name, message)
    return BackendError(operation, name, message)


# -- the hypervisor ------------------------------------------------------------------------


class FakeBackendOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host_mib: int = 16_384
    #: Seconds a build takes (the ``create.build`` step: the domain exists, paused).
    create_delay: float = 0.0
    #: Seconds from the start of a guest to its readiness (or its crash, see die_booting).
    ready_delay: float = 0.0
    #: Seconds every other step takes, unless ``delays`` names it.
    op_delay: float = 0.0
    delays: dict[str, float] = {}
    #: Templates whose domains fail to be created (before the domain exists).
    fail_create: set[str] = set()
    #: Templates whose guests never become ready / crash while booting (a broken init).
    never_ready: set[str] = set()
    die_booting: set[str] = set()
    #: What a guest reports using, as a fraction of its memory.
    used_fraction: float = 0.25


class FakeTemplateOptions(BaseModel):
    """What a template's ``options`` table may tell the fake, as ``xen`` reads its own
    there (a template the fake cannot read fails to be created, as on Xen)."""

    model_config = ConfigDict(extra="forbid")

    #: Where creating it fails: before the domain exists (``create``), while libxl
    #: builds it (``build``), or at the unpause (``start``).
    fail_at: Literal["create", "build", "start"] | None = None
    #: How its guest boots: becomes ready, never does, or crashes on the way.
    boot: Literal["ready", "never", "die"] = "ready"


@dataclass
class FakeDomain:
    name: str
    domid: int
    template: str
    memory_mib: int
    maxmem_mib: int
    #: None: made behind the daemon's back without one (``xl create``).
    marker: Marker | None
    created_at: float
    #: Loop time at which the guest reports readiness / crashes; None: it never does.
    ready_at: float | None
    dies_at: float | None = None
    paused: bool = False
    #: A backend paused it and has not unpaused it since (see Backend.pause).
    paused_by_backend: bool = False
    shutdown: bool = False
    target_mib: int = 0
    used_mib: int = 0
    #: The disks and identity it was created with.
    provision: Provision = NO_PROVISION


@dataclass
class Call:
    operation: str
    name: str | None
    at: float


@dataclass
class _Counters:
    created: int = 0
    destroyed: int = 0
    calls: list[Call] = field(default_factory=list)


@dataclass(eq=False)
class FakeHost:
    """What outlives a daemon process: the domains, the host's memory, and how the guests
    and the toolstack behave. Every :class:`FakeBackend` on one host shares it."""

    options: FakeBackendOptions
    steps: Steps
    domains: dict[str, FakeDomain] = field(default_factory=dict)
    counters: _Counters = field(default_factory=_Counters)
    next_domid: int = 1
    #: Per-name overrides set by tests: seconds until ready (None: never).
    ready_delays: dict[str, float | None] = field(default_factory=dict)
    #: Called with the domain's name just before the domain takes its memory; may raise.
    on_create: Callable[[str], None] | None = None
    backends: list[FakeBackend] = field(default_factory=list)

    def free_mib(self) -> int:
        return self.options.host_mib - sum(d.memory_mib for d in self.domains.values())

    def advance_guests(self) -> None:
        """Guests whose time to crash has come crash (they do whether anyone looks)."""
        for domain in list(self.domains.values()):
            if domain.dies_at is not None and not domain.shutdown:
                try:
                    now = asyncio.get_running_loop().time()
                except RuntimeError:
                    return
                if now >= domain.dies_at:
                    self.crash(domain)

    def crash(self, domain: FakeDomain) -> None:
        if not domain.shutdown:
            domain.shutdown = True
            self.emit(DomainEventKind.DIED, domain)

    def emit(self, kind: DomainEventKind, domain: FakeDomain, *, skip: object = None) -> None:
        for backend in self.backends:
            if backend is not skip:
                backend.notice(kind, domain)


class FakeBackend:
    """An in-memory hypervisor. Domain state survives a daemon "restart" as long as the
    same instance (or one made with :meth:`on_same_host`) is handed to the new engine."""

    def __init__(
        self, options: dict[str, Any] | None = None, *, host: FakeHost | None = None
    ) -> None:
        if host is None:
            parsed = FakeBackendOptions.model_validate(options or {})
            host = FakeHost(parsed, Steps(parsed.delays))
        self.host = host
        host.backends.append(self)
        self._events: asyncio.Queue[DomainEvent | None] | None = None
        self._opened = False
        #: What this process knows (reset at open: a new process knows nothing yet).
        self._owners: set[str] = set()
        self._known: set[int] = set()
        self._reported: set[int] = set()

    def on_same_host(self) -> FakeBackend:
        """Another backend instance on this host, as a restarted daemon would make."""
        return FakeBackend(host=self.host)

    # The host's state, under the names the tests have always used.

    @property
    def options(self) -> FakeBackendOptions:
        return self.host.options

    @property
    def steps(self) -> Steps:
        return self.host.steps

    @property
    def domains(self) -> dict[str, FakeDomain]:
        return self.host.domains

    @property
    def counters(self) -> _Counters:
        return self.host.counters

    @property
    def ready_delays(self) -> dict[str, float | None]:
        return self.host.ready_delays

    @property
    def on_create(self) -> Callable[[str], None] | None:
        return self.host.on_create

    @on_create.setter
    def on_create(self, hook: Callable[[str], None] | None) -> None:
        self.host.on_create = hook

    # -- test hooks: what happens behind the daemon's back ---------------------------

    def external_unpause(self, name: str) -> None:
        """Someone else (a qrexec call, an administrator) unpauses the domain."""
        domain = self.domains[name]
        domain.paused = False
        if domain.paused_by_backend:
            domain.paused_by_backend = False
            self.host.emit(DomainEventKind.UNPAUSED, domain)

    def kill(self, name: str) -> None:
        """The domain crashes or shuts down (it lingers until destroyed, like on Xen)."""
        self.host.crash(self.domains[name])

    def vanish(self, name: str) -> None:
        """The domain disappears entirely (destroyed by someone else)."""
        domain = self.domains.pop(name, None)
        if domain is not None:
            self.host.emit(DomainEventKind.DIED, domain)

    def add_foreign(self, name: str, *, marker: Marker | None = None, memory: int = 128) -> None:
        """A domain made without this backend (``xl create -p``): unmarked, or carrying
        ``marker`` (another daemon's)."""
        domain = self._new_domain(name, "", memory, memory, marker)
        domain.paused = True
        self.domains[name] = domain

    def used_mib(self) -> int:
        return sum(d.memory_mib for d in self.domains.values())

    def free_mib(self) -> int:
        return self.host.free_mib()

    # -- Backend ------------------------------------------------------------------

    async def open(self) -> None:
        self._opened = True
        self._events = asyncio.Queue()
        self._owners, self._known, self._reported = set(), set(), set()
        await asyncio.sleep(0)

    async def close(self) -> None:
        self._opened = False
        if self._events is not None:
            self._events.put_nowait(None)
        await asyncio.sleep(0)

    async def create(
        self,
        name: str,
        template: TemplateSettings,
        marker: Marker,
        provision: Provision = NO_PROVISION,
    ) -> int:
        self._record("create", name)
        self._need_open("create", name)
        steps, kind = self.steps, marker.template
        await steps.reach("create", name, self.options.op_delay, kind)
        try:
            behaviour = FakeTemplateOptions.model_validate(template.options)
        except ValidationError as exc:
            raise BackendError("create", name, f"template options: {exc}") from None
        if name in self.domains:
            raise BackendError("create", name, "a domain of that name already exists")
        if kind in self.options.fail_create or behaviour.fail_at == "create":
            raise BackendError("create", name, "kernel not found (injected failure)")
        if self.free_mib() < template.memory:
            raise BackendError("create", name, "not enough free memory")
        if self.on_create is not None:
            self.on_create(name)
        # Like libxl: the domain exists, paused and marked, from the first moment.
        domain = self._new_domain(name, kind, template.memory, template.max_memory, marker)
        domain.paused = True
        domain.provision = provision
        self.domains[name] = domain
        self._known.add(domain.domid)
        self._owners.add(marker.owner)
        self.counters.created += 1
        try:
            await steps.reach("create.build", name, self.options.create_delay, kind)
            self._still_there(domain)
            if behaviour.fail_at == "build":
                raise BackendError("create", name, "libxl failed part-way (injected failure)")
            await steps.reach("create.start", name, self.options.op_delay, kind)
            self._still_there(domain)
            if behaviour.fail_at == "start":
                raise BackendError("create", name, "unpause failed (injected failure)")
        except BackendError:
            # Nothing is left behind: the half-built domain goes before the error does.
            await steps.reach("create.cleanup", name, self.options.op_delay, kind)
            self._remove(domain)
            raise
        self._boot(domain, behaviour)
        await steps.reach("create.return", name, 0.0, kind)
        return domain.domid

    async def wait_ready(self, name: str, timeout: float) -> None:
        self._record("wait_ready", name)
        self._need_open("wait_ready", name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            await self.steps.reach("wait_ready", name, 0.0)
            self.host.advance_guests()
            domain = self.domains.get(name)
            if domain is None or not self._ours(domain):
                raise NotReady("wait_ready", name, "the domain is gone")
            if domain.shutdown:
                raise NotReady("wait_ready", name, "the domain died while booting")
            now = loop.time()
            if domain.ready_at is not None and now >= domain.ready_at:
                return
            if now >= deadline:
                raise NotReady("wait_ready", name, f"not ready after {timeout:g} s")
            due = [t for t in (domain.ready_at, domain.dies_at) if t is not None]
            wake = min([deadline, *due])
            await asyncio.sleep(max(0.0, min(wake - now, POLL)))

    async def pause(self, name: str) -> None:
        domain = await self._op("pause", name)
        domain.paused = True
        domain.paused_by_backend = True

    async def unpause(self, name: str) -> None:
        domain = await self._op("unpause", name)
        if not domain.paused:
            domain.paused_by_backend = False
            raise NotPaused("unpause", name, "the domain is already running")
        domain.paused = False
        domain.paused_by_backend = False

    async def set_memory_target(self, name: str, mib: int) -> None:
        domain = await self._op("set_memory_target", name)
        domain.target_mib = max(0, min(mib, domain.maxmem_mib))
        # The balloon follows at once: the engine's tests are not about ballooning
        # (tests/memory_doubles.py has slow balloons).
        domain.memory_mib = domain.target_mib

    async def memory(self, name: str) -> MemoryInfo:
        domain = await self._op("memory", name)
        return MemoryInfo(
            actual_mib=domain.memory_mib,
            target_mib=domain.target_mib,
            maxmem_mib=domain.maxmem_mib,
            used_mib=domain.used_mib,
        )

    async def destroy(self, name: str) -> None:
        self._record("destroy", name)
        self._need_open("destroy", name)
        await self.steps.reach("destroy", name, self.options.op_delay)
        domain = self.domains.get(name)
        if domain is None or not self._ours(domain):
            return  # gone already, or not ours: left alone
        self._remove(domain)

    async def domain_info(self, name: str) -> DomainInfo | None:
        self._record("domain_info", name)
        self._need_open("domain_info", name)
        await self.steps.reach("domain_info", name, self.options.op_delay)
        self.host.advance_guests()
        domain = self.domains.get(name)
        return None if domain is None else self._info(domain)

    async def list_owned(self, owner: str) -> list[DomainInfo]:
        self._record("list_owned", None)
        self._need_open("list_owned", None)
        await self.steps.reach("list_owned", None, self.options.op_delay)
        self.host.advance_guests()
        self._owners.add(owner)
        owned = [d for d in self.domains.values() if d.marker and d.marker.owner == owner]
        for domain in owned:
            self._known.add(domain.domid)
            # Found paused at start-up: from now on, an unpause by someone else is news.
            domain.paused_by_backend = domain.paused
        # Guests that were to crash meanwhile do so, whoever was watching.
        for domain in owned:
            if domain.dies_at is not None and not domain.shutdown:
                asyncio.get_running_loop().call_at(domain.dies_at, self.host.advance_guests)
        return [self._info(d) for d in owned]

    async def free_memory_mib(self) -> int:
        self._need_open("free_memory", None)
        await self.steps.reach("free_memory", None, self.options.op_delay)
        return self.free_mib()

    async def events(self) -> AsyncIterator[DomainEvent]:
        if self._events is None or not self._opened:
            raise BackendError("events", None, "backend not open")
        queue = self._events
        # Deaths that happened before anyone listened are reported first (and once).
        for domain in list(self.domains.values()):
            if domain.shutdown:
                self.notice(DomainEventKind.DIED, domain)
        while (event := await queue.get()) is not None:
            yield event

    # -- helpers ------------------------------------------------------------------

    def notice(self, kind: DomainEventKind, domain: FakeDomain) -> None:
        """The host tells this process what happened to a domain; it reports deaths and
        foreign unpauses of the domains it created or found, each once."""
        if domain.domid not in self._known or self._events is None or not self._opened:
            return
        if kind is DomainEventKind.DIED:
            if domain.domid in self._reported:
                return
            self._reported.add(domain.domid)
        self._events.put_nowait(DomainEvent(kind, domain.name))

    def _new_domain(
        self, name: str, template: str, memory: int, maxmem: int, marker: Marker | None
    ) -> FakeDomain:
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            now = 0.0
        domain = FakeDomain(
            name=name,
            domid=self.host.next_domid,
            template=template,
            memory_mib=memory,
            maxmem_mib=maxmem,
            marker=marker,
            created_at=now,
            ready_at=None,
            target_mib=memory,
            used_mib=max(1, int(memory * self.options.used_fraction)),
        )
        self.host.next_domid += 1
        return domain

    def _boot(self, domain: FakeDomain, behaviour: FakeTemplateOptions) -> None:
        """The unpause: the guest starts running, and its boot takes its course."""
        domain.paused = False
        loop = asyncio.get_running_loop()
        now = loop.time()
        delay = self.ready_delays.get(domain.name, self.options.ready_delay)
        if behaviour.boot == "die" or domain.template in self.options.die_booting:
            domain.dies_at = now + self.options.ready_delay
            loop.call_at(domain.dies_at, self.host.advance_guests)
        elif behaviour.boot == "never" or domain.template in self.options.never_ready:
            domain.ready_at = None
        elif delay is not None:
            domain.ready_at = now + delay

    def _remove(self, domain: FakeDomain) -> None:
        if self.domains.get(domain.name) is domain:
            del self.domains[domain.name]
            self.counters.destroyed += 1
            # Not a death to this process (it destroyed it); news to any other.
            self._known.discard(domain.domid)
            self.host.emit(DomainEventKind.DIED, domain, skip=self)

    def _still_there(self, domain: FakeDomain) -> None:
        if self.domains.get(domain.name) is not domain:
            raise BackendError("create", domain.name, "the domain vanished while being built")

    def _ours(self, domain: FakeDomain) -> bool:
        # As on Xen: a domain is ours only if it carries the marker of an owner this
        # process named (create, list_owned), whatever its name.
        return domain.marker is not None and domain.marker.owner in self._owners

    def _need_open(self, operation: str, name: str | None) -> None:
        if not self._opened:
            raise BackendError(operation, name, "backend not open")

    def _record(self, operation: str, name: str | None) -> None:
        self.counters.calls.append(Call(operation, name, time.monotonic()))

    async def _op(self, operation: str, name: str) -> FakeDomain:
        self._record(operation, name)
        self._need_open(operation, name)
        await self.steps.reach(operation, name, self.options.op_delay)
        self.host.advance_guests()
        domain = self.domains.get(name)
        if domain is None:
            raise NoSuchDomain(operation, name, "no such domain")
        if not self._ours(domain):
            raise NoSuchDomain(
                operation, name, "the domain of that name carries no marker of this daemon"
            )
        return domain

    @staticmethod
    def _info(domain: FakeDomain) -> DomainInfo:
        return DomainInfo(
            name=domain.name,
            domid=domain.domid,
            paused=domain.paused,
            shutdown=domain.shutdown,
            memory_mib=domain.memory_mib,
            maxmem_mib=domain.maxmem_mib,
            marker=domain.marker,
        )


# -- the memory manager ----------------------------------------------------------------------


class FakeMemory:
    """A memory manager over :class:`FakeBackend`, working as the balancer does but with
    simple rules: available memory is the fake host's free memory; allocations are one at
    a time; a shrink sets the target to ``used * factor`` (at least the floor); a
    handed-out disposable gets back what it was created with (if this manager allocated
    it), under the allocation lock. Its steps are the backend's (``memory.*``)."""

    def __init__(self, settings: MemorySettings, backend: FakeBackend) -> None:
        self.settings = settings
        self.backend = backend
        self.steps = backend.steps
        #: Seconds a shrink takes (the ``memory.shrink`` step), unless steps.delays says.
        self.shrink_delay = 0.0
        self.fail_shrink = False
        self.excluded: set[str] = set()
        self.included: set[str] = set()
        self.shrunk: list[str] = []
        #: Loop time at which each creation's allocation got the lock (its check began).
        self.allocated_at: dict[str, float] = {}
        self._created_mib: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        await asyncio.sleep(0)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)

    async def available_mib(self) -> int:
        await self.steps.reach("memory.available", None)
        return await self._free("available memory")

    def allocation(self, name: str, mib: int) -> AbstractAsyncContextManager[None]:
        return self._allocation(name, mib)

    @asynccontextmanager
    async def _allocation(self, name: str, mib: int) -> AsyncIterator[None]:
        # Like qmemman: one allocation at a time, held until the domain exists.
        async with self._lock:
            self.allocated_at[name] = asyncio.get_running_loop().time()
            await self.steps.reach("memory.allocation", name)
            free = await self._free(f"allocate {mib} MiB for {name}")
            if free < mib:
                raise NoMemory(f"cannot free {mib} MiB for {name}: {free} MiB free")
            yield
            self._created_mib[name] = mib

    async def shrink(self, name: str) -> ShrinkResult:
        start = asyncio.get_running_loop().time()
        await self.steps.reach("memory.shrink", name, self.shrink_delay)
        if self.fail_shrink:
            raise MemoryManagerError(f"shrink {name}: injected failure")
        try:
            info = await self.backend.memory(name)
            used = info.used_mib or info.actual_mib
            preferred = min(
                info.maxmem_mib,
                max(int(used * self.settings.preferred_factor), self.settings.preferred_floor_mib),
            )
            await self.backend.set_memory_target(name, preferred)
        except BackendError as exc:
            raise MemoryManagerError(f"shrink {name}: {exc}") from None
        self.shrunk.append(name)
        return ShrinkResult(
            target_mib=preferred,
            actual_mib=preferred,
            converged=True,
            seconds=asyncio.get_running_loop().time() - start,
        )

    def exclude(self, name: str) -> None:
        self.excluded.add(name)
        self.included.discard(name)

    def include(self, name: str) -> None:
        self.excluded.discard(name)
        self.included.add(name)
        if name in self._created_mib:
            task = asyncio.get_running_loop().create_task(self._give_back(name))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def forget(self, name: str) -> None:
        self.excluded.discard(name)
        self.included.discard(name)
        self._created_mib.pop(name, None)

    def status(self) -> dict[str, Any]:
        return {"manager": "fake", "free_mib": self.backend.free_mib()}

    async def _free(self, what: str) -> int:
        try:
            return await self.backend.free_memory_mib()
        except BackendError as exc:
            raise MemoryManagerError(f"{what}: {exc}") from None

    async def _give_back(self, name: str) -> None:
        async with self._lock:
            await self.steps.reach("memory.give_back", name)
            wanted = self._created_mib.get(name)
            if wanted is None or name not in self.included:
                return
            try:
                info = await self.backend.memory(name)
                grant = min(wanted - info.target_mib, await self.backend.free_memory_mib())
                if grant > 0 and name in self.included:
                    await self.backend.set_memory_target(name, info.target_mib + grant)
            except BackendError:
                return  # gone meanwhile: nothing to give back to
