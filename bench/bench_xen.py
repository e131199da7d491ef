"""Benchmark of the Xen backend and of hand-outs from a preload pool, on real Xen.

    lab/labctl run -- /opt/dispoold/venv/bin/python bench/bench_xen.py

Shaped like Qubes' own harness for preloaded disposables: 4 preloads, 4 concurrent
callers, at least 12 iterations, sequential and concurrent. Measured in one run:

- ``fresh``: a fresh start, create + boot until the guest reports ready (what a request
  costs without a preload);
- ``raw``: libxl_domain_pause / libxl_domain_unpause themselves, timed around the C call;
- ``backend``: XenBackend.pause / unpause (thread hop, identity and paused-flag checks);
- ``contended``: XenBackend.unpause while another domain is being built, with one
  shared libxl context and with a separate one for quick operations;
- ``handout``: the pool engine's request() until the disposable runs unpaused, from a
  preload (sequential: one caller; concurrent: 4 callers), with the time each caller
  waited for a preload to be available reported apart.

The last line of output is one JSON object with every figure (seconds unless named _ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from dispoold.backend import Marker
from dispoold.config import Config, TemplateSettings
from dispoold.events import EventBus
from dispoold.journal import Journal
from dispoold.memory import Balancer
from dispoold.pool import Pool
from dispoold.xen.backend import XenBackend

GUEST = Path("/var/lib/dispoold-lab/guest")
OWNER = "dispoold-bench"
POOL_OWNER = "dispoold-bench-pool"
READY_TIMEOUT = 300.0
LOG = logging.getLogger("dispoold.bench")


def template(**changes: Any) -> TemplateSettings:
    settings: dict[str, Any] = {
        "kernel": GUEST / "vmlinuz",
        "ramdisk": GUEST / "initrd.img",
        "cmdline": "console=hvc0 rdinit=/sbin/init quiet",
        "memory": 128,
        "maxmem": 256,
        "vcpus": 1,
    }
    settings.update(changes)
    return TemplateSettings.model_validate(settings)


def summary(samples: list[float], scale: float = 1.0) -> dict[str, float | int]:
    """n, mean, p50, p99 (nearest rank), min, max; ``scale`` converts units."""
    if not samples:
        return {"n": 0}
    ordered = sorted(s * scale for s in samples)

    def rank(p: float) -> float:
        return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]

    return {
        "n": len(ordered),
        "mean": round(statistics.fmean(ordered), 3),
        "p50": round(rank(50), 3),
        "p99": round(rank(99), 3),
        "min": round(ordered[0], 3),
        "max": round(ordered[-1], 3),
    }


def say(text: str) -> None:
    print(text, flush=True)


# == backend level ======================================================================


async def fresh_starts(backend: XenBackend, count: int, first_dispid: int) -> dict[str, Any]:
    creates, readies, totals, destroys = [], [], [], []
    names = []
    for i in range(count):
        name = f"disp{first_dispid + i}"
        start = time.perf_counter()
        await backend.create(name, template(), Marker(OWNER, "bench", first_dispid + i))
        created = time.perf_counter()
        await backend.wait_ready(name, READY_TIMEOUT)
        ready = time.perf_counter()
        creates.append(created - start)
        readies.append(ready - created)
        totals.append(ready - start)
        names.append(name)
        say(f"fresh start {name}: create {created - start:.2f} s, ready {ready - created:.2f} s")
    # Keep the first for the pause/unpause measurements; destroy the others now.
    for name in names[1:]:
        start = time.perf_counter()
        await backend.destroy(name)
        destroys.append(time.perf_counter() - start)
    return {
        "create_s": summary(creates),
        "ready_after_create_s": summary(readies),
        "create_to_ready_s": summary(totals),
        "destroy_s": summary(destroys),
        "kept": names[0],
    }


async def raw_libxl(backend: XenBackend, name: str, cycles: int) -> dict[str, Any]:
    info = await backend.domain_info(name)
    if info is None:
        raise SystemExit(f"{name} vanished")
    xl = backend._xl_ctl  # the bench measures libxl itself, below the backend
    if xl is None:
        raise SystemExit("backend not open")

    def measure() -> tuple[list[float], list[float]]:
        pauses, unpauses = [], []
        for _ in range(cycles):
            start = time.perf_counter()
            xl.pause(info.domid)
            pauses.append(time.perf_counter() - start)
            start = time.perf_counter()
            xl.unpause(info.domid)
            unpauses.append(time.perf_counter() - start)
        return pauses, unpauses

    pauses, unpauses = await asyncio.to_thread(measure)
    return {"pause_ms": summary(pauses, 1e3), "unpause_ms": summary(unpauses, 1e3)}


async def backend_cycles(backend: XenBackend, name: str, cycles: int) -> dict[str, Any]:
    pauses, unpauses = [], []
    for _ in range(cycles):
        start = time.perf_counter()
        await backend.pause(name)
        pauses.append(time.perf_counter() - start)
        start = time.perf_counter()
        await backend.unpause(name)
        unpauses.append(time.perf_counter() - start)
    return {"pause_ms": summary(pauses, 1e3), "unpause_ms": summary(unpauses, 1e3)}


async def contended(backend: XenBackend, name: str, dispid: int) -> dict[str, Any]:
    """Unpause latency on ``name`` while ``backend`` builds another domain."""
    other = f"disp{dispid}"
    building = asyncio.create_task(
        backend.create(other, template(), Marker(OWNER, "bench", dispid))
    )
    unpauses: list[float] = []
    try:
        while not building.done():
            await backend.pause(name)
            start = time.perf_counter()
            await backend.unpause(name)
            unpauses.append(time.perf_counter() - start)
            await asyncio.sleep(0.05)
        await building
    finally:
        await backend.destroy(other)
    return {"unpause_ms": summary(unpauses, 1e3)}


# == hand-outs from the pool ============================================================


def pool_config(preloads: int) -> Config:
    return Config.model_validate(
        {
            "daemon": {"instance": POOL_OWNER},
            "memory": {"manager": "balancer", "preferred_floor_mib": 96},
            "pool": {
                "default_dispvm": "bench",
                "max_concurrent_starts": 2,
                "refill_delay": 1.0,
                "startup_timeout": READY_TIMEOUT,
                "request_timeout": 3 * READY_TIMEOUT,
                "refresh_check_interval": 3600.0,
            },
            "templates": {"bench": {**template().model_dump(), "preload_max": preloads}},
        }
    )


class Preloads:
    """Counts paused preloads, and lets a caller claim one before it asks, so that
    concurrent callers never race for the same one (waiting is measured apart)."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.claimed = 0

    def paused(self) -> int:
        (entry,) = self.pool.status("bench").templates
        return sum(1 for d in entry.disposables if d.stage == "paused")

    async def claim(self, timeout: float) -> float:
        start = time.perf_counter()
        async with asyncio.timeout(timeout):
            while self.paused() - self.claimed <= 0:  # noqa: ASYNC110 (polls the engine's books)
                await asyncio.sleep(0.05)
        self.claimed += 1
        return time.perf_counter() - start

    def done(self) -> None:
        self.claimed -= 1


async def handouts(pool: Pool, preloads: Preloads, callers: int, requests: int) -> dict[str, Any]:
    latencies: list[float] = []
    waits: list[float] = []
    releases: list[float] = []
    origins: dict[str, int] = {}
    per_caller = math.ceil(requests / callers)

    async def caller(index: int) -> None:
        for _ in range(per_caller):
            waits.append(await preloads.claim(3 * READY_TIMEOUT))
            start = time.perf_counter()
            try:
                handout = await pool.request()
            finally:
                preloads.done()
            latencies.append(time.perf_counter() - start)
            origins[handout.origin] = origins.get(handout.origin, 0) + 1
            start = time.perf_counter()
            await pool.release(handout.name)
            releases.append(time.perf_counter() - start)

    await asyncio.gather(*(caller(i) for i in range(callers)))
    return {
        "callers": callers,
        "requests": len(latencies),
        "origins": origins,
        "handout_ms": summary(latencies, 1e3),
        "wait_for_preload_s": summary(waits),
        "release_s": summary(releases),
    }


async def wait_full(preloads: Preloads, wanted: int, timeout: float) -> float:
    start = time.perf_counter()
    async with asyncio.timeout(timeout):
        while preloads.paused() < wanted:  # noqa: ASYNC110 (polls the engine's books)
            await asyncio.sleep(0.2)
    return time.perf_counter() - start


async def pool_phase(args: argparse.Namespace, state_dir: Path) -> dict[str, Any]:
    config = pool_config(args.preloads)
    backend = XenBackend({})
    await backend.open()
    memory = Balancer(config.memory, backend)
    await memory.open()
    journal = Journal(state_dir / "journal.sqlite", log=LOG)
    pool = Pool(config, backend=backend, memory=memory, journal=journal, bus=EventBus(), log=LOG)
    result: dict[str, Any] = {"preloads": args.preloads}
    try:
        await pool.start()
        preloads = Preloads(pool)
        result["initial_fill_s"] = round(
            await wait_full(preloads, args.preloads, 4 * args.preloads * READY_TIMEOUT), 2
        )
        say(f"pool filled: {args.preloads} paused preloads in {result['initial_fill_s']} s")
        for mode, callers in (("sequential", 1), ("concurrent", args.callers)):
            await wait_full(preloads, args.preloads, 4 * args.preloads * READY_TIMEOUT)
            figures = await handouts(pool, preloads, callers, args.iterations)
            result[mode] = figures
            say(f"{mode}: {json.dumps(figures)}")
    finally:
        await pool.stop(drain=60)
        for info in await backend.list_owned(POOL_OWNER):
            await backend.destroy(info.name)
        await memory.close()
        journal.close()
        await backend.close()
    return result


# == main ===============================================================================


async def timed(label: str, step: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    say(f"== {label}")
    figures = await step()
    say(f"{label}: {json.dumps(figures)}")
    return figures


async def run(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"bench": "dispoold-xen", "argv": sys.argv[1:]}
    separate = XenBackend({"control_context": "separate"})
    shared = XenBackend({"control_context": "shared"})
    await separate.open()
    await shared.open()
    try:
        fresh = await timed("fresh", lambda: fresh_starts(separate, args.fresh, 9501))
        name = fresh.pop("kept")
        result["fresh"] = fresh
        result["raw"] = await timed("raw", lambda: raw_libxl(separate, name, args.cycles))
        result["backend"] = await timed(
            "backend", lambda: backend_cycles(separate, name, args.cycles)
        )
        if not args.skip_contended:
            await shared.list_owned(OWNER)  # adopts the kept domain
            result["contended_separate"] = await timed(
                "contended_separate", lambda: contended(separate, name, 9511)
            )
            result["contended_shared"] = await timed(
                "contended_shared", lambda: contended(shared, name, 9512)
            )
        start = time.perf_counter()
        await separate.destroy(name)
        result["fresh"]["destroy_kept_s"] = round(time.perf_counter() - start, 3)
    finally:
        for backend in (separate, shared):
            for info in await backend.list_owned(OWNER):
                await backend.destroy(info.name)
        await shared.close()
        await separate.close()
    if not args.skip_pool:
        with tempfile.TemporaryDirectory(prefix="dispoold-bench-") as tmp:
            result["pool"] = await pool_phase(args, Path(tmp))
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preloads", type=int, default=4)
    parser.add_argument("--callers", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=12, help="requests per mode")
    parser.add_argument("--fresh", type=int, default=3, help="fresh starts to time")
    parser.add_argument("--cycles", type=int, default=50, help="pause/unpause cycles")
    parser.add_argument("--skip-pool", action="store_true")
    parser.add_argument("--skip-contended", action="store_true")
    parser.add_argument("--json-out", type=Path, help="also write the JSON result here")
    args = parser.parse_args()
    if args.iterations < 12:
        parser.error("the harness's shape needs at least 12 iterations")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    result = asyncio.run(run(args))
    line = json.dumps(result, sort_keys=True)
    if args.json_out is not None:
        args.json_out.write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
