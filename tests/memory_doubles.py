"""Doubles for the memory managers' tests: a backend whose balloons take time and whose
guests report their memory through xenstore, and the qmemman stand-in over it.

:class:`BalloonBackend` is :class:`tests.doubles.FakeBackend` with what memory management
sees of a real host:

- slow balloons: a domain's actual size moves toward its balloon target at a set speed
  (MiB/s, per domain), never below a set floor (a guest that cannot give more), and not
  at all while it is paused;
- a build that is not atomic: the domain exists paused first, then (after the build
  observers registered through ``observe_builds`` have run, and ``unpause_delay``) it
  runs, as with libxl;
- a per-domain xenstore area where the guest reports its used memory, in KiB, as the lab
  guest does: ``data/meminfo`` always, ``memory/meminfo`` only when that key was created
  owned by the domain (libxl leaves ``memory/`` read-only for the guest); a guest reports
  once it has booted and while it runs (a paused guest writes nothing);
- two targets, as on Xen: the balloon target the guest follows (``memory/target``) and
  the target the toolstack set in Xen (libxl: the same; qmemman: 16 MiB more, see
  :meth:`BalloonBackend.qmemman_set`). :meth:`memory` reports the latter.

The qmemman stand-in itself is :mod:`tests.qmemman_standin`; :func:`standin` builds one
over a :class:`BalloonBackend`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from dispoold.backend import NO_PROVISION, Marker, MemoryInfo, Provision
from dispoold.config import TemplateSettings
from tests.doubles import FakeBackend, FakeDomain
from tests.qmemman_standin import (
    HANG_UP,
    MIB,
    NO_ANSWER,
    TARGET_OFFSET,
    BalloonHypervisor,
    QmemmanStandIn,
    Request,
    Rules,
    Timing,
)

__all__ = [
    "HANG_UP",
    "MIB",
    "NO_ANSWER",
    "BalloonBackend",
    "QmemmanStandIn",
    "Request",
    "Rules",
    "Timing",
    "standin",
    "write_avail",
]

#: Where a guest reports its used memory for qmemman (Qubes' meminfo-writer).
QMEMMAN_MEMINFO = "memory/meminfo"
#: Where the lab guest (and dispoold's default meminfo_key) reports it.
DATA_MEMINFO = "data/meminfo"

BuildHook = Callable[[str, int], Coroutine[Any, Any, None]]


def write_avail(path: Path, content: str) -> None:
    """Write qmemman's available-memory file the way qmemman does (temp file + rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(content, encoding="ascii")
    os.replace(tmp, path)


#: The stand-in's clock in host tests: qmemman's 0.1 s poll, 3 s check period and 1 s
#: window become 0.01 s, 0.3 s and 0.1 s; its watcher looks every 0.01 s.
FAST = Timing(poll=0.01, check_period=0.3, check_mb_s=100.0, window=0.1, watch=0.01)


def standin(
    path: Path, backend: BalloonBackend, avail_file: Path | None = None, **kwargs: Any
) -> QmemmanStandIn:
    """A qmemman stand-in on ``path`` over ``backend``, on the fast clock by default."""
    kwargs.setdefault("timing", FAST)
    return QmemmanStandIn(path, BalloonHypervisor(backend), avail_file, **kwargs)


class BalloonBackend(FakeBackend):
    def __init__(self, options: dict[str, Any] | None = None, *, speed_mib_s: float = 1e6) -> None:
        super().__init__(options)
        self.default_speed = speed_mib_s
        #: Per-domain balloon speed (MiB/s) and the size below which it cannot go.
        self.speed: dict[str, float] = {}
        self.stuck_at: dict[str, int] = {}
        #: Every target set, in order: (name, target MiB, who set it: "libxl"/"qmemman").
        self.targets: list[tuple[str, int]] = []
        self.setters: list[str] = []
        #: Seconds a target request takes to land (a slow hypervisor call in a thread).
        self.set_delay = 0.0
        #: Seconds between a domain's build and its unpause.
        self.unpause_delay = 0.0
        #: Each domain's xenstore area (relative keys) and the keys its guest may write.
        self.xenstore: dict[str, dict[str, str]] = {}
        self.guest_writable: dict[str, set[str]] = {}
        #: The target the toolstack set in Xen (MiB), where it differs from the balloon's.
        self.xen_targets: dict[str, int] = {}
        self._exact: dict[str, float] = {}
        self._moved_at: dict[str, float] = {}
        self._build_hooks: list[BuildHook] = []
        self._guest_keys: tuple[str, ...] = ()

    # -- what memory managers may ask of a backend (dispoold.memory.port.BuildObserver)

    def observe_builds(self, hook: BuildHook, guest_keys: tuple[str, ...] = ()) -> None:
        self._build_hooks.append(hook)
        self._guest_keys = tuple(dict.fromkeys(self._guest_keys + tuple(guest_keys)))

    # -- the host ---------------------------------------------------------------------

    def advance(self) -> None:
        now = asyncio.get_running_loop().time()
        for domain in self.domains.values():
            exact = self._exact.get(domain.name, float(domain.memory_mib))
            elapsed = now - self._moved_at.get(domain.name, now)
            self._moved_at[domain.name] = now
            step = (
                0.0 if domain.paused else self.speed.get(domain.name, self.default_speed) * elapsed
            )
            target = float(domain.target_mib)
            if exact > target:
                floor = max(target, float(self.stuck_at.get(domain.name, 0)))
                exact = max(exact - step, floor) if exact > floor else exact
            elif exact < target:
                exact = min(exact + step, target)
            self._exact[domain.name] = exact
            domain.memory_mib = round(exact)
            self._guest_reports(domain, now)

    def _guest_reports(self, domain: FakeDomain, now: float) -> None:
        """The guest writes its used memory (KiB) where it may, once booted, while it runs."""
        booted = domain.ready_at is not None and now >= domain.ready_at
        if domain.paused or domain.shutdown or not booted or domain.used_mib is None:
            return
        store = self.xenstore.setdefault(domain.name, {})
        for key in (DATA_MEMINFO, QMEMMAN_MEMINFO):
            if key in self.guest_writable.get(domain.name, set()):
                store[key] = str(domain.used_mib * 1024)

    def xenstore_read(self, name: str, key: str) -> str | None:
        self.advance()
        return self.xenstore.get(name, {}).get(key)

    def qmemman_set(self, name: str, value: int) -> None:
        """qmemman's mem_set: Xen's target is ``value``; the balloon's 16 MiB lower."""
        domain = self.domains.get(name)
        if domain is None:
            return
        self.advance()
        mib = min(value // MIB, domain.maxmem_mib)
        domain.target_mib = max(0, mib - TARGET_OFFSET // MIB)
        self.xen_targets[name] = mib
        self.targets.append((name, mib))
        self.setters.append("qmemman")

    # -- Backend ----------------------------------------------------------------------

    async def create(
        self,
        name: str,
        template: TemplateSettings,
        marker: Marker,
        provision: Provision = NO_PROVISION,
    ) -> int:
        domid = await super().create(name, template, marker, provision)
        domain = self.domains[name]
        domain.paused = True  # built, not yet unpaused: libxl creates domains paused
        self.xenstore[name] = {}
        self.guest_writable[name] = {DATA_MEMINFO}
        for key in self._guest_keys:
            self.xenstore[name][key] = ""
            self.guest_writable[name].add(key)
        self.xen_targets.pop(name, None)
        for hook in list(self._build_hooks):
            await hook(name, domid)
        await asyncio.sleep(self.unpause_delay)
        if self.domains.get(name) is domain:
            domain.paused = False
        return domid

    async def destroy(self, name: str) -> None:
        await super().destroy(name)
        self._forget(name)

    def vanish(self, name: str) -> None:
        super().vanish(name)
        self._forget(name)

    def _forget(self, name: str) -> None:
        if name not in self.domains:
            for table in (self.xenstore, self.guest_writable, self.xen_targets):
                table.pop(name, None)

    async def set_memory_target(self, name: str, mib: int) -> None:
        await asyncio.sleep(self.set_delay)
        self.advance()
        domain = await self._op("set_memory_target", name)
        domain.target_mib = min(mib, domain.maxmem_mib)
        self.xen_targets[name] = domain.target_mib
        self.targets.append((name, domain.target_mib))
        self.setters.append("libxl")

    async def memory(self, name: str) -> MemoryInfo:
        self.advance()
        info = await super().memory(name)
        reported = self.xenstore.get(name, {}).get(DATA_MEMINFO)
        return MemoryInfo(
            actual_mib=info.actual_mib,
            target_mib=self.xen_targets.get(name, info.target_mib),
            maxmem_mib=info.maxmem_mib,
            used_mib=int(reported) // 1024 if reported else None,
        )

    async def free_memory_mib(self) -> int:
        self.advance()
        return self.free_mib()
