"""An asyncio event loop whose clock jumps ahead whenever it would wait.

When every task is waiting on a timer, the loop advances its clock straight to the next
timer instead of sleeping: a scenario with 60 s boot timeouts and 3 s refill delays runs
in milliseconds, and its timing is exact and repeatable. While a worker thread
(``to_thread``, ``run_in_executor``) is busy, the clock stands still and the loop really
waits for it, as it would if the thread's work took no time at all.
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

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds


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
            loop.close()


async def _cancel_all() -> None:
    pending = asyncio.all_tasks() - {asyncio.current_task()}
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
