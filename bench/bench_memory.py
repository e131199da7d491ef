"""Shrink before pause on real Xen: time from readiness to converged memory, and memory
reclaimed per preload, under dispoold's own balancer (with the convergence ratio at 1.1
and at 1.15) and under qmemman (the stand-in of tests/qmemman_standin.py as a process in
dom0, the qmemman client talking to it), in the same boot.

Runs in the Xen lab's dom0 (real balloon drivers):

    lab/labctl run -- /opt/dispoold/venv/bin/python bench/bench_memory.py

For each configuration it creates ``--preloads`` guests one after the other (each inside
the manager's allocation, as the pool engine does), waits for readiness (under qmemman:
until the guest has reported to memory/meminfo), then times ``shrink``: readiness ->
converged (or given up). A guest is destroyed before the next one starts, so every
shrink sees the same host. Prints one line per shrink and, last, one JSON line with the
figures.
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
from dispoold.memory import Balancer, MemoryManager, QmemmanClient
from tests.qmemman_standin import process_over_xen

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


async def reported(backend: Backend, name: str, timeout: float) -> None:
    """Until the guest has written its use to memory/meminfo (what qmemman reads)."""
    from tests.xen.xen_fixtures import xenstore

    info = await backend.domain_info(name)
    assert info is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if xenstore("read", f"/local/domain/{info.domid}/memory/meminfo").isdigit():
            await asyncio.sleep(2)  # and qmemman's watcher has recorded it
            return
        await asyncio.sleep(0.5)
    raise RuntimeError(f"{name} never reported to memory/meminfo")


async def one(
    backend: Backend, balancer: MemoryManager, dispid: int, memory: int, ready_timeout: float
) -> dict[str, Any]:
    name = f"disp{dispid}"
    try:
        async with balancer.allocation(name, memory):
            await backend.create(name, template(memory), Marker(OWNER, "bench", dispid))
        await backend.wait_ready(name, ready_timeout)
        if isinstance(balancer, QmemmanClient):
            await reported(backend, name, ready_timeout)
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
    """Means and extremes of one series of shrinks."""
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
    dispid = 9000

    async def series(manager: MemoryManager, label: str) -> None:
        nonlocal dispid
        await manager.open()
        runs = []
        try:
            for _ in range(args.preloads):
                dispid += 1
                run = await one(backend, manager, dispid, args.memory, args.ready_timeout)
                print(f"{label}: {json.dumps(run)}", flush=True)
                runs.append(run)
        finally:
            await manager.close()
        figures[label] = summary(runs)

    try:
        for ratio in args.ratios:
            settings = MemorySettings(
                manager="balancer",
                convergence_ratio=ratio,
                preferred_floor_mib=args.floor,
                check_period=args.check_period,
                check_mib_s=args.check_mib_s,
                check_window=args.window,
            )
            await series(Balancer(settings, backend), f"ratio_{ratio}")
        if args.qmemman:
            conf = f"[global]\nvm-min-mem = {args.qmemman_min_mem}\ncache-margin-factor = 1.3\n"
            async with process_over_xen(conf, fixed_11121=True) as qmemman:
                settings = MemorySettings(
                    manager="qmemman",
                    qmemman_socket=qmemman.socket,
                    qmemman_avail_file=qmemman.avail_file,
                    qmemman_config=qmemman.config,
                    qmemman_answer_timeout=120.0,
                    check_period=args.check_period,
                    check_mib_s=args.check_mib_s,
                    check_window=args.window,
                )
                figures["qmemman_vm_min_mem"] = args.qmemman_min_mem
                await series(QmemmanClient(settings, backend), "qmemman")
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
    p.add_argument("--no-qmemman", dest="qmemman", action="store_false", help="balancer only")
    p.add_argument(
        "--qmemman-min-mem", default="100M", help="qmemman's vm-min-mem (decimal M: 95.4 MiB)"
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    result = asyncio.run(main(parse_args(sys.argv[1:])))
    print(json.dumps({"bench": "memory", **result}), flush=True)
