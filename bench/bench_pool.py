"""Engine-only hand-out latency from a full pool, against the zero-latency test double.

What it measures is the engine's own cost per hand-out (choosing, journaling, events,
the double's instant unpause) on a real event loop with the journal on disk, at 1, 4 and
16 concurrent requests for pools of 1, 10 and 200. Requests beyond what the pool holds
fall back to fresh starts (instant in the double); the table says how many did.

    .venv/bin/python -m bench.bench_pool [--requests N]

Prints a table, then the figures as one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from dispoold.config import Config, MemorySettings
from dispoold.events import EventBus
from dispoold.journal import Journal
from dispoold.lifecycle import Stage
from dispoold.pool import Pool
from tests.doubles import FakeBackend, FakeMemory

LOG = logging.getLogger("bench")
POOL_SIZES = (1, 10, 200)
CONCURRENCY = (1, 4, 16)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def paused(pool: Pool) -> int:
    return sum(1 for d in pool.books if d.stage is Stage.PAUSED)


async def wait_full(pool: Pool, size: int) -> None:
    ready = pool.bus.subscribe(["preload-ready"])
    try:
        events = aiter(ready)
        while paused(pool) < size:
            await anext(events)
    finally:
        ready.close()


async def measure(size: int, concurrency: int, requests: int, state_dir: Path) -> dict[str, Any]:
    config = Config.model_validate(
        {
            "pool": {
                "default_dispvm": "dvm",
                "refill_delay": 3600,  # refills happen between rounds, not during them
                "max_concurrent_starts": 64,
                "refresh_check_interval": 3600,
            },
            "templates": {"dvm": {"preload_max": size, "memory": 100}},
        }
    )
    backend = FakeBackend({"host_mib": 1_000_000})
    await backend.open()
    journal = Journal(state_dir / f"journal-{size}-{concurrency}.sqlite", log=LOG)
    pool = Pool(
        config,
        backend=backend,
        memory=FakeMemory(MemorySettings(preferred_floor_mib=100), backend),
        journal=journal,
        bus=EventBus(),
        log=LOG,
    )
    await pool.start()
    latencies: list[float] = []
    fresh = 0

    async def one() -> str:
        nonlocal fresh
        started = time.perf_counter()
        handout = await pool.request("@dispvm")
        latencies.append((time.perf_counter() - started) * 1000)
        fresh += handout.origin == "fresh"
        return handout.name

    while len(latencies) < requests:
        await wait_full(pool, size)
        names = await asyncio.gather(*(one() for _ in range(concurrency)))
        for name in names:
            await pool.release(name)
        for queue in pool._queues.values():
            pool._schedule_fill(queue)
    await pool.stop(5)
    await backend.close()
    journal.close()
    return {
        "pool": size,
        "concurrency": concurrency,
        "requests": len(latencies),
        "fresh": fresh,
        "p50_ms": round(statistics.median(latencies), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
    }


async def main(requests: int) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory(prefix="dispoold-bench-", dir="/var/tmp") as tmp:
        for size in POOL_SIZES:
            for concurrency in CONCURRENCY:
                results.append(await measure(size, concurrency, requests, Path(tmp)))
                r = results[-1]
                print(
                    f"pool {size:>3}  concurrency {concurrency:>2}:"
                    f" p50 {r['p50_ms']:7.3f} ms  p99 {r['p99_ms']:7.3f} ms"
                    f"  ({r['requests']} requests, {r['fresh']} fresh)",
                    flush=True,
                )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="per configuration")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    figures = asyncio.run(main(args.requests))
    print(json.dumps({"bench": "pool", "results": figures}))
