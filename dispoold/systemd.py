"""What dispoold does differently under systemd: readiness and status notifications, the
watchdog, socket activation and logging to the journal.

Everything here is a no-op when the daemon is not run by systemd (no ``NOTIFY_SOCKET``,
no ``LISTEN_FDS``), so the same daemon runs from a shell for development.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path
from typing import Any

try:
    from systemd import daemon as _sd_daemon
    from systemd import journal as _sd_journal
except ImportError:  # pragma: no cover (systemd-python is a dependency; a broken install)
    _sd_daemon = None
    _sd_journal = None

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


class Notifier:
    """sd_notify(3): tells systemd about readiness, status, watchdog and stopping."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._last_status: str | None = None

    def notify(self, *fields: str) -> None:
        if not self.enabled:
            return
        message = "\n".join(fields)
        try:
            if _sd_daemon is not None:
                _sd_daemon.notify(message)
            else:  # pragma: no cover
                _notify_socket(message)
        except OSError as exc:
            self.log.warning("cannot notify systemd (%s): %s", message.splitlines()[0], exc)

    def ready(self, status: str) -> None:
        self._last_status = status
        self.notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def status(self, status: str) -> None:
        """Send STATUS= when it changed since the last one."""
        if status != self._last_status:
            self._last_status = status
            self.notify(f"STATUS={status}")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def stopping(self, status: str) -> None:
        self._last_status = status
        self.notify("STOPPING=1", f"STATUS={status}")


def _notify_socket(message: str) -> None:  # pragma: no cover (only without systemd-python)
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), address)


def watchdog_interval() -> float | None:
    """How often to send WATCHDOG=1 (half of ``WATCHDOG_USEC``), or None when systemd
    does not watch this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2 / 1_000_000


def listen_fds() -> list[int]:
    """File descriptors passed by socket activation (``LISTEN_FDS``) for this process,
    empty when there are none (sd_listen_fds(3)). The variables are removed so that
    children don't inherit them."""
    fds: list[int] = [] if _sd_daemon is None else _sd_daemon.listen_fds(unset_environment=True)
    # libsystemd unsets them in the C environment only; Python hands os.environ (its
    # own copy) to the children it starts.
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    return fds


def is_listening_unix_stream(fd: int) -> bool:
    """``fd`` is a listening Unix stream socket (sd_is_socket_unix(3))."""
    if _sd_daemon is None:  # pragma: no cover
        return False
    return bool(_sd_daemon.is_socket_unix(fd, socket.SOCK_STREAM, 1))


def journald_wanted() -> bool:
    """True when stderr goes to the journal (``JOURNAL_STREAM`` names it), or when run
    as a systemd unit (``INVOCATION_ID``) on a host whose journal socket exists."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    if stream:
        try:
            st = os.fstat(sys.stderr.fileno())
        except (OSError, ValueError):
            pass
        else:
            if stream == f"{st.st_dev}:{st.st_ino}":
                return _sd_journal is not None
    return (
        bool(os.environ.get("INVOCATION_ID"))
        and JOURNAL_SOCKET.exists()
        and (_sd_journal is not None)
    )


def log_handler(identifier: str) -> logging.Handler:
    """A handler for the journal when :func:`journald_wanted`, else for stderr."""
    if journald_wanted() and _sd_journal is not None:
        handler: Any = _sd_journal.JournalHandler(SYSLOG_IDENTIFIER=identifier)
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler  # type: ignore[no-any-return]
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return stderr
