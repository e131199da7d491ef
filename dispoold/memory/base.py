"""What the shipped managers share: per-domain bookkeeping, following a shrink until it
converges or stops, and the status figures."""

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


@dataclass(frozen=True, slots=True)
class ShrinkRecord:
    """One shrink, as the status reply shows it."""

    name: str
    outcome: str  # converged, gave up, failed, cancelled
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


class ManagerBase:
    """What both managers share: settings, the backend, per-domain bookkeeping, the
    convergence follower and the status figures."""

    manager_name = "base"

    def __init__(self, settings: MemorySettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self._domains: dict[str, Domain] = {}
        self._shrinks: collections.deque[ShrinkRecord] = collections.deque(maxlen=SHRINK_HISTORY)
        self._last_available_mib: int | None = None
        self._last_error: str | None = None

    # -- bookkeeping (the engine's calls are synchronous) -------------------------

    def exclude(self, name: str) -> None:
        self._domain(name).state = DomainState.EXCLUDED

    def include(self, name: str) -> None:
        self._domain(name).state = DomainState.INCLUDED

    def forget(self, name: str) -> None:
        self._domains.pop(name, None)

    def _domain(self, name: str) -> Domain:
        domain = self._domains.get(name)
        if domain is None:
            domain = self._domains[name] = Domain(DomainState.STARTING)
        return domain

    # -- helpers ------------------------------------------------------------------

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
        if record.error is not None:
            self._last_error = record.error

    def _result(
        self, name: str, start: float, target: int, actual: int, converged: bool
    ) -> ShrinkResult:
        seconds = asyncio.get_running_loop().time() - start
        self._record(
            ShrinkRecord(name, "converged" if converged else "gave up", target, actual, seconds)
        )
        if not converged:
            log.warning(
                "shrink %s: gave up at %d MiB for a target of %d MiB after %.1f s",
                name,
                actual,
                target,
                seconds,
            )
        return ShrinkResult(target, actual, converged, seconds)

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
            "last_error": self._last_error,
        }
