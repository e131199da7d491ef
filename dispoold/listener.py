"""The daemon's listening socket: handed over by systemd, or made here with the
configured mode and group.

A socket made here never exists with looser permissions than configured: it is bound
under a temporary name with a umask that leaves it private, given its group and mode,
and only then renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import logging
import os
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from dispoold.config import ConfigError, DaemonSettings
from dispoold.systemd import is_listening_unix_stream, listen_fds

#: sockaddr_un's sun_path is 108 bytes, including the terminating NUL.
MAX_SOCKET_PATH = 107
BACKLOG = 128


class ListenerError(Exception):
    """The socket cannot be had; the message says why and what to do."""


@dataclass
class Listener:
    sock: socket.socket
    path: Path
    #: The socket file's inode when this daemon made it (and so removes it at exit);
    #: None when systemd passed it.
    inode: int | None

    def close(self) -> None:
        if self.inode is not None:
            # Only if the file is still ours: a new daemon may have taken the path over.
            with contextlib.suppress(OSError):
                if self.path.lstat().st_ino == self.inode:
                    self.path.unlink()
        self.sock.close()


def resolve_group(settings: DaemonSettings, config_path: Path | str) -> int | None:
    """The gid of ``daemon.group``; None when it is empty (root only).

    Raises :class:`ConfigError` naming the field when no such group exists.
    """
    group = settings.group
    if not group:
        return None
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(
            config_path,
            f"daemon.group: no group named {group!r} on this host"
            ' (name an existing group, or "" to let only root connect)',
        ) from None


def open_listener(settings: DaemonSettings, gid: int | None, log: logging.Logger) -> Listener:
    """The socket to serve on: the one systemd passed (``dispoold.socket``), else a new
    one at ``daemon.socket``. Raises :class:`ListenerError`."""
    fds = listen_fds()
    if fds:
        return _activated(fds, settings, log)
    return _create(settings.socket, settings.socket_mode, gid, log)


def _activated(fds: list[int], settings: DaemonSettings, log: logging.Logger) -> Listener:
    if len(fds) != 1:
        raise ListenerError(f"systemd passed {len(fds)} sockets; dispoold.socket must have one")
    if not is_listening_unix_stream(fds[0]):
        raise ListenerError("the socket systemd passed is not a listening Unix stream socket")
    sock = socket.socket(fileno=fds[0])
    path = Path(sock.getsockname())
    if path != settings.socket:
        log.warning(
            "serving on %s from systemd; daemon.socket says %s (clients use that by default)",
            path,
            settings.socket,
        )
    sock.setblocking(False)
    return Listener(sock, path, inode=None)


def _create(path: Path, mode: int, gid: int | None, log: logging.Logger) -> Listener:
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    if len(os.fsencode(temporary)) > MAX_SOCKET_PATH:
        raise ListenerError(f"{path}: too long for a Unix socket path (daemon.socket)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise ListenerError(f"cannot create {path.parent}: {exc.strerror}") from None
    _clear_stale(path, log)
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(temporary))
        finally:
            os.umask(old_umask)
        os.chown(temporary, -1, gid if gid is not None else -1)
        os.chmod(temporary, mode)
        sock.listen(BACKLOG)
        os.rename(temporary, path)
        inode = path.lstat().st_ino
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise ListenerError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return Listener(sock, path, inode=inode)


def _clear_stale(path: Path, log: logging.Logger) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenerError(f"{path} exists and is not a socket; remove it or change daemon.socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ListenerError(f"cannot check {path}: {exc.strerror}") from None
    else:
        raise ListenerError(f"another dispoold is already listening on {path}")
    finally:
        probe.close()
    log.info("removing stale socket %s", path)
    path.unlink(missing_ok=True)
