"""Preloads: the pool's own paused disposables, the fastest way to a disposable."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from dispoold.lifecycle import Stage
from dispoold.origins import Workshop
from dispoold.views import OriginName

if TYPE_CHECKING:
    from dispoold.books import Disposable

#: A request waits this many startup timeouts, at most, for a preload it took while it
#: was still booting; then it gives up on it and asks again (as Qubes does).
PRELOAD_WAIT_FACTOR = 1.2
#: Which pool member a request takes first: ready ones, then the furthest along.
TAKE_ORDER = {Stage.PAUSED: 0, Stage.SHRINKING: 1, Stage.STARTUP: 2}


class Preloads:
    name: OriginName = "preload"
    last_resort = False
    #: A preload that could not be handed over: the request takes another.
    repeat = True

    def __init__(self, pool: Workshop) -> None:
        self._pool = pool

    def claim(self, templates: Sequence[str]) -> Disposable | None:
        """The best usable preload of ``templates``: paused ones first, the longest
        ready first; never an outdated one (the refresh replaces it)."""
        self._pool.notice_changes(templates)
        best: Disposable | None = None
        for d in self._pool.books:
            if d.template not in templates or d.stage not in TAKE_ORDER or d.origin == "prepare":
                continue
            if not self._pool.is_current(d):
                continue
            if best is None or (TAKE_ORDER[d.stage], d.since) < (
                TAKE_ORDER[best.stage],
                best.since,
            ):
                best = d
        if best is not None:
            self._pool.take(best)
        return best

    def patience(self) -> float:
        return PRELOAD_WAIT_FACTOR * self._pool.config.pool.startup_timeout
