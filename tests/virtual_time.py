"""An asyncio event loop whose clock jumps ahead whenever it would wait.

When every task is waiting on a timer, the loop advances its clock straight to the next
timer instead of sleeping: a scenario with 60 s boot timeouts and 3 s refill delays runs
in milliseconds, and its timing is exact and repeatable. While a worker thread
(``to_thread``, ``run_in_executor``) is busy, the clock stands still and the loop really
waits for it, as it would if the thread's work took no time at all.

A timer that fires has moved the clock to its deadline (asyncio runs timers up to its clock
resolution early), and a loop that keeps running callbacks at one instant without ever
waiting (a livelock, which a real clock would hide by moving on) is an error naming where
each task stands, not a hang.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

#: With no timer pending the loop can only wait for a worker thread; past this many real
#: seconds it is a test that waits on something that never comes.
IDLE_LIMIT = 30.0
#: Loop iterations at one virtual instant past which something spins (a task that yields
#: without ever waiting for anything): an error, not a hang.
BUSY_LIMIT = 200_000


class _VirtualSelector(selectors.BaseSelector):
    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._real = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        self._loop.spin()
        if ready or timeout == 0:
            return ready
        if timeout is None or self._loop.threads_busy:
            ready = self._real.select(IDLE_LIMIT)
            if not ready:
                raise RuntimeError(
                    f"virtual-time loop idle for {IDLE_LIMIT:g} s: every task waits on nothing"
                )
            return ready
        self._loop.advance(timeout)
        return []

    def close(self) -> None:
        self._real.close()

    def get_key(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.get_key(fileobj)

    def get_map(self) -> Any:
        return self._real.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._now = 0.0
        self._spun_at = 0.0
        self._spins = 0
        self.threads_busy = 0
        super().__init__(_VirtualSelector(self))

    def run_in_executor(  # type: ignore[override]
        self, executor: Executor | None, func: Callable[..., T], *args: Any
    ) -> asyncio.Future[T]:
        future = super().run_in_executor(executor, func, *args)
        self.threads_busy += 1
        future.add_done_callback(self._thread_done)
        return future

    def _thread_done(self, _: asyncio.Future[Any]) -> None:
        self.threads_busy -= 1

    def call_at(  # type: ignore[override]
        self, when: float, callback: Callable[..., object], *args: Any, context: Any = None
    ) -> asyncio.TimerHandle:
        return super().call_at(when, self._fire, when, callback, *args, context=context)

    def _fire(self, when: float, callback: Callable[..., object], *args: Any) -> None:
        # asyncio runs a timer that is due within its clock resolution (1 ns) of now, but
        # a virtual clock does not move while callbacks are ready: without this, code
        # that re-arms a timer until the clock reaches a deadline one float step away
        # would spin for ever at one instant. A real clock has reached ``when`` by then.
        self._now = max(self._now, when)
        callback(*args)

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds

    def spin(self) -> None:
        """One more iteration: past BUSY_LIMIT of them with the clock standing still (a
        wait so short that it does not move the clock counts as standing still), raise."""
        if self._now != self._spun_at:
            self._spun_at, self._spins = self._now, 0
        self._spins += 1
        if self._spins > BUSY_LIMIT:
            self._spins = 0
            where = sorted(
                f"{task.get_name()} at {_innermost(task)}" for task in asyncio.all_tasks(self)
            )
            raise RuntimeError(
                f"virtual-time loop spun {BUSY_LIMIT} times at {self._now:g} s without "
                f"waiting for anything; tasks: {where}"
            )


def _innermost(task: asyncio.Task[Any]) -> str:
    """Where the task's chain of awaits ends (file:line of the innermost coroutine)."""
    coro: Any = task.get_coro()
    where = "?"
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
        if frame is not None:
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
        coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
    return where


#: Loops of crashed daemon lifetimes: kept referenced (and never run again) so that
#: their pending tasks are frozen as a killed process's would be, not garbage-collected.
_ABANDONED: list[Any] = []


def run(coro: Coroutine[Any, Any, T], *, crash: bool = False) -> T:
    """Run ``coro`` to completion on a fresh virtual-time loop.

    With ``crash``, whatever else is still running on the loop afterwards is frozen
    where it stands, with no clean-up, as if the process had been killed.
    """
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        if crash:
            _ABANDONED.append(loop)
        else:
            loop.run_until_complete(_cancel_all())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(_cancel_all())
            loop.close()


#: Rounds of cancelling before giving up on a loop whose timers keep starting tasks.
CANCEL_ROUNDS = 100


async def _cancel_all() -> None:
    """Cancel every other task, and the ones they or their timers start meanwhile: a
    task left unstarted when the loop closes is a coroutine never awaited (an error
    under the test suite's warning filters, in whichever later test the collector
    finds it)."""
    for _ in range(CANCEL_ROUNDS):
        pending = asyncio.all_tasks() - {asyncio.current_task()}
        if not pending:
            return
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    raise RuntimeError(f"tasks still being started after {CANCEL_ROUNDS} rounds of cancelling")
