"""A real dispoold process on a real socket, for the tests of the daemon's faces.

The daemon runs as ``python -m dispoold`` from the repository root with the test doubles
as plug-ins (``tests.doubles:FakeBackend``, ``tests.doubles:FakeMemory``) and the real pool
engine, so what is tested is what ships, minus the hypervisor.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import msgpack

from dispoold.protocol import HEADER

REPO = Path(__file__).resolve().parent.parent

#: Templates every test daemon knows. "slow" never becomes ready (a request for it waits
#: until its timeout), "broken" fails to be created, "huge" needs more memory than the
#: fake host has, "plain" is not a disposable template.
TEMPLATES: dict[str, dict[str, Any]] = {
    "fedora-dvm": {"preload_max": 2, "memory": 400, "tags": ["web"]},
    "debian-dvm": {"preload_max": 0, "memory": 400, "tags": ["web", "office"]},
    "plain": {"dispvm_template": False, "memory": 400},
    "slow": {"preload_max": 0, "memory": 400},
    "broken": {"preload_max": 0, "memory": 400},
    "huge": {"preload_max": 0, "memory": 20000},
}


def short_tempdir() -> Path:
    """A directory short enough for a Unix socket path, that other users may enter."""
    path = Path(tempfile.mkdtemp(prefix="dd-", dir="/tmp"))
    path.chmod(0o755)
    return path


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def toml(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """A TOML document from {table name: {key: scalar or list}}."""
    lines = []
    for table, values in tables.items():
        lines.append(f"[{table}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def config_text(
    directory: Path,
    *,
    daemon: Mapping[str, Any] | None = None,
    pool: Mapping[str, Any] | None = None,
    backend_options: Mapping[str, Any] | None = None,
    templates: Mapping[str, Mapping[str, Any]] | None = None,
    storage: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    tables: dict[str, Mapping[str, Any]] = {
        "daemon": {
            "socket": directory / "d.sock",
            "state_dir": directory / "state",
            "group": "",
            "socket_mode": 0o660,
            "drain_timeout": 2.0,
            "log_level": "debug",
            **(daemon or {}),
        },
        "backend": {"name": "tests.doubles:FakeBackend"},
        "backend.options": {
            "never_ready": ["slow"],
            "fail_create": ["broken"],
            **(backend_options or {}),
        },
        "memory": {"manager": "tests.doubles:FakeMemory"},
        "pool": {
            "default_dispvm": "fedora-dvm",
            "refill_delay": 0.0,
            "startup_timeout": 300.0,
            **(pool or {}),
        },
    }
    for name, settings in (storage or {}).items():
        tables[f"storage.{name}"] = settings
    templates = TEMPLATES if templates is None else templates
    for name, settings in templates.items():
        tables[f"templates.{name}"] = settings
    if "debian-dvm" in templates:
        tables["sources.work"] = {"default_dispvm": "debian-dvm"}
    tables["sources.vault"] = {"default_dispvm": ""}
    return toml(tables)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a daemon not run by systemd (unless ``extra`` says so)."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key
        not in {
            "NOTIFY_SOCKET",
            "WATCHDOG_USEC",
            "WATCHDOG_PID",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
            "INVOCATION_ID",
            "JOURNAL_STREAM",
            "DISPOOLD_CONFIG",
            "DISPOOLD_SOCKET",
        }
    }
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class DaemonProcess:
    """``python -m dispoold --config PATH``; stopped with SIGTERM on exit."""

    def __init__(
        self,
        directory: Path,
        *,
        config: str | None = None,
        env: Mapping[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.directory = directory
        self.config_path = directory / "dispoold.toml"
        self.socket_path = directory / "d.sock"
        self.log_path = directory / "daemon.log"
        if config is not None:
            self.config_path.write_text(config)
        self.env = dict(env) if env is not None else clean_env()
        self.pass_fds = pass_fds
        self.preexec = preexec
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "dispoold", "--config", str(self.config_path)],
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=self.pass_fds,
                preexec_fn=self.preexec,  # noqa: PLW1509 (dup2 of a socket; no threads here)
            )
        return self

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.pid

    def wait_serving(self, timeout: float = 20.0) -> None:
        """Until the socket answers a ping; fails with the daemon's log otherwise."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"dispoold exited with {self.process.returncode}:\n{self.log()}"
                )
            with contextlib.suppress(OSError), RawConnection(self.socket_path) as conn:
                if conn.call({"id": 1, "op": "ping"}).get("ok"):
                    return
            time.sleep(0.05)
        raise AssertionError(f"dispoold did not serve within {timeout} s:\n{self.log()}")

    def wait_until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """Poll ``status`` until ``predicate(result)`` holds; returns that result."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            with RawConnection(self.socket_path) as conn:
                status = conn.call({"id": 1, "op": "status"})["result"]
            if predicate(status):
                return status
            time.sleep(0.05)
        raise AssertionError(f"status never satisfied the condition; last: {status}")

    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def stop(self, timeout: float = 20.0) -> int:
        if self.process is None:
            raise RuntimeError("not started")
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            log = self.log()
            raise AssertionError(f"dispoold ignored SIGTERM for {timeout} s:\n{log}") from None

    def wait_exit(self, timeout: float = 20.0) -> int:
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.wait(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __enter__(self) -> DaemonProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.stop()


@contextlib.contextmanager
def running_daemon(**config: Any) -> Iterator[DaemonProcess]:
    """A serving daemon in a fresh directory, with :func:`config_text` settings."""
    directory = short_tempdir()
    try:
        with DaemonProcess(directory, config=config_text(directory, **config)) as daemon:
            daemon.start().wait_serving()
            yield daemon
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class RawConnection:
    """A bare socket speaking frames, for sending what no client library would."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError:
            self.sock.close()
            raise

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_body(self, body: bytes) -> None:
        self.sock.sendall(HEADER.pack(len(body)) + body)

    def send(self, message: Any) -> None:
        self.send_body(msgpack.packb(message, use_bin_type=True))

    def receive(self) -> dict[str, Any]:
        (length,) = HEADER.unpack(self._read(HEADER.size))
        reply = msgpack.unpackb(self._read(length), raw=False)
        assert isinstance(reply, dict), reply
        return reply

    def call(self, message: Any) -> dict[str, Any]:
        self.send(message)
        return self.receive()

    def closed_by_peer(self) -> bool:
        """True once the server has closed the connection (EOF)."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError(f"closed after {len(data)} of {size} bytes")
            data += chunk
        return data


def run_as(
    uid: int, gid: int, groups: list[int], work: Callable[[], Any], timeout: float = 30.0
) -> Any:
    """Run ``work`` in a forked child that dropped to ``uid``/``gid``/``groups``, and
    return what it returned (JSON-able), or ``{"raised": class name, "message": ...}``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            try:
                outcome: Any = {"returned": work()}
            except Exception as exc:
                outcome = {"raised": type(exc).__name__, "message": str(exc)}
            with os.fdopen(write_end, "w") as pipe:
                json.dump(outcome, pipe)
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, f"child failed: {text!r}"
    outcome = json.loads(text)
    return outcome.get("returned", outcome)
