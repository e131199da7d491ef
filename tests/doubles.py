"""Test doubles for the pool engine's two collaborators: a hypervisor and a memory manager.

They keep the contracts of :mod:`dispoold.backend` and :mod:`dispoold.memory` (the
contract tests in ``tests/test_doubles.py`` hold them to it), take their timings from
``asyncio.sleep`` so that virtual-time tests run instantly, and expose hooks for what a
real host does behind the daemon's back: an unpause by someone else, a domain that dies,
a start that fails, a guest that never boots.

Both load as out-of-tree plug-ins (``[backend] name = "tests.doubles:FakeBackend"``,
``[memory] manager = "tests.doubles:FakeMemory"``), which is how the daemon tests run a
real daemon process without Xen. They never ship: they live under ``tests/``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict

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


class FakeBackendOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host_mib: int = 16_384
    create_delay: float = 0.0
    ready_delay: float = 0.0
    op_delay: float = 0.0
    #: Templates whose domains fail to be created / never become ready.
    fail_create: set[str] = set()
    never_ready: set[str] = set()
    #: What a guest reports using, as a fraction of its memory.
    used_fraction: float = 0.25


@dataclass
class FakeDomain:
    name: str
    domid: int
    template: str
    memory_mib: int
    maxmem_mib: int
    marker: Marker
    created_at: float
    ready_at: float | None
    paused: bool = False
    #: The backend paused it and has not unpaused it since (see Backend.pause).
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


class FakeBackend:
    """An in-memory hypervisor. Domain state survives a daemon "restart" as long as the
    same instance is handed to the new engine (as a real hypervisor would)."""

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        self.options = FakeBackendOptions.model_validate(options or {})
        self.domains: dict[str, FakeDomain] = {}
        self.counters = _Counters()
        self._next_domid = 1
        self._events: asyncio.Queue[DomainEvent | None] | None = None
        self._opened = False
        #: Per-name overrides set by tests: seconds until ready (None: never).
        self.ready_delays: dict[str, float | None] = {}
        #: Called with the domain's name just before create returns; may raise.
        self.on_create: Callable[[str], None] | None = None

    # -- test hooks ---------------------------------------------------------------

    def external_unpause(self, name: str) -> None:
        """Someone else (a qrexec call, an administrator) unpauses the domain."""
        domain = self.domains[name]
        domain.paused = False
        if domain.paused_by_backend:
            domain.paused_by_backend = False
            self._emit(DomainEventKind.UNPAUSED, name)

    def kill(self, name: str) -> None:
        """The domain crashes or shuts down (it lingers until destroyed, like on Xen)."""
        domain = self.domains[name]
        if not domain.shutdown:
            domain.shutdown = True
            self._emit(DomainEventKind.DIED, name)

    def vanish(self, name: str) -> None:
        """The domain disappears entirely (destroyed by someone else)."""
        if self.domains.pop(name, None) is not None:
            self._emit(DomainEventKind.DIED, name)

    def used_mib(self) -> int:
        return sum(d.memory_mib for d in self.domains.values())

    # -- Backend ------------------------------------------------------------------

    async def open(self) -> None:
        self._opened = True
        self._events = asyncio.Queue()

    async def close(self) -> None:
        self._opened = False
        if self._events is not None:
            self._events.put_nowait(None)

    async def create(
        self,
        name: str,
        template: TemplateSettings,
        marker: Marker,
        provision: Provision = NO_PROVISION,
    ) -> int:
        self._record("create", name)
        if name in self.domains:
            raise BackendError("create", name, "a domain of that name exists")
        await asyncio.sleep(self.options.create_delay)
        if marker.template in self.options.fail_create:
            raise BackendError("create", name, "kernel not found (injected failure)")
        if self.free_mib() < template.memory:
            raise BackendError("create", name, "not enough free memory")
        if self.on_create is not None:
            self.on_create(name)
        if marker.template in self.options.never_ready:
            delay: float | None = None
        else:
            delay = self.ready_delays.get(name, self.options.ready_delay)
        now = asyncio.get_running_loop().time()
        domain = FakeDomain(
            name=name,
            domid=self._next_domid,
            template=marker.template,
            memory_mib=template.memory,
            maxmem_mib=template.max_memory,
            marker=marker,
            provision=provision,
            created_at=now,
            ready_at=None if delay is None else now + delay,
            target_mib=template.memory,
            used_mib=max(1, int(template.memory * self.options.used_fraction)),
        )
        self._next_domid += 1
        self.domains[name] = domain
        self.counters.created += 1
        return domain.domid

    async def wait_ready(self, name: str, timeout: float) -> None:
        self._record("wait_ready", name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            domain = self.domains.get(name)
            if domain is None or domain.shutdown:
                raise NotReady("wait_ready", name, "the domain died while booting")
            if domain.ready_at is not None and loop.time() >= domain.ready_at:
                return
            if loop.time() >= deadline:
                raise NotReady("wait_ready", name, f"not ready after {timeout:g} s")
            wake = deadline if domain.ready_at is None else min(deadline, domain.ready_at)
            await asyncio.sleep(max(0.0, min(wake - loop.time(), 0.5)))

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
        domain.target_mib = min(mib, domain.maxmem_mib)
        # The balloon follows at once: the engine's tests are not about ballooning.
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
        await asyncio.sleep(self.options.op_delay)
        if self.domains.pop(name, None) is not None:
            self.counters.destroyed += 1

    async def domain_info(self, name: str) -> DomainInfo | None:
        self._record("domain_info", name)
        domain = self.domains.get(name)
        return None if domain is None else self._info(domain)

    async def list_owned(self, owner: str) -> list[DomainInfo]:
        self._record("list_owned", None)
        owned = [d for d in self.domains.values() if d.marker.owner == owner]
        for domain in owned:
            # Found paused at start-up: from now on, an unpause by someone else is news.
            domain.paused_by_backend = domain.paused
        return [self._info(d) for d in owned]

    async def free_memory_mib(self) -> int:
        return self.free_mib()

    async def events(self) -> AsyncIterator[DomainEvent]:
        if self._events is None:
            raise BackendError("events", None, "backend not open")
        queue = self._events
        # Deaths that happened before anyone listened are reported first.
        for domain in list(self.domains.values()):
            if domain.shutdown:
                yield DomainEvent(DomainEventKind.DIED, domain.name)
        while (event := await queue.get()) is not None:
            yield event

    # -- helpers ------------------------------------------------------------------

    def free_mib(self) -> int:
        return self.options.host_mib - self.used_mib()

    def _emit(self, kind: DomainEventKind, name: str) -> None:
        if self._events is not None:
            self._events.put_nowait(DomainEvent(kind, name))

    def _record(self, operation: str, name: str | None) -> None:
        self.counters.calls.append(Call(operation, name, time.monotonic()))

    async def _op(self, operation: str, name: str) -> FakeDomain:
        self._record(operation, name)
        await asyncio.sleep(self.options.op_delay)
        domain = self.domains.get(name)
        if domain is None:
            raise NoSuchDomain(operation, name, "no such domain")
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


class FakeMemory:
    """A memory manager over :class:`FakeBackend`: available memory is the fake host's
    free memory; a shrink sets the target to ``used * factor`` after ``shrink_delay``."""

    def __init__(self, settings: MemorySettings, backend: FakeBackend) -> None:
        self.settings = settings
        self.backend = backend
        self.shrink_delay = 0.0
        self.fail_shrink = False
        self.excluded: set[str] = set()
        self.included: set[str] = set()
        self.shrunk: list[str] = []
        self._lock = asyncio.Lock()

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def available_mib(self) -> int:
        return self.backend.free_mib()

    def allocation(self, name: str, mib: int) -> AbstractAsyncContextManager[None]:
        return self._allocation(name, mib)

    @asynccontextmanager
    async def _allocation(self, name: str, mib: int) -> AsyncIterator[None]:
        # Like qmemman: one allocation at a time, held until the domain exists.
        async with self._lock:
            if self.backend.free_mib() < mib:
                raise NoMemory(f"cannot free {mib} MiB for {name}")
            yield

    async def shrink(self, name: str) -> ShrinkResult:
        start = asyncio.get_running_loop().time()
        await asyncio.sleep(self.shrink_delay)
        if self.fail_shrink:
            raise MemoryManagerError(f"shrink {name}: injected failure")
        info = await self.backend.memory(name)
        used = info.used_mib or info.actual_mib
        preferred = min(
            info.maxmem_mib,
            max(int(used * self.settings.preferred_factor), self.settings.preferred_floor_mib),
        )
        await self.backend.set_memory_target(name, preferred)
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

    def forget(self, name: str) -> None:
        self.excluded.discard(name)
        self.included.discard(name)

    def status(self) -> dict[str, Any]:
        return {"manager": "fake", "free_mib": self.backend.free_mib()}
