"""The daemon's own balancer: the memory manager on plain Xen."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Iterable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from dispoold.backend import Backend, BackendError, MemoryInfo, NoSuchDomain
from dispoold.config import MemorySettings, TemplateSettings
from dispoold.memory.base import Domain, DomainState, ManagerBase, Vanished
from dispoold.memory.port import MemoryManagerError, NoMemory, ShrinkResult
from dispoold.memory.rules import Progress, preferred_mib, start_overhead_mib

log = logging.getLogger("dispoold.memory")


class Balancer(ManagerBase):
    """The memory manager on plain Xen, where nobody else balances memory.

    - Available memory is the hypervisor's free memory less ``host_reserve_mib``.
    - :meth:`allocation` runs one creation at a time. When free memory is short it takes
      memory back from handed-out (running) disposables down to their preferred size, as
      qmemman's ``do_balloon`` does, and follows free memory with the same give-up rule;
      paused preloads cannot give anything (their balloon drivers do not run).
    - :meth:`shrink` sets the preload's target to its preferred size and follows it.
    - Memory is only ever handed to included (handed-out) domains: on :meth:`include`, a
      disposable gets back what it was created with, and squeezed ones get theirs back
      when a domain is forgotten and memory frees up. Never to a paused one (#11121).
    """

    manager_name = "balancer"

    def __init__(self, settings: MemorySettings, backend: Backend) -> None:
        super().__init__(settings, backend)
        #: Held by an allocation until its domain exists, and while memory is handed out.
        self._lock = asyncio.Lock()
        #: The last target request per domain, still in flight or done. A cancelled
        #: shrink cannot stop a backend call already in a worker thread; whatever sets a
        #: target next waits for it, so targets land in the order they were decided.
        self._setting: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._give_back_wanted: set[str] = set()
        self._give_back_task: asyncio.Task[None] | None = None
        self._last_free_mib: int | None = None

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pending = [f for f in self._setting.values() if not f.done()]
        await asyncio.gather(*pending, return_exceptions=True)

    async def available_mib(self) -> int:
        return await self._free_mib()

    def allocation(
        self, name: str, mib: int, template: TemplateSettings | None = None
    ) -> AbstractAsyncContextManager[None]:
        return self._allocation(name, mib, template)

    @asynccontextmanager
    async def _allocation(
        self, name: str, mib: int, template: TemplateSettings | None
    ) -> AsyncIterator[None]:
        need = mib + start_overhead_mib(mib, template)
        async with self._lock:
            free = await self._free_mib()
            if free < need:
                await self._reclaim(name, mib, need, free)
            yield
            # The domain exists now (or creation failed and the engine forgets it).
            self._domain(name).initial_mib = mib

    async def shrink(self, name: str) -> ShrinkResult:
        start = asyncio.get_running_loop().time()
        with self._recording_failures(name):
            domain = self._begin_shrink(name)
            info = await self._memory(name, "shrink")
            if domain.initial_mib is None:
                # Not allocated here (found at a restart): before its first shrink, a
                # domain still has what it was created with.
                domain.initial_mib = max(info.target_mib, info.actual_mib)
            if info.used_mib is None:
                raise MemoryManagerError(
                    f"shrink {name}: the guest reports no memory use, so its preferred "
                    "size is unknown"
                )
            target = preferred_mib(info.used_mib, info.maxmem_mib, self.settings)
            if target < info.target_mib:
                await self._set_target(name, target)
            else:
                # Never grow a preload: it is about to be paused.
                target = min(target, info.target_mib)
            actual, converged = await self._follow(name, target)
            return self._result(name, start, target, actual, converged)

    def exclude(self, name: str) -> None:
        super().exclude(name)
        self._give_back_wanted.discard(name)

    def include(self, name: str) -> None:
        super().include(name)
        self._want_give_back([name])

    def forget(self, name: str) -> None:
        super().forget(name)
        self._give_back_wanted.discard(name)
        # Memory frees up: the handed-out disposables that were squeezed get it back.
        self._want_give_back(n for n, d in self._domains.items() if d.state is DomainState.INCLUDED)

    def status(self) -> dict[str, Any]:
        figures = super().status()
        figures["free_mib"] = self._last_free_mib
        figures["host_reserve_mib"] = self.settings.host_reserve_mib
        return figures

    # -- internals ----------------------------------------------------------------

    async def _free_mib(self) -> int:
        try:
            free = await self.backend.free_memory_mib()
        except BackendError as exc:
            raise MemoryManagerError(f"free memory: {exc}") from None
        self._last_free_mib = free
        available = max(0, free - self.settings.host_reserve_mib)
        self._last_available_mib = available
        return available

    async def _set_target(self, name: str, mib: int) -> None:
        await self._settled(name)
        future = asyncio.ensure_future(self.backend.set_memory_target(name, mib))
        self._setting[name] = future
        future.add_done_callback(_consume_exception)
        try:
            await asyncio.shield(future)
        except NoSuchDomain as exc:
            raise Vanished(f"set memory of {name} to {mib} MiB: {exc}") from None
        except BackendError as exc:
            raise MemoryManagerError(f"set memory of {name} to {mib} MiB: {exc}") from None

    async def _settled(self, name: str) -> None:
        previous = self._setting.get(name)
        if previous is not None and not previous.done():
            await asyncio.wait({previous})

    async def _reclaim(self, name: str, mib: int, need: int, free: int) -> None:
        """Take memory back from handed-out disposables until ``need`` MiB are free, as
        qmemman's do_balloon does: each donor gives in proportion to what it holds above
        its preferred size, never below it. Raises :class:`NoMemory`."""
        what = f"allocate {mib} MiB for {name}"
        donors: list[tuple[str, MemoryInfo, int]] = []
        spare_total = 0
        for donor, domain in list(self._domains.items()):
            if domain.state is not DomainState.INCLUDED:
                continue  # starting ones are about to shrink; paused ones cannot give
            try:
                info = await self._memory(donor, "reclaim from")
            except Vanished:
                continue  # gone meanwhile: what it held is free now, or soon
            if info.used_mib is None:
                continue
            spare = info.actual_mib - preferred_mib(info.used_mib, info.maxmem_mib, self.settings)
            if spare > 0:
                donors.append((donor, info, spare))
                spare_total += spare
        shortfall = need - free
        if spare_total < shortfall:
            raise NoMemory(
                f"{what}: {free} MiB free and {spare_total} MiB reclaimable from running "
                f"disposables, {need} MiB needed"
            )
        # qmemman asks 5% more than the shortfall, so rounding cannot leave it stuck.
        scale = min(1.0, shortfall * 1.05 / spare_total)
        for donor, info, spare in donors:
            target = info.actual_mib - math.ceil(spare * scale)
            log.info("%s: taking %d MiB back from %s", what, info.actual_mib - target, donor)
            try:
                await self._set_target(donor, target)
            except Vanished:
                log.debug("%s: %s is gone; its memory comes free anyway", what, donor)
        loop = asyncio.get_running_loop()
        progress = Progress(self.settings, loop.time())
        while (free := await self._free_mib()) < need:
            if progress.stalled(loop.time(), need - free):
                raise NoMemory(
                    f"{what}: running disposables gave memory back too slowly ({free} MiB "
                    f"free, {need} MiB needed)"
                )
            await asyncio.sleep(self.settings.poll_interval)

    def _want_give_back(self, names: Iterable[str]) -> None:
        self._give_back_wanted.update(names)
        if self._give_back_wanted and (self._give_back_task is None or self._give_back_task.done()):
            task = asyncio.get_running_loop().create_task(self._give_back())
            self._give_back_task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _give_back(self) -> None:
        """Hand included domains what they were created with, as far as free memory
        allows, under the allocation lock (a creation's memory is never handed out).
        One domain that cannot take it does not keep the others from getting theirs."""
        async with self._lock:
            while self._give_back_wanted:
                name = self._give_back_wanted.pop()
                try:
                    await self._give_back_one(name)
                except Vanished:
                    log.debug("giving memory back: %s is gone", name)
                except MemoryManagerError as exc:
                    log.warning("giving memory back: %s", exc)

    async def _give_back_one(self, name: str) -> None:
        domain = self._domains.get(name)
        if domain is None or domain.state is not DomainState.INCLUDED:
            return
        if domain.initial_mib is None:
            # Found at a restart, already handed out: what it was created with is not
            # known (maxmem may be far more), so it keeps what it has.
            return
        # A cancelled shrink's target may still be on its way: let it land first.
        await self._settled(name)
        info = await self._memory(name, "give memory back to")
        wanted = min(domain.initial_mib, info.maxmem_mib)
        grow = wanted - info.target_mib
        if grow <= 0:
            return
        grant = min(grow, await self._free_mib())
        # Checked again after the awaits: only ever to a domain that is still included.
        if grant <= 0 or not self._included(name, domain):
            return
        log.info("giving %s %d MiB back (target %d MiB)", name, grant, info.target_mib + grant)
        await self._set_target(name, info.target_mib + grant)

    def _included(self, name: str, domain: Domain) -> bool:
        return self._domains.get(name) is domain and domain.state is DomainState.INCLUDED


def _consume_exception(future: asyncio.Future[None]) -> None:
    # A target request nobody waits for any more (its shrink was cancelled) must not
    # leave an "exception was never retrieved" behind.
    if not future.cancelled():
        future.exception()
