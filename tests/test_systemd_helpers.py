"""dispoold.systemd and dispoold.listener without systemd: what they read from the
environment, and how the socket is made."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispoold import systemd
from dispoold.config import ConfigError, DaemonSettings
from dispoold.listener import ListenerError, open_listener, resolve_group
from tests.daemon_harness import short_tempdir

LOG = logging.getLogger("test.systemd")


@pytest.fixture
def directory() -> Iterator[Path]:
    path = short_tempdir()  # short enough for a socket path
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_watchdog_interval_is_half_the_period(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    for value in ("", "0", "soon"):
        monkeypatch.setenv("WATCHDOG_USEC", value)
        assert systemd.watchdog_interval() is None


def test_listen_fds_only_for_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    assert systemd.listen_fds() == [3, 4]
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", "1")
    assert systemd.listen_fds() == []


def test_journal_logging_when_stderr_is_the_journal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    st = os.fstat(sys.stderr.fileno())
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert systemd.journald_wanted()
    handler = systemd.log_handler("dispoold")
    assert type(handler).__name__ == "JournalHandler"
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino + 1}")  # a child's stderr
    assert not systemd.journald_wanted()
    assert isinstance(systemd.log_handler("dispoold"), logging.StreamHandler)


def test_invocation_id_alone_needs_the_journal_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")
    monkeypatch.setattr(systemd, "JOURNAL_SOCKET", Path("/nonexistent/journal/socket"))
    assert not systemd.journald_wanted()
    monkeypatch.setattr(systemd, "JOURNAL_SOCKET", Path(__file__))
    assert systemd.journald_wanted()


def test_notifier_is_silent_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = systemd.Notifier(LOG)
    assert not notifier.enabled
    notifier.ready("x")  # nothing to send to, nothing raised


def test_notifier_sends_status_only_when_it_changes(
    monkeypatch: pytest.MonkeyPatch, directory: Path
) -> None:
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(directory / "notify"))
    receiver.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(directory / "notify"))
    notifier = systemd.Notifier(LOG)
    notifier.ready("1/2 preloaded")
    notifier.status("1/2 preloaded")
    notifier.status("2/2 preloaded")
    notifier.stopping("stopping")
    messages = [receiver.recv(4096).decode() for _ in range(3)]
    receiver.close()
    assert messages[0].startswith("READY=1\nSTATUS=1/2 preloaded\nMAINPID=")
    assert messages[1] == "STATUS=2/2 preloaded"
    assert messages[2] == "STOPPING=1\nSTATUS=stopping"


def test_groups_resolve_or_name_the_field() -> None:
    assert resolve_group(DaemonSettings(group="daemon"), "f.toml") == 1
    assert resolve_group(DaemonSettings(group="4242"), "f.toml") == 4242
    assert resolve_group(DaemonSettings(group=""), "f.toml") is None
    with pytest.raises(ConfigError, match=r"f\.toml: daemon\.group: no group named 'nope'"):
        resolve_group(DaemonSettings(group="nope"), "f.toml")


def test_the_socket_is_made_with_its_mode_and_group(
    monkeypatch: pytest.MonkeyPatch, directory: Path
) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    path = directory / "sub" / "d.sock"
    listener = open_listener(DaemonSettings(socket=path, socket_mode=0o640), 1, LOG)
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_gid == 1
    assert [p.name for p in path.parent.iterdir()] == ["d.sock"]  # no temporary left
    with pytest.raises(ListenerError, match="already listening"):
        open_listener(DaemonSettings(socket=path), None, LOG)
    listener.close()
    assert not path.exists()


def test_socket_paths_that_cannot_work(monkeypatch: pytest.MonkeyPatch, directory: Path) -> None:
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    with pytest.raises(ListenerError, match="too long"):
        open_listener(DaemonSettings(socket=directory / ("x" * 120)), None, LOG)
    (directory / "file").write_text("")
    with pytest.raises(ListenerError, match="not a socket"):
        open_listener(DaemonSettings(socket=directory / "file"), None, LOG)
