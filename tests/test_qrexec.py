"""The qrexec service ``qubes.DispVMRequest``: its argument encoding, and the service
script run as qrexec would run it, against a real daemon."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispoold import qrexec
from dispoold.qrexec import ArgumentError, decode_argument, encode_target
from tests.daemon_harness import (
    REPO,
    DaemonProcess,
    RawConnection,
    clean_env,
    run_as,
    running_daemon,
)

SERVICE = REPO / "etc" / "qubes-rpc" / "qubes.DispVMRequest"


@pytest.mark.parametrize(
    ("argument", "target"),
    [
        ("", "@dispvm"),
        ("fedora-dvm", "@dispvm:fedora-dvm"),
        ("debian-12.dvm_x", "@dispvm:debian-12.dvm_x"),
        ("tag+web", "@dispvm:@tag:web"),
        ("tag+a.b-c_d", "@dispvm:@tag:a.b-c_d"),
        ("tag", "@dispvm:tag"),  # a template may well be called "tag"
    ],
)
def test_arguments_decode_to_targets_and_back(argument: str, target: str) -> None:
    assert decode_argument(argument) == target
    assert encode_target(target) == argument


@pytest.mark.parametrize(
    "argument",
    [
        "@dispvm",
        "@dispvm:x",
        "dispvm:x",
        "tag+",
        "tag+a+b",
        "tag+a:b",
        "-x",
        "1abc",
        "a" * 32,
        "x y",
        "x\n",
        "../etc",
        "tag+" + "a" * 65,
    ],
)
def test_anything_else_is_refused(argument: str) -> None:
    with pytest.raises(ArgumentError):
        decode_argument(argument)


@pytest.mark.parametrize("target", ["dispvm", "@dispvm:a:b", "@dispvm:@tag:a b", "work"])
def test_targets_qrexec_cannot_carry(target: str) -> None:
    with pytest.raises(ArgumentError):
        encode_target(target)


@given(st.text(alphabet="abcXYZ019_.-+:@ ", max_size=40))
def test_decoding_never_lets_anything_else_through(argument: str) -> None:
    try:
        target = decode_argument(argument)
    except ArgumentError:
        return
    assert target.startswith("@dispvm")
    assert encode_target(target) == argument
    assert ":" not in argument and "@" not in argument


# -- the service, run as qrexec runs it ------------------------------------------------


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as process:
        yield process


def service(daemon: DaemonProcess, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SERVICE)],
        env=clean_env(DISPOOLD_SOCKET=str(daemon.socket_path), **env),
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def template_of(daemon: DaemonProcess, name: str) -> str:
    with RawConnection(daemon.socket_path) as conn:
        status = conn.call({"id": 1, "op": "status"})["result"]
    for template in status["templates"]:
        if any(vm["name"] == name for vm in template["disposables"]):
            return str(template["name"])
    raise AssertionError(f"{name} is nowhere in {status}")


@pytest.mark.parametrize(
    ("env", "template"),
    [
        ({"QREXEC_REMOTE_DOMAIN": "work"}, "debian-dvm"),  # work's own default
        ({"QREXEC_REMOTE_DOMAIN": "work", "QREXEC_SERVICE_ARGUMENT": ""}, "debian-dvm"),
        ({"QREXEC_REMOTE_DOMAIN": "other", "QREXEC_SERVICE_ARGUMENT": ""}, "fedora-dvm"),
        ({"QREXEC_REMOTE_DOMAIN": "work", "QREXEC_SERVICE_ARGUMENT": "fedora-dvm"}, "fedora-dvm"),
        ({"QREXEC_REMOTE_DOMAIN": "work", "QREXEC_SERVICE_ARGUMENT": "tag+office"}, "debian-dvm"),
    ],
)
def test_the_service_prints_the_name_and_nothing_else(
    daemon: DaemonProcess, env: dict[str, str], template: str
) -> None:
    done = service(daemon, **env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    name = done.stdout.removesuffix("\n")
    assert done.stdout == f"{name}\n" and name.startswith("disp")
    assert template_of(daemon, name) == template


@pytest.mark.parametrize(
    ("env", "status", "words"),
    [
        ({}, 2, "QREXEC_REMOTE_DOMAIN"),
        ({"QREXEC_REMOTE_DOMAIN": "bad name"}, 2, "QREXEC_REMOTE_DOMAIN"),
        ({"QREXEC_REMOTE_DOMAIN": "work", "QREXEC_SERVICE_ARGUMENT": "@dispvm"}, 2, "tag+TAG"),
        ({"QREXEC_REMOTE_DOMAIN": "vault"}, 5, "vault has no default disposable template"),
        (
            {"QREXEC_REMOTE_DOMAIN": "work", "QREXEC_SERVICE_ARGUMENT": "nope"},
            5,
            "no_such_template",
        ),
        (
            {"QREXEC_REMOTE_DOMAIN": "work", "QREXEC_SERVICE_ARGUMENT": "plain"},
            5,
            "not a disposable",
        ),
        ({"QREXEC_REMOTE_DOMAIN": "work", "QREXEC_SERVICE_ARGUMENT": "huge"}, 6, "no_memory"),
    ],
)
def test_the_service_fails_clearly(
    daemon: DaemonProcess, env: dict[str, str], status: int, words: str
) -> None:
    done = service(daemon, **env)
    assert done.returncode == status, done
    assert done.stdout == ""
    assert words in done.stderr
    assert done.stderr.startswith("qubes.DispVMRequest: ")


def test_the_service_when_the_daemon_is_not_running(daemon: DaemonProcess) -> None:
    done = subprocess.run(
        [sys.executable, str(SERVICE)],
        env=clean_env(DISPOOLD_SOCKET="/nonexistent/d.sock", QREXEC_REMOTE_DOMAIN="work"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 3
    assert "dispoold is not running" in done.stderr


def test_the_service_as_a_user_outside_the_group() -> None:
    with running_daemon(daemon={"group": "daemon", "socket_mode": 0o666}) as daemon:

        def ask() -> Any:
            out, err = io.StringIO(), io.StringIO()
            environ = {"QREXEC_REMOTE_DOMAIN": "work", "DISPOOLD_SOCKET": str(daemon.socket_path)}
            status = qrexec.main(environ, out=out, err=err)
            return [status, out.getvalue(), err.getvalue()]

        status, out, err = run_as(65534, 65534, [], ask)
    assert status == 4 and out == ""
    assert "unauthorized" in err
