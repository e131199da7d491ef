"""The daemon's socket face, measured through a real socket to a real ``dispoold`` process
(the pool engine over the zero-latency test double, journal on disk).

- ping round trip, one request at a time on one connection: p50, p99, mean;
- pings per second with many requests in flight, on one connection and on 16;
- hand-out round trip (``request`` -> reply) from a full pool, through the socket, then
  ``release``; each sample waits until the pool is full again.

Client and daemon are separate processes on the same (2-core) machine, so the figures
include both sides' Python. Speed targets are judged from these numbers, never asserted
in the timed tests.

    .venv/bin/python -m bench.bench_rpc [--quick]

Prints a table, then the figures as one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import msgpack

from dispoold.client import AsyncClient
from dispoold.protocol import HEADER
from tests.daemon_harness import DaemonProcess, config_text, short_tempdir

POOL_SIZE = 4


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in samples_s]
    return {
        "p50_ms": round(percentile(ms, 0.50), 4),
        "p99_ms": round(percentile(ms, 0.99), 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "n": len(ms),
    }


class Blocking:
    """The leanest possible client: one blocking socket, one frame at a time."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.next_id = 0

    def call(self, op: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "op": op}
        if args:
            message["args"] = args
        body = msgpack.packb(message)
        self.sock.sendall(HEADER.pack(len(body)) + body)
        (length,) = HEADER.unpack(self._read(HEADER.size))
        reply: dict[str, Any] = msgpack.unpackb(self._read(length))
        if not reply.get("ok"):
            raise RuntimeError(f"{op}: {reply}")
        return reply

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def ping_latency(path: Path, count: int) -> dict[str, float]:
    client = Blocking(path)
    for _ in range(200):  # warm-up
        client.call("ping")
    samples = []
    for _ in range(count):
        started = time.perf_counter()
        client.call("ping")
        samples.append(time.perf_counter() - started)
    client.close()
    return summary(samples)


async def ping_throughput(path: Path, connections: int, in_flight: int, seconds: float) -> float:
    """Pings per second, with ``in_flight`` outstanding on each of ``connections``."""
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(dispoold: AsyncClient) -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await dispoold.ping()
            done += 1

    clients = [AsyncClient(path) for _ in range(connections)]
    for c in clients:
        await c.connect()
    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    for c in clients:
        await c.close()
    return round(done / elapsed, 1)


def pool_full(client: Blocking) -> bool:
    status = client.call("status", {"template": "fedora-dvm"})["result"]
    disposables = status["templates"][0]["disposables"]
    return bool(sum(d["stage"] == "paused" for d in disposables) >= POOL_SIZE)


def handout_latency(path: Path, count: int) -> dict[str, Any]:
    client = Blocking(path)
    samples = []
    origins: dict[str, int] = {}
    for _ in range(count):
        deadline = time.monotonic() + 30
        while not pool_full(client):
            if time.monotonic() > deadline:
                raise RuntimeError("the pool did not refill")
            time.sleep(0.002)
        started = time.perf_counter()
        vm = client.call("request", {"target": "@dispvm:fedora-dvm"})["result"]
        samples.append(time.perf_counter() - started)
        origins[vm["origin"]] = origins.get(vm["origin"], 0) + 1
        client.call("release", {"name": vm["name"]})
    client.close()
    return {**summary(samples), "origins": origins}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few samples: a smoke run")
    args = parser.parse_args()
    pings, handouts, seconds = (300, 20, 0.5) if args.quick else (20000, 300, 3.0)

    directory = short_tempdir()
    templates = {"fedora-dvm": {"preload_max": POOL_SIZE, "memory": 400}}
    text = config_text(
        directory,
        daemon={"log_level": "warning"},
        templates=templates,
        backend_options={"never_ready": [], "fail_create": []},
    )
    try:
        with DaemonProcess(directory, config=text) as daemon:
            daemon.start().wait_serving()
            results: dict[str, Any] = {
                "ping_round_trip": ping_latency(daemon.socket_path, pings),
                "ping_rps_1_connection_sequential": 0.0,
                "ping_rps_1_connection": asyncio.run(
                    ping_throughput(daemon.socket_path, 1, 32, seconds)
                ),
                "ping_rps_16_connections": asyncio.run(
                    ping_throughput(daemon.socket_path, 16, 4, seconds)
                ),
                "handout_round_trip_full_pool": handout_latency(daemon.socket_path, handouts),
            }
            results["ping_rps_1_connection_sequential"] = round(
                1000 / results["ping_round_trip"]["mean_ms"], 1
            )
    finally:
        shutil.rmtree(directory, ignore_errors=True)

    ping = results["ping_round_trip"]
    handout = results["handout_round_trip_full_pool"]
    print(
        f"ping round trip (1 connection, 1 in flight): p50 {ping['p50_ms']:.3f} ms,"
        f" p99 {ping['p99_ms']:.3f} ms, mean {ping['mean_ms']:.3f} ms ({ping['n']} pings)"
    )
    print(f"pings/s, 1 connection, sequential:       {results['ping_rps_1_connection_sequential']}")
    print(f"pings/s, 1 connection, 32 in flight:     {results['ping_rps_1_connection']}")
    print(f"pings/s, 16 connections, 4 in flight:    {results['ping_rps_16_connections']}")
    print(
        f"hand-out from a full pool (request round trip): p50 {handout['p50_ms']:.3f} ms,"
        f" p99 {handout['p99_ms']:.3f} ms ({handout['n']} hand-outs, {handout['origins']})"
    )
    print(json.dumps({"bench": "rpc", **results}, sort_keys=True))


if __name__ == "__main__":
    main()
