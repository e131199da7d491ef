"""Memory negotiation: how much the host can spare, and shrinking preloads before pause.

The pool engine talks to a :class:`MemoryManager`. Two implementations ship, chosen by
``[memory] manager``: the qmemman client (Qubes, where qmemman balances memory) and the
daemon's own balancer (plain Xen). ``auto`` picks qmemman when its socket exists.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from dispoold.backend import Backend, import_from_string
from dispoold.config import MemorySettings

#: The managers that ship, by configuration name. Each is called as
#: ``cls(settings, backend)``; so is an out-of-tree ``package.module:Class``.
MANAGERS = {
    "qmemman": "dispoold.memory:QmemmanClient",
    "balancer": "dispoold.memory:Balancer",
}


class MemoryManagerError(Exception):
    """A memory operation failed; the message says what and why."""


class NoMemory(MemoryManagerError):
    """The host cannot free enough memory for a new domain."""


@dataclass(frozen=True, slots=True)
class ShrinkResult:
    target_mib: int
    actual_mib: int
    #: actual / target reached the convergence ratio before the manager gave up.
    converged: bool
    seconds: float


@runtime_checkable
class MemoryManager(Protocol):
    """What the pool engine needs from memory management.

    Domains are named as the backend names them. Methods never block the event loop and
    raise only :class:`MemoryManagerError` subclasses (and ``CancelledError``).
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def available_mib(self) -> int:
        """Memory new domains could get now, before the preload threshold is taken off."""

    def allocation(self, name: str, mib: int) -> AbstractAsyncContextManager[None]:
        """Make ``mib`` MiB free for the domain ``name`` that is about to be created.

        The engine creates the domain inside the ``async with`` block: the memory stays
        reserved for it (with qmemman: its global lock is held) until the block exits.
        Raises :class:`NoMemory` on entry when the memory cannot be freed.
        """

    async def shrink(self, name: str) -> ShrinkResult:
        """Bring a ready preload down to its preferred size and follow it until it
        converges or stops moving. Cancellable: a request arriving meanwhile cancels it."""

    def exclude(self, name: str) -> None:
        """The domain is paused: never hand it memory until :meth:`include`
        (Qubes #11121)."""

    def include(self, name: str) -> None:
        """The domain has been handed out: it takes part in balancing again, and gets
        back what it needs to run."""

    def forget(self, name: str) -> None:
        """The domain is gone."""

    def status(self) -> dict[str, Any]:
        """Figures for the ``memory`` part of the status reply (msgpack-able)."""


def create_manager(settings: MemorySettings, backend: Backend) -> MemoryManager:
    """The manager ``settings.manager`` names; ``auto`` means qmemman when its socket
    exists, else the daemon's own balancer. Raises :class:`MemoryManagerError`."""
    name = settings.manager
    if name == "auto":
        name = "qmemman" if settings.qmemman_socket.exists() else "balancer"
    try:
        cls = import_from_string(MANAGERS.get(name, name))
    except ImportError as exc:
        raise MemoryManagerError(f"memory manager {exc}") from None
    manager = cls(settings, backend)
    if not isinstance(manager, MemoryManager):
        raise MemoryManagerError(f"memory manager {name!r} does not implement MemoryManager")
    return manager
