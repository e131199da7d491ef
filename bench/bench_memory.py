"""Shrink before pause on real Xen: time from readiness to converged memory, and memory
reclaimed per preload, with the convergence ratio at 1.1 and at 1.15.

Runs in the Xen lab's dom0 (real balloon drivers):

    lab/labctl run -- /opt/dispoold/venv/bin/python bench/bench_memory.py

For each ratio it creates ``--preloads`` guests one after the other (each inside the
balancer's allocation, as the pool engine does), waits for readiness, then times
``Balancer.shrink``: readiness -> converged (or given up). A guest is destroyed before
the next one starts, so every shrink sees the same host. Prints one line per shrink and,
last, one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dispoold.backend import Backend, Marker, load_backend
from dispoold.config import MemorySettings, TemplateSettings
from dispoold.memory import Balancer

GUEST = Path("/var/lib/dispoold-lab/guest")
OWNER = "dispoold-bench-memory"


def template(memory: int) -> TemplateSettings:
    return TemplateSettings(
        kernel=GUEST / "vmlinuz",
        ramdisk=GUEST / "initrd.img",
        cmdline="console=hvc0 rdinit=/sbin/init quiet",
        memory=memory,
        maxmem=memory,
        vcpus=1,
    )


async def one(
    backend: Backend, balancer: Balancer, dispid: int, memory: int, ready_timeout: float
) -> dict[str, Any]:
    name = f"disp{dispid}"
    try:
        async with balancer.allocation(name, memory):
            await backend.create(name, template(memory), Marker(OWNER, "bench", dispid))
        await backend.wait_ready(name, ready_timeout)
        before = await backend.memory(name)
        started = time.monotonic()
        trace: list[tuple[float, int]] = []

        async def sample() -> None:
            while True:
                info = await backend.memory(name)
                trace.append((round(time.monotonic() - started, 1), info.actual_mib))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample())
        try:
            result = await balancer.shrink(name)
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        seconds = time.monotonic() - started
        # Paused as the engine would, then checked once more: a paused guest keeps what
        # it had (its balloon driver does not run) and is handed nothing.
        await backend.pause(name)
        balancer.exclude(name)
        await asyncio.sleep(1.0)
        paused = await backend.memory(name)
        return {
            "name": name,
            "used_mib": before.used_mib,
            "before_mib": before.actual_mib,
            "target_mib": result.target_mib,
            "actual_mib": result.actual_mib,
            "paused_mib": paused.actual_mib,
            "reclaimed_mib": before.actual_mib - paused.actual_mib,
            "converged": result.converged,
            "seconds": round(seconds, 3),
            "trace": trace,
        }
    finally:
        await backend.destroy(name)
        balancer.forget(name)


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs]
    reclaimed = [r["reclaimed_mib"] for r in runs]
    return {
        "preloads": len(runs),
        "converged": sum(r["converged"] for r in runs),
        "seconds_mean": round(statistics.mean(seconds), 3) if seconds else None,
        "seconds_max": round(max(seconds), 3) if seconds else None,
        "reclaimed_mib_mean": round(statistics.mean(reclaimed), 1) if reclaimed else None,
        "paused_over_target_max": max(
            (round(r["paused_mib"] / r["target_mib"], 3) for r in runs), default=None
        ),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    backend = load_backend("xen", {})
    await backend.open()
    figures: dict[str, Any] = {
        "memory_mib": args.memory,
        "floor_mib": args.floor,
        "check_period": args.check_period,
        "check_mib_s": args.check_mib_s,
        "window_s": args.window,
        "free_mib_at_start": await backend.free_memory_mib(),
    }
    try:
        dispid = 9000
        for ratio in args.ratios:
            settings = MemorySettings(
                manager="balancer",
                convergence_ratio=ratio,
                preferred_floor_mib=args.floor,
                check_period=args.check_period,
                check_mib_s=args.check_mib_s,
                check_window=args.window,
            )
            balancer = Balancer(settings, backend)
            await balancer.open()
            runs = []
            for _ in range(args.preloads):
                dispid += 1
                run = await one(backend, balancer, dispid, args.memory, args.ready_timeout)
                print(f"ratio {ratio}: {json.dumps(run)}", flush=True)
                runs.append(run)
            await balancer.close()
            figures[f"ratio_{ratio}"] = summary(runs)
    finally:
        await backend.close()
    return figures


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preloads", type=int, default=4, help="shrinks per ratio (default 4)")
    p.add_argument("--memory", type=int, default=256, help="guest MiB (default 256)")
    p.add_argument("--floor", type=int, default=96, help="preferred floor MiB (default 96)")
    p.add_argument("--ratios", type=float, nargs="+", default=[1.1, 1.15])
    p.add_argument("--ready-timeout", type=float, default=240.0)
    # qmemman's give-up rule by default; balloons under emulation are far slower.
    p.add_argument("--check-period", type=float, default=3.0)
    p.add_argument("--check-mib-s", type=int, default=100)
    p.add_argument("--window", type=float, default=1.0, help="seconds the rate is taken over")
    return p.parse_args(argv)


if __name__ == "__main__":
    result = asyncio.run(main(parse_args(sys.argv[1:])))
    print(json.dumps({"bench": "memory", **result}), flush=True)
