"""The files that install dispoold: systemd units, sample configuration, qrexec service and
policy, suspend hook. They are checked by the tools that will read them."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from dispoold.config import DaemonSettings, load
from dispoold.qrexec import decode_argument
from tests.daemon_harness import REPO

UNITS = REPO / "units"
SERVICE = UNITS / "dispoold.service"
SOCKET = UNITS / "dispoold.socket"


def systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail(
            "systemd-analyze is not installed: the units cannot be verified."
            " Install Debian's 'systemd' package (the test setup script does)."
        )
    return tool


def unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value (systemd allows a key more than once)."""
    sections: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        sections[section][key.strip()].append(value.strip())
    return sections


def verify(directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            systemd_analyze(),
            "verify",
            "--man=no",
            str(directory / "dispoold.service"),
            str(directory / "dispoold.socket"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def installable_copy(directory: Path, service_text: str | None = None) -> Path:
    """The units as they would be installed. ``systemd-analyze verify`` checks that
    ExecStart= exists: where dispoold is not installed in /usr/local/bin, the copy
    points at this checkout's entry point instead (nothing else changes)."""
    text = SERVICE.read_text() if service_text is None else service_text
    if not Path("/usr/local/bin/dispoold").exists():
        entry = Path(sys.executable).parent / "dispoold"
        assert entry.exists(), f"the dispoold entry point is not installed at {entry}"
        text = text.replace("ExecStart=/usr/local/bin/dispoold", f"ExecStart={entry}")
    (directory / "dispoold.service").write_text(text)
    shutil.copy(SOCKET, directory / "dispoold.socket")
    return directory


def accepted(done: subprocess.CompletedProcess[str]) -> bool:
    # verify exits 0 on settings it ignores; it says so on stderr, naming the unit.
    return done.returncode == 0 and "dispoold" not in done.stderr


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    done = verify(installable_copy(tmp_path))
    assert accepted(done), done.stderr + done.stdout


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("Type=notify", "Type=notifyy"),
        ("ProtectSystem=full", "ProtectSystem=fully"),
        ("[Service]", "[Service]\nExecStartPre=/nonexistent/prepare"),
    ],
)
def test_systemd_analyze_verify_would_catch_a_broken_unit(
    tmp_path: Path, old: str, new: str
) -> None:
    # The check above is only worth something if it does fail on a bad unit.
    broken = SERVICE.read_text().replace(old, new, 1)
    assert broken != SERVICE.read_text()
    assert not accepted(verify(installable_copy(tmp_path, broken)))


def test_the_service_is_what_the_daemon_expects() -> None:
    service = unit(SERVICE)
    s, u = service["Service"], service["Unit"]
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert s["ExecStart"] == ["/usr/local/bin/dispoold"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["Restart"] == ["on-failure"]
    assert "78" in s["RestartPreventExitStatus"][0].split()  # dispoold.daemon.EXIT_CONFIG
    assert s["WatchdogSec"]
    assert s["StateDirectory"] == ["dispoold"] and s["RuntimeDirectory"] == ["dispoold"]
    assert s["RuntimeDirectoryPreserve"] == ["yes"]  # the socket unit's socket lives there
    timeout = int(s["TimeoutStopSec"][0].removesuffix("s"))
    assert timeout > 2 * DaemonSettings().drain_timeout
    assert u["ConditionKernelCommandLine"] == ["!qubes.skip_autostart"]
    after = " ".join(u["After"]).split()
    for toolstack in ("xen.service", "xenstored.service", "xenconsoled.service", "qubesd.service"):
        assert toolstack in after
    # Soft dependencies only: a missing toolstack unit must not keep the daemon down.
    assert "Requires" not in u and "BindsTo" not in u


@pytest.mark.parametrize(
    "option",
    [
        "PrivateDevices",  # hides /dev/xen
        "DevicePolicy",
        "DeviceAllow",
        "ProtectClock",  # implies a device allow-list
        "MemoryDenyWriteExecute",  # cffi/libffi closures
        "PrivateNetwork",  # hotplug scripts
        "RestrictAddressFamilies",
        "CapabilityBoundingSet",
        "SystemCallFilter",
        "ProtectKernelTunables",
    ],
)
def test_no_hardening_that_breaks_libxl(option: str) -> None:
    assert option not in unit(SERVICE)["Service"]


def test_the_socket_unit_agrees_with_the_daemons_defaults() -> None:
    socket_unit = unit(SOCKET)["Socket"]
    defaults = DaemonSettings()
    assert socket_unit["ListenStream"] == [str(defaults.socket)]
    assert int(socket_unit["SocketMode"][0], 8) == defaults.socket_mode
    assert socket_unit["SocketGroup"] == [defaults.group]
    assert unit(SOCKET)["Unit"]["ConditionKernelCommandLine"] == ["!qubes.skip_autostart"]


# -- the sample configuration ---------------------------------------------------------


def test_the_sample_configuration_is_valid() -> None:
    config = load(REPO / "etc" / "dispoold.toml")
    assert config.pool.default_dispvm in config.templates


def test_every_documented_default_is_a_real_key_with_a_valid_value(tmp_path: Path) -> None:
    # Uncommenting every "#key = value" line must still give a valid file: the comments
    # name real keys, with values of the right type.
    text = (REPO / "etc" / "dispoold.toml").read_text()
    uncommented, count = re.subn(r"(?m)^#([a-z_]+ = )", r"\1", text)
    assert count >= 20
    path = tmp_path / "all.toml"
    path.write_text(uncommented)
    config = load(path)
    assert config.pool.threshold_mib == 0  # Qubes' preload-dispvm-threshold default


# -- qrexec ---------------------------------------------------------------------------


def test_the_qrexec_service_is_an_executable_python_script() -> None:
    service = REPO / "etc" / "qubes-rpc" / "qubes.DispVMRequest"
    assert service.stat().st_mode & stat.S_IXUSR
    text = service.read_text()
    assert text.startswith("#!/usr/bin/python3\n")
    compile(text, str(service), "exec")


def test_the_sample_policy_is_well_formed_and_allows_nothing_as_shipped() -> None:
    lines = (REPO / "etc" / "qubes-rpc" / "50-dispoold.policy").read_text().splitlines()
    active = [line.split() for line in lines if line.strip() and not line.startswith("#")]
    examples = [line[1:].split() for line in lines if line.startswith("#qubes.")]
    assert active == [["qubes.DispVMRequest", "*", "@anyvm", "@anyvm", "deny"]]
    assert len(examples) >= 3
    for service, argument, _source, target, action in examples:
        assert service == "qubes.DispVMRequest"
        assert argument.startswith("+")
        assert decode_argument(argument[1:]).startswith("@dispvm")
        assert target == "@adminvm" and action == "allow"


# -- the suspend hook -----------------------------------------------------------------

HOOK = REPO / "etc" / "systemd-sleep" / "dispoold"


def run_hook(tmp_path: Path, *args: str, ctl_status: int = 0) -> tuple[int, str]:
    record = tmp_path / "calls"
    fake = tmp_path / "dispoolctl"
    fake.write_text(f'#!/bin/sh\necho "$@" >> {record}\nexit {ctl_status}\n')
    fake.chmod(0o755)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DISPOOLCTL": str(fake)}
    done = subprocess.run(["sh", str(HOOK), *args], env=env, timeout=60, check=False)
    calls = record.read_text() if record.exists() else ""
    return done.returncode, calls


def test_the_suspend_hook_suspends_before_and_resumes_after(tmp_path: Path) -> None:
    assert HOOK.stat().st_mode & stat.S_IXUSR
    assert run_hook(tmp_path, "pre", "suspend") == (0, "suspend\n")
    assert run_hook(tmp_path, "post", "suspend") == (0, "suspend\nresume\n")


def test_the_suspend_hook_ignores_a_daemon_that_is_not_running(tmp_path: Path) -> None:
    assert run_hook(tmp_path, "pre", "hibernate", ctl_status=3)[0] == 0
    assert run_hook(tmp_path, "pre", "hibernate", ctl_status=4)[0] == 4


def test_the_suspend_hook_does_nothing_for_other_phases(tmp_path: Path) -> None:
    assert run_hook(tmp_path, "whatever") == (0, "")
