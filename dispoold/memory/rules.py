"""The rules dispoold shares with qmemman: the preferred size of a domain, and when to
give up on memory that should keep moving (see docs/design.md, "Memory")."""

from __future__ import annotations

import collections
import math
from typing import Final

from dispoold.config import MemorySettings

MIB: Final = 1024 * 1024
#: What Xen itself needs per domain on top of the guest's memory. Qubes asks qmemman for
#: 4 MiB plus 1.5 MiB per vCPU (OpenStack's measured overhead); the engine passes the
#: guest's size only, so one vCPU's worth is added, rounded up.
DOMAIN_OVERHEAD_MIB: Final = 6


def preferred_mib(used_mib: int, maxmem_mib: int, settings: MemorySettings) -> int:
    """qmemman's preferred size: ``used x factor``, at least the floor, at most maxmem.

    (qmemman lets the floor win over maxmem; a target above maxmem cannot be set, so
    here maxmem wins.)"""
    wanted = max(math.ceil(used_mib * settings.preferred_factor), settings.preferred_floor_mib)
    return max(1, min(wanted, maxmem_mib))


class Progress:
    """qmemman's give-up rule for something that should keep going down (a domain's
    actual size while it shrinks, the shortfall of free memory while domains give some
    back): after ``check_period`` seconds, give up when the last ``check_window`` seconds
    moved less than ``check_mib_s`` MiB per second."""

    def __init__(self, settings: MemorySettings, started: float) -> None:
        self._check_period = settings.check_period
        self._min_rate = settings.check_mib_s
        self._window = settings.check_window
        self._started = started
        self._samples: collections.deque[tuple[float, float]] = collections.deque()

    def stalled(self, now: float, level: float) -> bool:
        """Record ``level`` (MiB, lower is better) at ``now``; True when it is time to
        give up."""
        self._samples.append((now, level))
        # Keep the newest sample that is at least a window old: it is the baseline.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self._window:
            self._samples.popleft()
        if now - self._started < self._check_period:
            return False
        then, baseline = self._samples[0]
        if now - then < self._window * 0.999:
            return False  # not a whole window of history yet
        moved = baseline - level
        return moved <= 0 or moved < self._min_rate * self._window
