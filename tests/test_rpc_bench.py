"""The RPC benchmark still runs (a smoke run: its figures are read, never asserted)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.daemon_harness import REPO, clean_env


def test_bench_rpc_runs_and_ends_with_a_json_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.bench_rpc", "--quick"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.splitlines()[-1])
    assert figures["bench"] == "rpc"
    for key in ("p50_ms", "p99_ms", "mean_ms"):
        assert figures["ping_round_trip"][key] > 0
        assert figures["handout_round_trip_full_pool"][key] > 0
    # Every hand-out was measured from a full pool, as the benchmark claims.
    assert figures["handout_round_trip_full_pool"]["origins"] == {"preload": 20}
    for key in ("ping_rps_1_connection", "ping_rps_16_connections"):
        assert figures[key] > 0
