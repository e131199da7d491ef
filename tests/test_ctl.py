"""``dispoolctl`` against a real daemon: output for people, --json for scripts, exit codes."""

from __future__ import annotations

import io
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dispoold import ctl
from dispoold.views import PoolView
from tests.daemon_harness import REPO, DaemonProcess, clean_env, run_as, running_daemon

DISPOOLCTL = Path(sys.executable).parent / "dispoolctl"


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as process:
        process.wait_until(
            lambda s: (
                sum(d["stage"] == "paused" for t in s["templates"] for d in t["disposables"]) == 2
            )
        )
        yield process


def run(daemon: DaemonProcess | None, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    socket_path = str(daemon.socket_path) if daemon else "/nonexistent/dispoold.sock"
    status = ctl.main(["--socket", socket_path, *argv], out=out, err=err)
    return status, out.getvalue(), err.getvalue()


def test_status_is_a_table(daemon: DaemonProcess) -> None:
    status, out, err = run(daemon, "status")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == [
        "TEMPLATE",
        "MAX",
        "GAP",
        "DISPOSABLE",
        "DOMID",
        "STAGE",
        "AGE",
        "MEMORY",
    ]
    fedora = [line for line in lines if line.startswith("fedora-dvm")]
    assert len(fedora) == 1 and fedora[0].split()[1:3] == ["2", "0"]
    assert "paused" in out
    assert any(line.startswith("memory") for line in lines)


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_goes_before_or_after_the_command(daemon: DaemonProcess, where: str) -> None:
    argv = (
        ["--json", "status", "fedora-dvm"]
        if where == "before"
        else ["status", "fedora-dvm", "--json"]
    )
    status, out, _ = run(daemon, *argv)
    assert status == 0
    result = json.loads(out)
    PoolView.model_validate(result)
    assert [t["name"] for t in result["templates"]] == ["fedora-dvm"]


def test_request_prints_the_name_and_release_confirms(daemon: DaemonProcess) -> None:
    status, out, _ = run(daemon, "request", "@dispvm:debian-dvm", "--source", "work")
    assert status == 0
    name = out.strip()
    assert out == f"{name}\n" and name.startswith("disp")
    assert run(daemon, "release", name) == (0, f"released {name}\n", "")


def test_request_with_json(daemon: DaemonProcess) -> None:
    status, out, _ = run(daemon, "--json", "request", "--paused", "--timeout", "30")
    assert status == 0
    vm = json.loads(out)
    assert vm["paused"] is True and vm["template"] == "fedora-dvm"
    assert run(daemon, "--json", "release", vm["name"]) == (0, "{}\n", "")


def test_ping(daemon: DaemonProcess) -> None:
    assert run(daemon, "ping") == (0, "dispoold 0.1.0, protocol 1\n", "")


@pytest.mark.parametrize(
    ("argv", "code", "words"),
    [
        (["request", "@dispvm:nope"], ctl.EXIT_NOT_FOUND, "no template named 'nope'"),
        (["request", "@dispvm:plain"], ctl.EXIT_NOT_FOUND, "not a disposable template"),
        (["release", "disp99999"], ctl.EXIT_NOT_FOUND, "not a handed-out disposable"),
        (["request", "@dispvm:huge"], ctl.EXIT_NO_MEMORY, "MiB"),
        (["request", "@dispvm:slow", "--timeout", "0.3"], ctl.EXIT_TIMEOUT, "within"),
        (["request", "@dispvm:broken"], ctl.EXIT_FAILED, "injected failure"),
        (["request", "work"], ctl.EXIT_FAILED, "expected @dispvm"),
        (["status", "nope"], ctl.EXIT_NOT_FOUND, "nope"),
    ],
)
def test_failures_have_their_exit_codes(
    daemon: DaemonProcess, argv: list[str], code: int, words: str
) -> None:
    status, out, err = run(daemon, *argv)
    assert status == code
    assert out == ""
    assert err.startswith("dispoolctl: ") and words in err


def test_failures_with_json(daemon: DaemonProcess) -> None:
    status, out, err = run(daemon, "--json", "request", "@dispvm:nope")
    assert status == ctl.EXIT_NOT_FOUND and err == ""
    assert json.loads(out)["error"]["code"] == "no_such_template"


def test_the_daemon_not_running() -> None:
    status, out, err = run(None, "status")
    assert status == ctl.EXIT_UNAVAILABLE
    assert "dispoold is not running (nothing listens on /nonexistent/dispoold.sock)" in err
    status, out, _ = run(None, "--json", "ping")
    assert status == ctl.EXIT_UNAVAILABLE
    assert json.loads(out)["error"]["code"] == "unavailable"


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        [],
        ["set-max", "lots"],
        ["set-max", "-1"],
        ["request", "--timeout", "0"],
        ["request", "--timeout", "nan"],
        ["watch", "no-such-event"],
    ],
)
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        ctl.main(["--socket", "/nonexistent", *argv])
    assert exited.value.code == ctl.EXIT_USAGE
    assert "usage: dispoolctl" in capsys.readouterr().err


def test_root_only_commands() -> None:
    with running_daemon() as daemon:
        assert run(daemon, "set-max", "3", "--template", "fedora-dvm") == (
            0,
            "max for fedora-dvm: 3\n",
            "",
        )
        daemon.wait_until(lambda s: _max(s, "fedora-dvm") == 3)
        assert run(daemon, "set-max", "unset", "--template", "fedora-dvm")[0] == 0
        daemon.wait_until(lambda s: _max(s, "fedora-dvm") == 2)
        assert run(daemon, "set-max", "unset") == (
            0,
            "max for the global value: override removed\n",
            "",
        )
        assert run(daemon, "set-threshold", "512") == (0, "threshold: 512 MiB\n", "")
        assert run(daemon, "--json", "set-threshold", "unset") == (0, "{}\n", "")
        assert run(daemon, "refresh", "fedora-dvm")[0] == 0
        assert run(daemon, "suspend") == (0, "preloads dropped for host suspend\n", "")
        assert run(daemon, "resume") == (0, "refilling after host resume\n", "")


def _max(status: dict[str, Any], name: str) -> int:
    return int(next(t["max"] for t in status["templates"] if t["name"] == name))


def test_root_only_commands_refused_to_others() -> None:
    with running_daemon(daemon={"group": "daemon", "socket_mode": 0o666}) as daemon:
        outcome = run_as(65534, 65534, [1], lambda: list(run(daemon, "set-max", "1")))
        member_status = run_as(65534, 65534, [1], lambda: run(daemon, "status")[0])
    status, out, err = outcome
    assert status == ctl.EXIT_NOT_ALLOWED and out == ""
    assert "set_max is for root; you are uid 65534" in err
    assert member_status == 0


def test_the_socket_refusing_a_user() -> None:
    with running_daemon(daemon={"group": "daemon", "socket_mode": 0o660}) as daemon:
        status, _, err = run_as(65534, 65534, [], lambda: list(run(daemon, "ping")))
    assert status == ctl.EXIT_NOT_ALLOWED
    assert "not allowed to connect" in err


def test_watch_prints_events_until_the_daemon_stops() -> None:
    with running_daemon(daemon={"drain_timeout": 0.3}) as daemon:
        watcher = subprocess.Popen(
            [str(DISPOOLCTL), "--socket", str(daemon.socket_path), "--json", "watch", "used"],
            cwd=REPO,
            env=clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            # The watcher subscribes at its own pace: use disposables until it reports one.
            assert watcher.stdout is not None
            printed = b""
            deadline = time.monotonic() + 20
            while b"\n" not in printed and time.monotonic() < deadline:
                status, out, _ = run(daemon, "request", "@dispvm:debian-dvm")
                assert status == 0
                run(daemon, "release", out.strip())
                if select.select([watcher.stdout], [], [], 0.2)[0]:
                    printed += os.read(watcher.stdout.fileno(), 65536)
            lines = printed.decode().splitlines()
            assert lines, "dispoolctl watch printed nothing"
            event = json.loads(lines[0])
            assert event["event"] == "used" and event["data"]["template"] == "debian-dvm"
            daemon.signal(signal.SIGTERM)
            rest, _ = watcher.communicate(timeout=20)
            assert watcher.returncode == ctl.EXIT_SHUTTING_DOWN
            last = json.loads((printed + rest).decode().splitlines()[-1])
            assert last["error"]["code"] == "shutting_down"
        finally:
            if watcher.poll() is None:
                watcher.kill()
            watcher.communicate()


def test_the_console_script_documents_its_exit_codes() -> None:
    done = subprocess.run(
        [str(DISPOOLCTL), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0
    assert "exit codes:" in done.stdout
    for code in ("3    the daemon is not running", "4    not allowed", "130  interrupted"):
        assert code in done.stdout


def test_the_memory_figures_read_as_words() -> None:
    lines = ctl.format_memory(
        {
            "manager": "balancer",
            "free_mib": 1748,
            "available_mib": 1700,
            "threshold_mib": 0,
            "domains": {"starting": 0, "excluded": 2, "included": 1},
            "shrinks": [
                {
                    "name": f"disp{n}",
                    "outcome": "converged",
                    "target_mib": 96,
                    "actual_mib": 97,
                    "seconds": 12.34,
                    "error": None,
                }
                for n in range(5)
            ]
            + [{"name": "disp9", "outcome": "failed", "seconds": None, "error": "gone"}],
            "last_error": "gone",
            "extra": 1,
        }
    )
    assert lines == [
        "memory (balancer): 1748 MiB free, 1700 MiB available, 0 MiB kept free (threshold)",
        "  domains: 0 starting, 2 excluded, 1 included",
        "  shrink disp3: converged in 12.3 s, 97 MiB (target 96 MiB)",
        "  shrink disp4: converged in 12.3 s, 97 MiB (target 96 MiB)",
        "  shrink disp9: failed: gone",
        "  last error: gone",
        "  extra=1",
    ]
    assert ctl.format_memory({"qmemman_reachable": False, "socket": "/q.sock"}) == [
        "memory: -",
        "  qmemman at /q.sock: NOT reachable",
    ]


def test_the_status_table_renders_ages_and_blanks() -> None:
    status = PoolView.model_validate(
        {
            "templates": [
                {"name": "empty", "max": 0, "threshold_gap": 0, "disposables": []},
                {
                    "name": "t",
                    "max": 2,
                    "threshold_gap": 1,
                    "disposables": [
                        {
                            "name": "disp1",
                            "domid": 7,
                            "stage": "paused",
                            "since": 1000.0,
                            "memory_mib": 410,
                            "origin": "preload",
                        },
                        {
                            "name": "disp2",
                            "domid": None,
                            "stage": "preload",
                            "since": 1000.0 - 3 * 3600,
                            "memory_mib": None,
                            "origin": "preload",
                        },
                    ],
                },
            ],
            "memory": {"free_mib": 100},
        }
    )
    text = ctl.format_status(status, now=1065.0)
    lines = text.splitlines()
    assert lines[1].split() == ["empty", "0", "0", "-"]
    assert lines[2].split() == ["t", "2", "1", "disp1", "7", "paused", "1m05s", "410", "MiB"]
    assert lines[3].split() == ["disp2", "-", "preload", "3h01m", "-"]
    assert lines[4] == "memory: 100 MiB free"
    assert [ctl.format_age(s) for s in (-1.0, 5.0, 86400 * 2 + 3600)] == ["-", "5s", "2d01h"]
