"""The ``dispoold`` entry point: startup -> serve -> shutdown.

Startup assembles the parts in order (configuration, socket, backend, memory manager,
journal, event bus, pool engine), and tells systemd ``READY=1`` only once the journal
has been replayed and the socket serves. A configuration error stops it before anything
has started; so does a socket, backend or memory manager that cannot be had.

While serving: ``STATUS=`` with the pool's figures, ``WATCHDOG=1`` at half the
watchdog period, SIGHUP reloads the configuration (a bad file is logged and the running
configuration kept). SIGTERM or SIGINT: stop accepting, give running requests
``daemon.drain_timeout`` seconds, cut the rest short (their callers hear
``shutting_down``; the log says which), stop the engine, exit 0.

Exit codes: 0 stopped on request; 1 the engine failed; 69 the socket, backend, memory
manager or journal cannot be had; 78 the configuration is invalid (so that systemd does
not restart in a loop: ``RestartPreventExitStatus=78``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dispoold import __version__
from dispoold.backend import BackendError, load_backend
from dispoold.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load
from dispoold.events import EventBus
from dispoold.journal import Journal
from dispoold.listener import ListenerError, open_listener, resolve_group
from dispoold.memory import MemoryManagerError, create_manager
from dispoold.pool import Pool
from dispoold.rpc import Access, Server
from dispoold.storage import Storage, StorageError
from dispoold.systemd import Notifier, log_handler, watchdog_interval

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_UNAVAILABLE = 69  # sysexits.h EX_UNAVAILABLE
EXIT_CONFIG = 78  # sysexits.h EX_CONFIG

#: How often STATUS= is refreshed (only sent when it changed).
STATUS_INTERVAL = 2.0

LOG_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

#: Settings a reload cannot change in a running daemon.
_RESTART_ONLY = (
    ("daemon", "instance"),
    ("daemon", "socket"),
    ("daemon", "socket_mode"),
    ("daemon", "state_dir"),
    ("backend", None),
    ("memory", None),
    ("storage", None),
)


class Daemon:
    def __init__(self, config: Config, config_path: Path, gid: int | None, log: logging.Logger):
        self.config = config
        self.config_path = config_path
        self.gid = gid
        self.log = log
        self.notifier = Notifier(log)
        self.server: Server | None = None
        self.pool: Pool | None = None
        self._stop = asyncio.Event()
        self._reloading: asyncio.Task[None] | None = None
        self._reload_again = False

    # -- signals ----------------------------------------------------------------------

    def _on_stop_signal(self, signum: int) -> None:
        if self._stop.is_set():
            self.log.info("%s again: already stopping", signal.Signals(signum).name)
            return
        self.log.info("%s: stopping", signal.Signals(signum).name)
        self._stop.set()

    def _on_reload_signal(self) -> None:
        if self._reloading is not None and not self._reloading.done():
            self._reload_again = True
            return
        self._reloading = asyncio.create_task(self._reload(), name="reload")

    # -- startup -> serve -> shutdown -------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._on_stop_signal, signum)
        loop.add_signal_handler(signal.SIGHUP, self._on_reload_signal)
        async with contextlib.AsyncExitStack() as stack:
            try:
                pool = await self._start(stack)
            except _StartupFailed as exc:
                self.log.error("cannot start: %s", exc)
                return exc.code
            except Exception:
                self.log.critical("cannot start: unexpected error", exc_info=True)
                return EXIT_FAILURE
            return await self._serve(pool, stack)

    async def _start(self, stack: contextlib.AsyncExitStack) -> Pool:
        config = self.config
        try:
            listener = open_listener(config.daemon, self.gid, self.log)
        except ListenerError as exc:
            raise _StartupFailed(str(exc), EXIT_UNAVAILABLE) from None
        stack.callback(listener.close)
        self.listener = listener
        try:
            backend = load_backend(config.backend.name, config.backend.options)
            await backend.open()
        except BackendError as exc:
            raise _StartupFailed(
                f"backend {config.backend.name!r}: {exc}", EXIT_UNAVAILABLE
            ) from None
        stack.push_async_callback(backend.close)
        try:
            memory = create_manager(config.memory, backend)
            await memory.open()
        except MemoryManagerError as exc:
            raise _StartupFailed(str(exc), EXIT_UNAVAILABLE) from None
        stack.push_async_callback(memory.close)
        try:
            storage = Storage.from_config(config.storage, config.daemon.instance, self.config_path)
        except ConfigError as exc:
            raise _StartupFailed(str(exc), EXIT_CONFIG) from None
        try:
            await storage.open()
        except StorageError as exc:
            raise _StartupFailed(str(exc), EXIT_UNAVAILABLE) from None
        journal_path = config.daemon.state_dir / "journal.sqlite"
        try:
            journal = Journal(journal_path, log=self.log.getChild("journal"))
        except (OSError, sqlite3.Error) as exc:
            raise _StartupFailed(f"journal {journal_path}: {exc}", EXIT_UNAVAILABLE) from None
        stack.callback(journal.close)
        pool = Pool(
            config,
            backend=backend,
            memory=memory,
            journal=journal,
            bus=EventBus(),
            log=self.log.getChild("pool"),
            storage=storage,
        )
        self.pool = pool
        try:
            await pool.start()
        except (BackendError, MemoryManagerError, StorageError) as exc:
            with contextlib.suppress(Exception):
                await pool.stop(0.0)
            raise _StartupFailed(f"pool: {exc}", EXIT_FAILURE) from None
        return pool

    async def _serve(self, pool: Pool, stack: contextlib.AsyncExitStack) -> int:
        server = Server(pool, access=Access(self.gid), log=self.log.getChild("rpc"))
        self.server = server
        await server.start(self.listener.sock)
        self.notifier.ready(pool.summary())
        self.log.info("dispoold %s ready on %s", __version__, self.listener.path)
        helpers = [asyncio.create_task(self._report_status(pool), name="status")]
        interval = watchdog_interval()
        if interval is not None:
            helpers.append(asyncio.create_task(self._watchdog(pool, interval), name="watchdog"))
        stop = asyncio.create_task(self._stop.wait(), name="stop")
        ends: list[asyncio.Future[Any]] = [stop, pool.fatal]
        await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
        code = EXIT_OK
        if pool.fatal.done():
            exc = pool.fatal.exception() if not pool.fatal.cancelled() else None
            self.log.critical("the pool engine failed; stopping", exc_info=exc)
            code = EXIT_FAILURE
        stop.cancel()
        code = max(code, await self._shutdown(pool, server))
        for helper in helpers:
            helper.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if self._reloading is not None:
            self._reloading.cancel()
            await asyncio.gather(self._reloading, return_exceptions=True)
        return code

    async def _shutdown(self, pool: Pool, server: Server) -> int:
        loop = asyncio.get_running_loop()
        drain = self.config.daemon.drain_timeout
        deadline = loop.time() + drain
        running = len(server.in_flight())
        self.notifier.stopping(f"stopping: {running} request(s) running")
        self.log.info("stopping: draining %d request(s) for up to %g s", running, drain)
        cut = await server.shutdown(drain)
        if cut:
            self.log.warning(
                "shutdown cut %d request(s) short after %g s: %s", len(cut), drain, "; ".join(cut)
            )
        try:
            await pool.stop(max(deadline - loop.time(), 1.0))
        except Exception:
            self.log.exception("the pool engine did not stop cleanly")
            return EXIT_FAILURE
        self.log.info("stopped")
        return EXIT_OK

    async def _report_status(self, pool: Pool) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL)
            try:
                self.notifier.status(pool.summary())
            except Exception:
                self.log.exception("cannot compute the status line")

    async def _watchdog(self, pool: Pool, interval: float) -> None:
        # Pinged from the event loop itself: a loop that is stuck stops the pings.
        while not pool.fatal.done():
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    # -- reload -----------------------------------------------------------------------

    async def _reload(self) -> None:
        while True:
            self._reload_again = False
            await self._reload_once()
            if not self._reload_again:
                return

    async def _reload_once(self) -> None:
        self.log.info("SIGHUP: reloading %s", self.config_path)
        try:
            config = load(self.config_path)
            gid = resolve_group(config.daemon, self.config_path)
        except ConfigError as exc:
            self.log.error("reload failed, keeping the running configuration: %s", exc)
            return
        for table, key in _RESTART_ONLY:
            old, new = getattr(self.config, table), getattr(config, table)
            if key is not None:
                old, new = getattr(old, key), getattr(new, key)
            if old != new:
                where = table if key is None else f"{table}.{key}"
                self.log.warning("%s changed: it takes effect when dispoold restarts", where)
        if self.pool is not None:
            try:
                await self.pool.reconfigure(config)
            except Exception:
                self.log.exception("reload failed, keeping the running configuration")
                return
        self.config = config
        self.gid = gid
        if self.server is not None:
            self.server.access = Access(gid)
        if self.listener.inode is not None and gid is not None:
            with contextlib.suppress(OSError):
                os.chown(self.listener.path, -1, gid)
        logging.getLogger("dispoold").setLevel(LOG_LEVELS[config.daemon.log_level])
        self.log.info("configuration reloaded")


class _StartupFailed(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def setup_logging(level: str) -> logging.Logger:
    log = logging.getLogger("dispoold")
    log.setLevel(LOG_LEVELS[level])
    log.addHandler(log_handler("dispoold"))
    log.propagate = False
    return log


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dispoold",
        description="Keep a pool of preloaded, paused disposable VMs and hand them out.",
        epilog="exit codes: 0 stopped, 1 engine failure, 69 a resource is unavailable,"
        " 78 invalid configuration",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="PATH",
        help=f"configuration file (default: $DISPOOLD_CONFIG or {DEFAULT_CONFIG_PATH})",
    )
    parser.add_argument("--check", action="store_true", help="validate the configuration and exit")
    parser.add_argument("--version", action="version", version=f"dispoold {__version__}")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.config or Path(os.environ.get("DISPOOLD_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        config = load(path)
        gid = resolve_group(config.daemon, path)
        # The storage drivers check their own settings: a mistake there is a mistake in
        # the file too.
        Storage.from_config(config.storage, config.daemon.instance, path)
    except ConfigError as exc:
        print(f"dispoold: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check:
        print(f"{path}: valid")
        return EXIT_OK
    log = setup_logging(config.daemon.log_level)
    return asyncio.run(Daemon(config, path, gid, log).run())


if __name__ == "__main__":
    sys.exit(main())
