"""What the shipped managers share: per-domain bookkeeping (the stage the engine last
told of, what the domain was created with, whether its last shrink happened), following
a shrink until it converges or stops, and the status figures."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

from dispoold.backend import Backend, BackendError, MemoryInfo, NoSuchDomain
from dispoold.config import MemorySettings
from dispoold.memory.port import MemoryManagerError, ShrinkResult
from dispoold.memory.rules import Progress

log = logging.getLogger("dispoold.memory")

#: How many recent shrinks :meth:`MemoryManager.status` reports.
SHRINK_HISTORY: Final = 16


class Vanished(MemoryManagerError):
    """The domain a memory operation was about is gone (destroyed, or shut down)."""


class StageChanged(MemoryManagerError):
    """The domain's stage changed while a shrink was under way (the engine said it was
    paused, handed out or gone): nothing more is asked for it."""


@dataclass(frozen=True, slots=True)
class ShrinkRecord:
    """One shrink, as the status reply shows it."""

    name: str
    #: converged, gave up, skipped (the balancer did not act), busy, failed, cancelled
    outcome: str
    target_mib: int | None = None
    actual_mib: int | None = None
    seconds: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "outcome": self.outcome,
            "target_mib": self.target_mib,
            "actual_mib": self.actual_mib,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "error": self.error,
        }


class DomainState(Enum):
    STARTING = "starting"  # created, booting or shrinking, not yet paused
    EXCLUDED = "excluded"  # paused in the pool: never hand it memory
    INCLUDED = "included"  # handed out: balanced like any running domain


@dataclass
class Domain:
    state: DomainState
    #: What the domain was created with: what a handed-out disposable gets back.
    initial_mib: int | None = None
    #: Its domid, once the build said so (a shrink checks it has not been replaced).
    domid: int | None = None
    #: Grows whenever the engine tells of a new stage: a shrink started at one epoch
    #: sends nothing once the epoch has moved on.
    epoch: int = 0
    #: Why its last shrink did not happen, when that reason may pass (qmemman down or
    #: busy, a skipped request); None when it was shrunk, or there is nothing to retry.
    unshrunk: str | None = None
    #: The target it was left with when paused (for a check that nobody raises it).
    paused_target_mib: int | None = None


class ManagerBase:
    """What both managers share: settings, the backend, per-domain bookkeeping, the
    convergence follower and the status figures."""

    manager_name = "base"

    def __init__(self, settings: MemorySettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self._domains: dict[str, Domain] = {}
        self._shrinks: collections.deque[ShrinkRecord] = collections.deque(maxlen=SHRINK_HISTORY)
        self._outcomes: collections.Counter[str] = collections.Counter()
        self._last_available_mib: int | None = None
        self._last_error: str | None = None
        self._wanted_changed = asyncio.Event()
        self._wanted_given: set[str] = set()

    # -- bookkeeping (the engine's calls are synchronous) -------------------------

    def exclude(self, name: str) -> None:
        domain = self._domain(name)
        self._moved_on(domain, DomainState.EXCLUDED)
        if domain.unshrunk is not None:
            self._wanted_changed.set()  # paused unshrunk: worth a shrink once possible

    def include(self, name: str) -> None:
        domain = self._domain(name)
        self._moved_on(domain, DomainState.INCLUDED)
        domain.unshrunk = None  # handed out: never shrunk again

    def forget(self, name: str) -> None:
        domain = self._domains.pop(name, None)
        if domain is not None:
            domain.epoch += 1
        self._wanted_given.discard(name)

    def _moved_on(self, domain: Domain, state: DomainState) -> None:
        domain.state = state
        domain.epoch += 1

    def _domain(self, name: str) -> Domain:
        domain = self._domains.get(name)
        if domain is None:
            domain = self._domains[name] = Domain(DomainState.STARTING)
        return domain

    # -- shrinks worth doing again (PreloadMemory) -----------------------------------

    def _can_shrink_now(self) -> bool:
        """Whether a shrink held back by a passing reason could be done now."""
        return False

    def shrink_wanted(self) -> list[str]:
        if not self._can_shrink_now():
            return []
        return sorted(
            name
            for name, domain in self._domains.items()
            if domain.state is DomainState.EXCLUDED and domain.unshrunk is not None
        )

    async def wait_shrink_wanted(self) -> list[str]:
        while True:
            news = [name for name in self.shrink_wanted() if name not in self._wanted_given]
            if news:
                self._wanted_given.update(news)
                return news
            self._wanted_changed.clear()
            await self._wanted_changed.wait()

    def _unshrunk(self, name: str, reason: str | None) -> None:
        domain = self._domains.get(name)
        if domain is None:
            return
        domain.unshrunk = reason
        self._wanted_given.discard(name)
        self._wanted_changed.set()

    # -- helpers ------------------------------------------------------------------

    def _begin_shrink(self, name: str) -> Domain:
        """The domain a shrink is about; refuses a handed-out one (its user needs the
        memory). An excluded (paused) preload may be shrunk again: the engine has
        unpaused it for that."""
        domain = self._domain(name)
        if domain.state is DomainState.INCLUDED:
            raise MemoryManagerError(
                f"shrink {name}: it has been handed out; a shrink now would take memory "
                "its user needs"
            )
        if domain.state is DomainState.EXCLUDED:
            self._moved_on(domain, DomainState.STARTING)
        self._wanted_given.discard(name)
        return domain

    def _check_stage(self, name: str, domain: Domain, epoch: int) -> None:
        """Raises :class:`StageChanged` when the engine has told of a new stage since
        ``epoch``: a request is never sent for a domain that has moved on."""
        if self._domains.get(name) is not domain or domain.epoch != epoch:
            where = "gone" if self._domains.get(name) is not domain else domain.state.value
            raise StageChanged(f"shrink {name}: its stage changed meanwhile ({where}); stopped")

    async def _memory(self, name: str, what: str) -> MemoryInfo:
        try:
            info = await self.backend.memory(name)
        except NoSuchDomain as exc:
            raise Vanished(f"{what} {name}: {exc}") from None
        except BackendError as exc:
            raise MemoryManagerError(f"{what} {name}: {exc}") from None
        return info

    async def _follow(self, name: str, target_mib: int) -> tuple[int, bool]:
        """Poll the domain's actual size until actual / target <= ratio (True) or the
        progress rule gives up (False). Returns the last actual size."""
        loop = asyncio.get_running_loop()
        progress = Progress(self.settings, loop.time())
        limit = max(target_mib, 1) * self.settings.convergence_ratio
        while True:
            info = await self._memory(name, "shrink")
            if info.actual_mib <= limit:
                return info.actual_mib, True
            if progress.stalled(loop.time(), info.actual_mib):
                return info.actual_mib, False
            await asyncio.sleep(self.settings.poll_interval)

    def _record(self, record: ShrinkRecord) -> None:
        self._shrinks.append(record)
        self._outcomes[record.outcome] += 1
        if record.error is not None:
            self._last_error = record.error

    def _result(
        self, name: str, start: float, target: int, actual: int, converged: bool
    ) -> ShrinkResult:
        seconds = asyncio.get_running_loop().time() - start
        self._record(
            ShrinkRecord(name, "converged" if converged else "gave up", target, actual, seconds)
        )
        domain = self._domains.get(name)
        if domain is not None:
            domain.paused_target_mib = target
        self._unshrunk(name, None)
        if not converged:
            log.warning(
                "shrink %s: gave up at %d MiB for a target of %d MiB after %.1f s",
                name,
                actual,
                target,
                seconds,
            )
        return ShrinkResult(target, actual, converged, seconds)

    def _not_done(
        self, name: str, start: float, outcome: str, info: MemoryInfo, why: str
    ) -> ShrinkResult:
        """A shrink the balancer did not act on: recorded, listed for later, and told."""
        seconds = asyncio.get_running_loop().time() - start
        self._record(
            ShrinkRecord(name, outcome, info.target_mib, info.actual_mib, seconds, error=why)
        )
        self._unshrunk(name, why)
        log.warning(
            "shrink %s: %s (%d MiB, target %d MiB)", name, why, info.actual_mib, info.target_mib
        )
        return ShrinkResult(info.target_mib, info.actual_mib, False, seconds, skipped=True)

    @contextlib.contextmanager
    def _recording_failures(self, name: str) -> Iterator[None]:
        try:
            yield
        except MemoryManagerError as exc:
            self._record(ShrinkRecord(name, "failed", error=str(exc)))
            raise
        except asyncio.CancelledError:
            self._record(ShrinkRecord(name, "cancelled"))
            raise

    def status(self) -> dict[str, Any]:
        counts = collections.Counter(d.state.value for d in self._domains.values())
        return {
            "manager": self.manager_name,
            "available_mib": self._last_available_mib,
            "domains": {state.value: counts.get(state.value, 0) for state in DomainState},
            "shrinks": [record.to_dict() for record in self._shrinks],
            "skipped_shrinks": self._outcomes["skipped"] + self._outcomes["busy"],
            "paused_unshrunk": sorted(
                name
                for name, d in self._domains.items()
                if d.state is DomainState.EXCLUDED and d.unshrunk is not None
            ),
            "last_error": self._last_error,
        }
