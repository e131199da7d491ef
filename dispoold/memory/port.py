"""The memory port: what the pool engine needs from memory management, and its errors.

Two managers ship (:mod:`dispoold.memory.qmemman`, :mod:`dispoold.memory.balancer`); an
out-of-tree one implements :class:`MemoryManager` and loads by import path
(:data:`dispoold.memory.MANAGERS`).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


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
        Allocations are serialized: one block at a time for the whole daemon, so keep
        the block short (create, nothing else). Raises :class:`NoMemory` on entry when the
        memory cannot be freed, :class:`MemoryManagerError` when the manager itself
        failed (qmemman missing, dead or silent). Cancelling a waiting entry is safe.
        """

    async def shrink(self, name: str) -> ShrinkResult:
        """Bring a ready preload down to its preferred size and follow it until it
        converges or stops moving.

        A domain that stopped moving is not an error: the result says ``converged=False``
        with the figures reached. Raises :class:`MemoryManagerError`, naming the domain,
        when the shrink could not be done at all. Cancellable at any await (a request
        arriving meanwhile cancels it); a cancelled shrink leaves nothing locked, and a
        later :meth:`include` gives the domain its memory back."""

    def exclude(self, name: str) -> None:
        """The domain is paused (Qubes #11121) or being destroyed: never hand it memory
        until :meth:`include`."""

    def include(self, name: str) -> None:
        """The domain has been handed out: it takes part in balancing again, and gets
        back what it needs to run."""

    def forget(self, name: str) -> None:
        """The domain is gone."""

    def status(self) -> dict[str, Any]:
        """Figures for the ``memory`` part of the status reply (msgpack-able)."""
