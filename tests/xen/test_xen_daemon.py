"""The whole daemon in dom0, under systemd, on real Xen, with the lab's pool of 2.

    lab/labctl run -- /opt/dispoold/venv/bin/python -m pytest tests/xen -k xen_daemon

The lab installs ``units/`` into /etc/systemd/system, ``dispoold``/``dispoolctl`` into
/usr/local/bin and ``lab/dom0/dispoold.toml`` (template ``lab-dvm``, pool of 2) as
/etc/dispoold/dispoold.toml. Requests go through the socket with ``dispoolctl --json``.
The tests run in order and share the service; the module's clean-up stops it and
destroys every domain it left.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.xen.xen_fixtures import LOG, xl_names, xl_state

pytestmark = pytest.mark.xen

UNIT = "dispoold"
POOL = 2
#: The lab configuration's preferred_floor_mib and the default convergence_ratio.
SHRUNK_MIB = 96
CONVERGENCE = 1.1
#: A boot under emulation on a loaded host takes up to a few minutes.
FILL_TIMEOUT = 600.0


def ctl(*args: str) -> Any:
    result = subprocess.run(
        ["dispoolctl", "--json", *args], check=False, capture_output=True, text=True, timeout=900
    )
    if result.returncode != 0:
        raise AssertionError(f"dispoolctl {' '.join(args)}: {result.stdout} {result.stderr}")
    return json.loads(result.stdout) if result.stdout.strip() else None


def systemctl(*args: str, check: bool = True) -> str:
    result = subprocess.run(
        ["systemctl", *args], check=False, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        journal = subprocess.run(
            ["journalctl", "-b", "-u", UNIT, "--no-pager", "-n", "60"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout
        raise AssertionError(f"systemctl {' '.join(args)}: {result.stderr}\n{journal}")
    return result.stdout.strip()


def disposables() -> list[dict[str, Any]]:
    status = ctl("status")
    return [d for template in status["templates"] for d in template["disposables"]]


def by_stage(stage: str) -> set[str]:
    return {d["name"] for d in disposables() if d["stage"] == stage}


def paused_in_xen(names: set[str]) -> set[str]:
    return {name for name in names if "p" in (xl_state(name) or "")}


def wait_until(what: str, condition: Callable[[], bool], timeout: float = FILL_TIMEOUT) -> float:
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g} s: {what}\n{disposables()}")
        time.sleep(1)
    return time.monotonic() - start


def pool_full() -> bool:
    paused = by_stage("paused")
    return len(paused) == POOL and paused_in_xen(paused) == paused


def accounted() -> None:
    """Every domain in Xen is one the daemon knows about, and the other way round."""
    known = {d["name"] for d in disposables()}
    assert xl_names() == known, (xl_names(), disposables())


@pytest.fixture(scope="module")
def service() -> Iterator[None]:
    before = xl_names()
    systemctl("reset-failed", UNIT, check=False)
    systemctl("start", UNIT)  # Type=notify: returns once the daemon said READY
    try:
        yield
    finally:
        systemctl("stop", UNIT, check=False)
        # Paused preloads survive a stop on purpose (the next start adopts them); the
        # lab is thrown away, but leave it as found.
        for name in xl_names() - before:
            subprocess.run(["xl", "destroy", name], check=False, capture_output=True)


def test_ready_preloads_are_paused_and_shrunk(service: None) -> None:
    seconds = wait_until("2 paused preloads", pool_full)
    LOG.info("pool of %d filled %.1f s after the service started", POOL, seconds)
    accounted()
    # lab/dom0/dispoold.toml: 128 MiB guests, shrunk to the 96 MiB floor before the pause.
    for d in disposables():
        assert d["memory_mib"] <= SHRUNK_MIB * CONVERGENCE, d
        assert d["note"] is None, d  # no failed or given-up shrink


def test_request_returns_an_unpaused_disposable_and_the_pool_refills(service: None) -> None:
    wait_until("a full pool", pool_full)
    preloads = by_stage("paused")
    start = time.monotonic()
    handout = ctl("request")
    LOG.info("request answered in %.3f s: %s", time.monotonic() - start, handout)
    name = handout["name"]
    assert name in preloads
    assert handout["origin"] == "preload"
    state = xl_state(name)
    assert state is not None and "p" not in state
    seconds = wait_until("the refill", pool_full)
    LOG.info("refilled %.1f s after the hand-out", seconds)
    assert name not in by_stage("paused")
    assert name in xl_names()
    ctl("release", name)
    assert name not in xl_names()
    accounted()


def test_kill_mid_preload_then_restart_recovers(service: None) -> None:
    wait_until("a full pool", pool_full)
    handed = ctl("request")["name"]
    # The hand-out triggers a refill: catch a preload while it boots.
    wait_until(
        "a preload starting",
        lambda: any(d["stage"] in ("preload", "startup") for d in disposables()),
        timeout=120,
    )
    starting = {d["name"] for d in disposables() if d["stage"] in ("preload", "startup")}
    paused = by_stage("paused")
    pid = systemctl("show", "-p", "MainPID", "--value", UNIT)
    subprocess.run(["kill", "-9", pid], check=True)
    LOG.info("killed dispoold (pid %s) with %s starting, %s paused", pid, starting, paused)
    time.sleep(1)
    # Restart=on-failure brings it back; make sure it is up and answering.
    wait_until(
        "the daemon back", lambda: systemctl("is-active", UNIT, check=False) == "active", 120
    )
    wait_until("the socket answering", _answers, 120)
    # Paused preloads were adopted as they were; the half-started ones were destroyed.
    assert paused <= by_stage("paused")
    assert paused <= paused_in_xen(paused)
    for name in starting:
        assert name not in {d["name"] for d in disposables()} or name in by_stage("paused")
    # The handed-out disposable is still its caller's: it can be released.
    ctl("release", handed)
    assert handed not in xl_names()
    wait_until("a full pool after the restart", pool_full)
    for name in starting:
        if name not in by_stage("paused"):
            assert name not in xl_names()
    accounted()


def _answers() -> bool:
    try:
        ctl("ping")
    except AssertionError:
        return False
    return True
