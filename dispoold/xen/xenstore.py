"""A thin, Pythonic layer over libxenstore.

Reads, writes and (un)watching are round trips to xenstored: the backend runs them in
worker threads. :meth:`XenStore.check_watch` never blocks (it takes an event that
libxenstore's reader thread has already queued), so the event loop calls it when
:meth:`XenStore.fileno` becomes readable: a watch costs no polling.
"""

from __future__ import annotations

import errno
import os
from typing import Any


class XenStoreError(OSError):
    """A xenstore request failed; ``errno`` says why (ENOENT: no such node)."""


class XenStore:
    def __init__(self, ffi: Any, lib: Any) -> None:
        self._ffi = ffi
        self._lib = lib
        self._handle: Any = None

    def open(self) -> None:
        handle = self._lib.xs_open(0)
        if handle == self._ffi.NULL:
            raise self._error("xs_open", "")
        self._handle = handle

    def close(self) -> None:
        if self._handle is not None:
            self._lib.xs_close(self._handle)
            self._handle = None

    def read(self, path: str) -> str | None:
        """The node's value, or None if it does not exist."""
        ffi, lib = self._ffi, self._lib
        length = ffi.new("unsigned int *")
        data = lib.xs_read(self._h(), lib.XBT_NULL, path.encode(), length)
        if data == ffi.NULL:
            if ffi.errno == errno.ENOENT:
                return None
            raise self._error("xs_read", path)
        try:
            return bytes(ffi.buffer(data, length[0])).decode(errors="replace")
        finally:
            lib.free(data)

    def write(self, path: str, value: str) -> None:
        raw = value.encode()
        if not self._lib.xs_write(self._h(), self._lib.XBT_NULL, path.encode(), raw, len(raw)):
            raise self._error("xs_write", path)

    def write_all(self, values: dict[str, str]) -> None:
        """Write several nodes in one transaction: the guest sees all of them or none
        (retried when xenstored reports a conflicting transaction, EAGAIN)."""
        lib = self._lib
        while True:
            transaction = lib.xs_transaction_start(self._h())
            if transaction == 0:
                raise self._error("xs_transaction_start", "")
            for path, value in values.items():
                raw = value.encode()
                if not lib.xs_write(self._h(), transaction, path.encode(), raw, len(raw)):
                    error = self._error("xs_write", path)
                    lib.xs_transaction_end(self._h(), transaction, True)
                    raise error
            if lib.xs_transaction_end(self._h(), transaction, False):
                return
            if self._ffi.errno != errno.EAGAIN:
                raise self._error("xs_transaction_end", "")

    def rm(self, path: str) -> None:
        """Remove a node and its children; a missing node is not an error."""
        removed = self._lib.xs_rm(self._h(), self._lib.XBT_NULL, path.encode())
        if not removed and self._ffi.errno != errno.ENOENT:
            raise self._error("xs_rm", path)

    def directory(self, path: str) -> list[str] | None:
        """The node's children, or None if it does not exist."""
        ffi, lib = self._ffi, self._lib
        count = ffi.new("unsigned int *")
        entries = lib.xs_directory(self._h(), lib.XBT_NULL, path.encode(), count)
        if entries == ffi.NULL:
            if ffi.errno == errno.ENOENT:
                return None
            raise self._error("xs_directory", path)
        try:
            return [ffi.string(entries[i]).decode(errors="replace") for i in range(count[0])]
        finally:
            lib.free(entries)

    def permissions(self, path: str) -> list[tuple[int, int]] | None:
        """``(domid, XS_PERM_* bits)`` pairs, the owner first; None if no such node."""
        ffi, lib = self._ffi, self._lib
        count = ffi.new("unsigned int *")
        perms = lib.xs_get_permissions(self._h(), lib.XBT_NULL, path.encode(), count)
        if perms == ffi.NULL:
            if ffi.errno == errno.ENOENT:
                return None
            raise self._error("xs_get_permissions", path)
        try:
            return [(int(perms[i].id), int(perms[i].perms)) for i in range(count[0])]
        finally:
            lib.free(perms)

    def set_permissions(self, path: str, permissions: list[tuple[int, int]]) -> None:
        """Set ``(domid, XS_PERM_* bits)`` pairs: the first names the owner (who may read
        and write) and gives everyone else's access; dom0 always has both."""
        ffi, lib = self._ffi, self._lib
        perms = ffi.new("struct xs_permissions[]", len(permissions))
        for i, (domid, bits) in enumerate(permissions):
            perms[i].id = domid
            perms[i].perms = bits
        if not lib.xs_set_permissions(
            self._h(), lib.XBT_NULL, path.encode(), perms, len(permissions)
        ):
            raise self._error("xs_set_permissions", path)

    def watch(self, path: str, token: str) -> None:
        """Watch ``path`` (and its children). xenstored fires once at once."""
        if not self._lib.xs_watch(self._h(), path.encode(), token.encode()):
            raise self._error("xs_watch", path)

    def unwatch(self, path: str, token: str) -> None:
        if not self._lib.xs_unwatch(self._h(), path.encode(), token.encode()):
            raise self._error("xs_unwatch", path)

    def fileno(self) -> int:
        fd = int(self._lib.xs_fileno(self._h()))
        if fd < 0:
            raise self._error("xs_fileno", "")
        return fd

    def check_watch(self) -> tuple[str, str] | None:
        """A fired watch as ``(path, token)``, or None when none is pending. Never blocks."""
        ffi, lib = self._ffi, self._lib
        event = lib.xs_check_watch(self._h())
        if event == ffi.NULL:
            if ffi.errno in (errno.EAGAIN, 0):
                return None
            raise self._error("xs_check_watch", "")
        try:
            path = ffi.string(event[lib.XS_WATCH_PATH]).decode(errors="replace")
            token = ffi.string(event[lib.XS_WATCH_TOKEN]).decode(errors="replace")
            return path, token
        finally:
            lib.free(event)

    def _h(self) -> Any:
        if self._handle is None:
            raise XenStoreError(errno.EBADF, "the xenstore connection is closed")
        return self._handle

    def _error(self, function: str, path: str) -> XenStoreError:
        code = self._ffi.errno or errno.EIO
        where = f" {path}" if path else ""
        return XenStoreError(code, f"{function}{where}: {os.strerror(code)}")
