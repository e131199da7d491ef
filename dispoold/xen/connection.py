"""The process's connection to Xen, shared by every :class:`XenBackend` in it.

One libxl context per process (plus, optionally, a second one for quick operations: see
``control_context``), one xenstore connection for requests and one for watches. They are
opened once, on first use, and kept for the life of the process: libxl registers each
context in its process-wide SIGCHLD machinery, and libxenstore cancels a reader thread
when a watching connection is closed; a daemon has no reason to do either more than
once, and tests that "restart" a backend in one process then exercise exactly what the
daemon does after a restart: open a new backend on the same Xen.

The watch connection's file descriptor sits in the event loop of the backends using it
(one loop at a time); each fired watch goes to the callback registered for its token.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from dispoold.xen.libxl import Libxl
from dispoold.xen.xenstore import XenStore, XenStoreError

log = logging.getLogger("dispoold.xen")

#: Seconds between reaps while a create or destroy runs, and otherwise.
REAP_INTERVAL = 0.01
IDLE_REAP_INTERVAL = 1.0

_lock = threading.Lock()
#: The process's connection, once opened (a one-element list: no global statement).
_shared: list[XenConnection] = []


class XenConnection:
    def __init__(self, ffi: Any, lib: Any, log_level: str, sigchld: str = "mainloop") -> None:
        self._ffi = ffi
        self._lib = lib
        self._log_level = log_level
        self._mainloop = sigchld == "mainloop"
        self.build = Libxl(ffi, lib)
        self.xs = XenStore(ffi, lib)
        self.xs_watch = XenStore(ffi, lib)
        try:
            self.build.open(log_level, mainloop=self._mainloop)
            self.xs.open()
            self.xs_watch.open()
            self._fd = self.xs_watch.fileno()
        except BaseException:
            self.xs_watch.close()
            self.xs.close()
            self.build.close()
            raise
        self._control: Libxl | None = None
        self._teardown: Libxl | None = None
        self._busy = 0
        self._wake = threading.Event()
        if self._mainloop:
            threading.Thread(target=self._reap, name="dispoold-xen-reaper", daemon=True).start()
        self._handlers: dict[str, Callable[[str], None]] = {}
        self._tokens = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._users = 0

    def control(self) -> Libxl:
        """The second context, for quick operations (opened on first use)."""
        with _lock:
            if self._control is None:
                self._control = self._open_context()
            return self._control

    def teardown(self) -> Libxl:
        """The third context, for destroys (opened on first use): libxl holds a
        context's lock while it builds a domain, and a release must never wait seconds
        behind a refill's build (it did: 17-39 s in the lab with the build context)."""
        with _lock:
            if self._teardown is None:
                self._teardown = self._open_context()
            return self._teardown

    def _open_context(self) -> Libxl:
        context = Libxl(self._ffi, self._lib)
        context.open(self._log_level, mainloop=self._mainloop)
        return context

    # -- children (see "SIGCHLD" in dispoold.xen.libxl) ------------------------------

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Around a libxl call that may fork (create, destroy): reap often meanwhile."""
        with _lock:
            self._busy += 1
        self._wake.set()
        try:
            yield
        finally:
            with _lock:
                self._busy -= 1

    def _reap(self) -> None:
        while True:
            self._wake.wait(REAP_INTERVAL if self._busy else IDLE_REAP_INTERVAL)
            self._wake.clear()
            for xl in (self.build, self._control, self._teardown):
                if xl is not None:
                    try:
                        xl.sigchld_occurred()
                    except Exception:  # never let the reaper die
                        log.exception("libxl_childproc_sigchld_occurred failed")

    # -- watches (event-loop side) ----------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """A backend on ``loop`` starts using the watches."""
        if self._loop is not None and self._loop is not loop:
            raise RuntimeError("the Xen connection is in use by another event loop")
        if self._loop is None:
            loop.add_reader(self._fd, self._on_readable)
            self._loop = loop
        self._users += 1

    def detach(self) -> None:
        self._users -= 1
        if self._users <= 0 and self._loop is not None:
            self._loop.remove_reader(self._fd)
            self._loop = None
            self._users = 0

    def token(self, kind: str) -> str:
        return f"dispoold:{kind}:{next(self._tokens)}"

    def on_watch(self, token: str, handler: Callable[[str], None]) -> None:
        self._handlers[token] = handler

    def forget_watch(self, token: str) -> None:
        self._handlers.pop(token, None)

    def _on_readable(self) -> None:
        while True:
            try:
                fired = self.xs_watch.check_watch()
            except XenStoreError as exc:
                log.error("xenstore watch connection failed: %s", exc)
                if self._loop is not None:
                    self._loop.remove_reader(self._fd)
                    self._loop = None
                return
            if fired is None:
                return
            path, token = fired
            handler = self._handlers.get(token)
            if handler is not None:
                handler(path)


def connect(ffi: Any, lib: Any, log_level: str, sigchld: str = "mainloop") -> XenConnection:
    """The process's connection, opened on first call (blocking: call it in a thread).

    Raises :class:`~dispoold.xen.libxl.LibxlError`, :class:`XenStoreError` or
    RuntimeError when Xen cannot be used; a later call tries again.
    """
    with _lock:
        if not _shared:
            _shared.append(XenConnection(ffi, lib, log_level, sigchld))
        return _shared[0]
