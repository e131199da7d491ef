"""The memory port: what the pool engine needs from memory management, and its errors.

Two managers ship (:mod:`dispoold.memory.qmemman`, :mod:`dispoold.memory.balancer`); an
out-of-tree one implements :class:`MemoryManager` and loads by import path
(:data:`dispoold.memory.MANAGERS`).

:class:`MemoryManager` is what every manager implements, the engine's test double
included. :class:`PreloadMemory` is what the shipped managers add for the preload
lifecycle (issue 14): sizing a start as qubesd does, and naming paused preloads that are
worth shrinking again. The engine uses it where the manager has it; once the double
implements it too, the two merge. :class:`BuildObserver` is what a memory manager may
ask of a backend beyond the backend port.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from dispoold.config import TemplateSettings


class MemoryManagerError(Exception):
    """A memory operation failed; the message says what and why."""


class NoMemory(MemoryManagerError):
    """The host cannot free enough memory for a new domain."""


class MemoryBusy(NoMemory):
    """The memory manager is alive but busy (another client holds qmemman): nothing
    failed, the memory cannot be had now. A shortage for the moment, to try again later,
    never a failed preload."""


@dataclass(frozen=True, slots=True)
class ShrinkResult:
    #: The target the memory balancer set (qmemman's own figure, not the guest's view).
    target_mib: int
    actual_mib: int
    #: actual / target reached the convergence ratio before the manager gave up.
    converged: bool
    seconds: float
    #: The manager could not act on it (qmemman skipped the request, or was busy): the
    #: domain is as it was. :meth:`PreloadMemory.shrink_wanted` names it once paused.
    skipped: bool = False


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
        when the shrink could not be done at all (nor is a handed-out domain shrunk).
        Cancellable at any await (a request arriving meanwhile cancels it); a cancelled
        shrink leaves nothing locked, and a later :meth:`include` gives the domain its
        memory back.

        A request already sent to the memory balancer cannot be withdrawn (qmemman has
        no way to cancel one): cancelling stops the manager waiting, and qmemman may
        still set the domain's memory afterwards. The manager never sends another
        request for a domain whose stage changed meanwhile.

        After a shrink that moved memory the manager may keep the balancer from acting
        until the engine's next call about that domain (with qmemman: its lock stays
        held, so that no balance regrows the domain before its pause). The engine makes
        that call as soon as it can: :meth:`exclude` once the pause has returned, or
        :meth:`include` / :meth:`forget` when the domain is not paused after all."""

    def exclude(self, name: str) -> None:
        """The domain is paused (Qubes #11121) or being destroyed: never hand it memory
        until :meth:`include`. Called once the pause has returned (see :meth:`shrink`)."""

    def include(self, name: str) -> None:
        """The domain has been handed out (or was found running at a restart): it takes
        part in balancing again, and gets back what it needs to run."""

    def forget(self, name: str) -> None:
        """The domain is gone."""

    def status(self) -> dict[str, Any]:
        """Figures for the ``memory`` part of the status reply (msgpack-able)."""


@runtime_checkable
class PreloadMemory(MemoryManager, Protocol):
    """The shipped managers' additions to :class:`MemoryManager` (issue 14)."""

    def allocation(
        self, name: str, mib: int, template: TemplateSettings | None = None
    ) -> AbstractAsyncContextManager[None]:
        """As :meth:`MemoryManager.allocation`, with the domain's shape: ``template``
        sizes the request as qubesd sizes a start (its vCPUs, and for a guest that is
        not PV its maxmem; see :func:`dispoold.memory.rules.start_request_bytes`).
        Without it, one vCPU and a PV guest are assumed."""

    def shrink_wanted(self) -> list[str]:
        """Paused (excluded) preloads whose shrink did not happen for a reason that has
        passed (qmemman was down or busy, or skipped the request), and that the manager
        could shrink now. To shrink one the engine unpauses it, calls :meth:`shrink`,
        pauses it and calls :meth:`exclude`; the name is then no longer listed (a new
        failure lists it again later)."""

    async def wait_shrink_wanted(self) -> list[str]:
        """Wait until :meth:`shrink_wanted` names someone, and return the names (once:
        the next call waits for news). Cancellable."""


@runtime_checkable
class BuildObserver(Protocol):
    """What a memory manager may ask of a backend beyond the backend port: a word
    while a domain is being built, once it exists (paused) and before it is unpaused.
    The Xen backend offers it; a backend without it still works (the allocation then
    lasts until the engine's ``async with`` block ends, and no keys are created)."""

    def observe_builds(
        self,
        hook: Callable[[str, int], Coroutine[Any, Any, None]],
        guest_keys: tuple[str, ...] = (),
    ) -> None:
        """For every domain this backend builds from now on: create ``guest_keys``
        (paths under the domain's own xenstore area) empty and owned by the domain, then
        run ``hook(name, domid)`` on the event loop, then unpause the domain. The build
        waits for the hook (a bounded time) before the unpause."""
