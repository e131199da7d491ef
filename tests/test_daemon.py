"""The daemon as shipped: a real ``dispoold`` process, its socket, the real pool engine,
the test doubles standing in for Xen. Every op, every error code, malformed frames of
every kind, other users, many clients, events, systemd, signals."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dispoold.client import AsyncClient, Client, SocketAccessDenied
from dispoold.protocol import HEADER, MAX_FRAME, ErrorCode
from tests.daemon_harness import (
    REPO,
    DaemonProcess,
    RawConnection,
    clean_env,
    config_text,
    run_as,
    running_daemon,
    short_tempdir,
)

NOBODY = 65534
NOGROUP = 65534
DAEMON_GID = 1  # the "daemon" group: nobody is not in it


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as process:
        process.wait_until(lambda s: _paused(s, "fedora-dvm") == 2)
        yield process


def _template(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in status["templates"] if t["name"] == name)


def _paused(status: dict[str, Any], name: str) -> int:
    return sum(1 for d in _template(status, name)["disposables"] if d["stage"] == "paused")


def _stages(status: dict[str, Any], name: str) -> dict[str, str]:
    return {d["name"]: d["stage"] for d in _template(status, name)["disposables"]}


def call(daemon: DaemonProcess, op: str, **args: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"id": 1, "op": op}
    if args:
        message["args"] = args
    with RawConnection(daemon.socket_path) as conn:
        return conn.call(message)


def error_code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    assert reply["error"]["message"], reply
    return str(reply["error"]["code"])


# -- every op -------------------------------------------------------------------------


def test_ping(daemon: DaemonProcess) -> None:
    reply = call(daemon, "ping")
    assert reply == {"id": 1, "ok": True, "result": {"protocol": 1, "version": "0.1.0"}}


def test_request_from_the_pool_and_release(daemon: DaemonProcess) -> None:
    reply = call(daemon, "request")
    assert reply["ok"] is True, reply
    vm = reply["result"]
    assert set(vm) == {"name", "domid", "dispid", "template", "origin", "paused", "waited_ms"}
    assert vm["template"] == "fedora-dvm"
    assert vm["origin"] == "preload"
    assert vm["paused"] is False
    assert vm["name"] == f"disp{vm['dispid']}"
    assert _stages(call(daemon, "status")["result"], "fedora-dvm")[vm["name"]] == "used"
    assert call(daemon, "release", name=vm["name"]) == {"id": 1, "ok": True, "result": {}}
    daemon.wait_until(lambda s: vm["name"] not in _stages(s, "fedora-dvm"))
    assert error_code(call(daemon, "release", name=vm["name"])) == "not_found"


def test_request_paused_and_fresh(daemon: DaemonProcess) -> None:
    reply = call(daemon, "request", target="@dispvm:debian-dvm", paused=True, timeout=30)
    vm = reply["result"]
    assert vm["origin"] == "fresh" and vm["paused"] is True
    assert vm["template"] == "debian-dvm"
    assert call(daemon, "release", name=vm["name"])["ok"] is True


@pytest.mark.parametrize(
    ("args", "template"),
    [
        ({"source": "work"}, "debian-dvm"),  # the caller's own default
        ({"source": "someone"}, "fedora-dvm"),  # no default of its own: the global one
        ({"target": "@dispvm:@tag:office"}, "debian-dvm"),
    ],
)
def test_targets_resolve(daemon: DaemonProcess, args: dict[str, Any], template: str) -> None:
    vm = call(daemon, "request", **args)["result"]
    assert vm["template"] == template
    assert call(daemon, "release", name=vm["name"])["ok"] is True


@pytest.mark.parametrize(
    ("args", "code"),
    [
        ({"target": "dispvm"}, "bad_request"),
        ({"target": "@dispvm:"}, "bad_request"),
        ({"timeout": 100000.0}, "bad_request"),  # above pool.max_request_timeout
        ({"target": "@dispvm:nope"}, "no_such_template"),
        ({"target": "@dispvm:@tag:nope"}, "no_such_template"),
        ({"source": "vault"}, "no_such_template"),  # vault has no default disposable
        ({"target": "@dispvm:plain"}, "not_a_dispvm_template"),
        ({"target": "@dispvm:huge"}, "no_memory"),
        ({"target": "@dispvm:broken"}, "backend_error"),
        ({"target": "@dispvm:slow", "timeout": 0.3}, "timeout"),
    ],
)
def test_request_errors(daemon: DaemonProcess, args: dict[str, Any], code: str) -> None:
    assert error_code(call(daemon, "request", **args)) == code
    assert call(daemon, "ping")["ok"] is True


def test_status(daemon: DaemonProcess) -> None:
    result = call(daemon, "status")["result"]
    assert set(result) == {"templates", "memory", "process", "hypervisor"}
    process = result["process"]
    assert daemon.process is not None and process["pid"] == daemon.process.pid
    assert process["rss_mib"] > 5
    assert process["open_fds"] >= 3 and process["threads"] >= 1
    names = [t["name"] for t in result["templates"]]
    assert {"fedora-dvm", "debian-dvm", "plain", "slow", "broken", "huge"} <= set(names)
    fedora = _template(result, "fedora-dvm")
    assert set(fedora) == {"name", "max", "threshold_gap", "disposables", "volumes", "savefile"}
    assert fedora["max"] == 2 and fedora["threshold_gap"] == 0
    for vm in fedora["disposables"]:
        assert set(vm) == {"name", "domid", "stage", "since", "memory_mib", "origin", "note"}
    only = call(daemon, "status", template="fedora-dvm")["result"]
    assert [t["name"] for t in only["templates"]] == ["fedora-dvm"]
    assert error_code(call(daemon, "status", template="nope")) == "no_such_template"


def test_unknown_op(daemon: DaemonProcess) -> None:
    assert error_code(call(daemon, "frobnicate")) == "unknown_op"


def test_set_max_and_set_threshold_with_override_removal() -> None:
    with running_daemon() as daemon:
        assert call(daemon, "set_max", template="fedora-dvm", max=3)["ok"] is True
        daemon.wait_until(lambda s: _paused(s, "fedora-dvm") == 3)
        assert _template(call(daemon, "status")["result"], "fedora-dvm")["max"] == 3
        assert call(daemon, "set_max", template="fedora-dvm", max=None)["ok"] is True
        status = daemon.wait_until(lambda s: _template(s, "fedora-dvm")["max"] == 2)
        assert status["templates"]
        # The global max applies to the default disposable template and wins, even at 0.
        assert call(daemon, "set_max", max=0)["ok"] is True
        daemon.wait_until(lambda s: not _template(s, "fedora-dvm")["disposables"])
        assert call(daemon, "set_max", max=None)["ok"] is True
        daemon.wait_until(lambda s: _paused(s, "fedora-dvm") == 2)
        assert error_code(call(daemon, "set_max", template="nope", max=1)) == "no_such_template"

        assert call(daemon, "set_threshold", mib=1234)["ok"] is True
        memory = call(daemon, "status")["result"]["memory"]
        assert memory["threshold_mib"] == 1234
        assert call(daemon, "set_threshold", mib=None)["ok"] is True
        assert call(daemon, "status")["result"]["memory"]["threshold_mib"] == 0


def test_refresh_replaces_the_preloads() -> None:
    with running_daemon() as daemon:
        before = set(
            _stages(daemon.wait_until(lambda s: _paused(s, "fedora-dvm") == 2), "fedora-dvm")
        )
        assert call(daemon, "refresh", template="fedora-dvm") == {"id": 1, "ok": True, "result": {}}
        after = daemon.wait_until(
            lambda s: _paused(s, "fedora-dvm") == 2 and not set(_stages(s, "fedora-dvm")) & before
        )
        assert len(_stages(after, "fedora-dvm")) == 2
        assert error_code(call(daemon, "refresh", template="nope")) == "no_such_template"


def test_suspend_drops_the_preloads_and_resume_refills() -> None:
    with running_daemon() as daemon:
        daemon.wait_until(lambda s: _paused(s, "fedora-dvm") == 2)
        vm = call(daemon, "request")["result"]
        assert call(daemon, "suspend") == {"id": 1, "ok": True, "result": {}}
        status = daemon.wait_until(lambda s: list(_stages(s, "fedora-dvm")) == [vm["name"]])
        assert _stages(status, "fedora-dvm") == {vm["name"]: "used"}  # handed out: kept
        time.sleep(0.3)
        assert _paused(call(daemon, "status")["result"], "fedora-dvm") == 0  # no refill
        assert call(daemon, "resume") == {"id": 1, "ok": True, "result": {}}
        daemon.wait_until(lambda s: _paused(s, "fedora-dvm") == 2)


# -- malformed frames -----------------------------------------------------------------


def _still_serves(conn: RawConnection) -> None:
    assert conn.call({"id": 99, "op": "ping"})["ok"] is True


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"\xc1", "not valid msgpack"),
        (b"", "not valid msgpack"),
        (msgpack.packb([1, 2, 3]), "list"),
        (msgpack.packb("ping"), "string"),
        (msgpack.packb({"id": 1, "op": "ping"}) + b"\x00", "more than one"),
        (b"\x81\xa1a\xa2\xff\xfe", "UTF-8"),
        (b"\x91" * 60000 + b"\xc0", "not valid msgpack"),  # deep nesting
    ],
    ids=["not-msgpack", "empty", "list", "string", "trailing", "bad-utf8", "deep"],
)
def test_bodies_that_are_not_one_map(daemon: DaemonProcess, body: bytes, words: str) -> None:
    with RawConnection(daemon.socket_path) as conn:
        conn.send_body(body)
        reply = conn.receive()
        assert reply["id"] is None and error_code(reply) == "bad_request"
        assert words in reply["error"]["message"]
        _still_serves(conn)


@pytest.mark.parametrize(
    ("message", "code", "words"),
    [
        ({"id": "1", "op": "ping"}, "bad_request", "id"),
        ({"id": 1, "op": "ping", "junk": True}, "bad_request", "junk: unknown key"),
        ({"id": 1, "op": "request", "args": {"paused": "yes"}}, "bad_request", "args.paused"),
        ({"id": 1, "op": "request", "args": {"target": 7}}, "bad_request", "args.target"),
        ({"id": 1, "op": "request", "args": {"colour": "red"}}, "bad_request", "args.colour"),
        ({"id": 1, "op": "set_max", "args": {"max": "3"}}, "bad_request", "args.max"),
        ({"id": 1, "op": "request", "args": {"target": "x" * 60000}}, "bad_request", "256"),
        ({"id": 1, "op": "release", "args": {"name": "d" * 60000}}, "bad_request", "256"),
        (
            {"id": 1, "op": "ping", "args": {"a": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}},
            "bad_request",
            "args.a",
        ),
        ({"id": 1, "op": "shutdown"}, "unknown_op", "shutdown"),
    ],
)
def test_requests_with_wrong_contents(
    daemon: DaemonProcess, message: dict[str, Any], code: str, words: str
) -> None:
    with RawConnection(daemon.socket_path) as conn:
        reply = conn.call(message)
        assert error_code(reply) == code
        assert words in reply["error"]["message"]
        _still_serves(conn)


def test_a_frame_too_long_is_refused_and_the_connection_closed(daemon: DaemonProcess) -> None:
    with RawConnection(daemon.socket_path) as conn:
        conn.send_raw(HEADER.pack(MAX_FRAME + 1))
        reply = conn.receive()
        assert reply["id"] is None and error_code(reply) == "frame_too_large"
        assert conn.closed_by_peer()
    with RawConnection(daemon.socket_path) as conn:
        conn.send_raw(b"\xff\xff\xff\xff" + b"x" * 100)
        assert error_code(conn.receive()) == "frame_too_large"
        assert conn.closed_by_peer()
    assert call(daemon, "ping")["ok"] is True


def test_a_frame_of_exactly_the_limit_is_read(daemon: DaemonProcess) -> None:
    padding = "x" * (MAX_FRAME - 40)
    body = msgpack.packb({"id": 1, "op": "ping", "args": {"p": padding}})
    body = msgpack.packb(
        {"id": 1, "op": "ping", "args": {"p": padding + "x" * (MAX_FRAME - len(body))}}
    )
    assert len(body) == MAX_FRAME
    with RawConnection(daemon.socket_path) as conn:
        conn.send_body(body)
        reply = conn.receive()
        assert error_code(reply) == "bad_request" and reply["id"] == 1  # unknown key "p"


@pytest.mark.parametrize("sent", [b"\x00\x00", HEADER.pack(50) + b"\x82\xa2id"])
def test_truncated_frames_are_answered(daemon: DaemonProcess, sent: bytes) -> None:
    with RawConnection(daemon.socket_path) as conn:
        conn.send_raw(sent)
        conn.sock.shutdown(socket.SHUT_WR)
        reply = conn.receive()
        assert reply["id"] is None and error_code(reply) == "bad_request"
        assert "truncated" in reply["error"]["message"]
        assert conn.closed_by_peer()


def test_many_requests_in_one_write_are_all_answered(daemon: DaemonProcess) -> None:
    frames = b"".join(
        HEADER.pack(len(b := msgpack.packb({"id": n, "op": "ping"}))) + b for n in range(200)
    )
    with RawConnection(daemon.socket_path) as conn:
        conn.send_raw(frames)
        assert sorted(conn.receive()["id"] for _ in range(200)) == list(range(200))


#: Every integer msgpack can carry (beyond these, the encoder itself refuses).
_msgpack_ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
_junk_messages = st.dictionaries(
    st.sampled_from(["id", "op", "args", "x"]) | st.text(max_size=5),
    st.none()
    | st.booleans()
    | _msgpack_ints
    | st.floats()
    | st.text(max_size=30)
    | st.binary(max_size=30)
    | st.sampled_from(["ping", "status", "release", "set_max", "request", "nope"])
    | st.dictionaries(st.text(max_size=8), _msgpack_ints | st.text(max_size=8), max_size=3),
    max_size=4,
)
_frames = st.lists(
    st.binary(max_size=200) | _junk_messages.map(lambda m: msgpack.packb(m, use_bin_type=True)),
    min_size=1,
    max_size=8,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bodies=_frames)
def test_fuzz_every_frame_is_answered(daemon: DaemonProcess, bodies: list[bytes]) -> None:
    with RawConnection(daemon.socket_path) as conn:
        conn.send_raw(b"".join(HEADER.pack(len(body)) + body for body in bodies))
        replies = [conn.receive() for _ in bodies]
        for reply in replies:
            assert isinstance(reply["ok"], bool)
            if not reply["ok"]:
                assert reply["error"]["code"] in {c.value for c in ErrorCode}
            elif "result" in reply and "name" in reply["result"]:
                conn.call({"id": 0, "op": "release", "args": {"name": reply["result"]["name"]}})
        _still_serves(conn)


# -- other users ----------------------------------------------------------------------


def _ping_and_set_max(path: str) -> dict[str, str]:
    outcome = {}
    for op, args in (("ping", {}), ("status", {}), ("set_max", {"max": 1}), ("suspend", {})):
        with Client(path) as client:
            try:
                client.call(op, args)
            except Exception as exc:
                outcome[op] = getattr(exc, "code", type(exc).__name__)
            else:
                outcome[op] = "ok"
    return outcome


def test_group_members_and_strangers() -> None:
    with running_daemon(daemon={"group": "daemon", "socket_mode": 0o666}) as daemon:
        path = str(daemon.socket_path)
        work = lambda: _ping_and_set_max(path)  # noqa: E731
        member = run_as(NOBODY, NOGROUP, [DAEMON_GID], work)
        primary = run_as(NOBODY, DAEMON_GID, [], work)
        stranger = run_as(NOBODY, NOGROUP, [], work)
        root = _ping_and_set_max(path)
    for outcome in (member, primary):
        assert outcome == {
            "ping": "ok",
            "status": "ok",
            "set_max": "unauthorized",
            "suspend": "unauthorized",
        }
    assert stranger == dict.fromkeys(("ping", "status", "set_max", "suspend"), "unauthorized")
    assert root == dict.fromkeys(("ping", "status", "set_max", "suspend"), "ok")


def test_the_socket_keeps_out_those_outside_its_group() -> None:
    with running_daemon(daemon={"group": "daemon", "socket_mode": 0o660}) as daemon:
        st_ = daemon.socket_path.stat()
        assert stat.S_ISSOCK(st_.st_mode)
        assert stat.S_IMODE(st_.st_mode) == 0o660
        assert st_.st_gid == DAEMON_GID
        path = str(daemon.socket_path)

        def ping() -> str:
            try:
                with Client(path) as client:
                    client.ping()
            except SocketAccessDenied as exc:
                return f"denied: {exc}"
            return "ok"

        assert run_as(NOBODY, NOGROUP, [DAEMON_GID], ping) == "ok"
        refused = run_as(NOBODY, NOGROUP, [], ping)
    assert refused.startswith("denied: not allowed to connect")


# -- many clients ---------------------------------------------------------------------


def test_64_concurrent_clients_keep_getting_answers(daemon: DaemonProcess) -> None:
    async def client(n: int) -> int:
        answered = 0
        async with AsyncClient(daemon.socket_path) as dispoold:
            for round_ in range(10):
                pings = [dispoold.ping() for _ in range(5)]
                results = await asyncio.gather(*pings, dispoold.status())
                answered += len(results)
                if n % 8 == 0 and round_ == 0:
                    vm = await dispoold.request("@dispvm:debian-dvm")
                    await dispoold.release(vm.name)
                    answered += 2
        return answered

    async def all_clients() -> list[int]:
        async with asyncio.timeout(120):  # a hang detector, not a speed target
            return await asyncio.gather(*(client(n) for n in range(64)))

    counts = asyncio.run(all_clients())
    assert counts == [62 if n % 8 == 0 else 60 for n in range(64)]
    assert call(daemon, "ping")["ok"] is True


# -- events ---------------------------------------------------------------------------


def test_subscribers_see_the_lifecycle() -> None:
    async def scenario(path: Path) -> list[tuple[str, dict[str, Any]]]:
        seen: list[tuple[str, dict[str, Any]]] = []
        async with AsyncClient(path) as watcher, AsyncClient(path) as user:
            stream = await watcher.subscribe()
            vm = await user.request()
            await user.release(vm.name)
            async with asyncio.timeout(10):
                async for event in stream:
                    seen.append((event.name, event.data))
                    names = [name for name, _ in seen]
                    if "removed" in names and names.count("preload-ready") >= 1:
                        break
            stream.close()
        return seen

    with running_daemon() as daemon:
        daemon.wait_until(lambda s: _paused(s, "fedora-dvm") == 2)
        seen = asyncio.run(scenario(daemon.socket_path))
    names = [name for name, _ in seen]
    assert names[:2] == ["requested", "used"], seen
    vm_name = seen[0][1]["name"]
    assert seen[0][1] == {"name": vm_name, "template": "fedora-dvm", "origin": "preload"}
    assert ("removed", {"name": vm_name, "template": "fedora-dvm", "reason": "released"}) in seen
    assert "preload-started" in names and "preload-ready" in names


def test_subscribe_filters_by_event_name(daemon: DaemonProcess) -> None:
    with Client(daemon.socket_path) as watcher, Client(daemon.socket_path) as user:
        events = watcher.subscribe(["removed"])
        vm = user.request("@dispvm:debian-dvm")
        # The subscription is acknowledged before the first event is read.
        user.release(vm.name)
        event = next(events)
    assert event.name == "removed" and event.data["name"] == vm.name


# -- systemd --------------------------------------------------------------------------


def _notify_socket(directory: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "notify"))
    sock.settimeout(10)
    return sock


def _collect(sock: socket.socket, until: str, seconds: float = 15.0) -> list[str]:
    deadline = time.monotonic() + seconds
    messages: list[str] = []
    while time.monotonic() < deadline:
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
        if any(until in m for m in messages):
            return messages
    raise AssertionError(f"no {until} in {messages}")


def test_systemd_notifications_and_watchdog() -> None:
    directory = short_tempdir()
    notify = _notify_socket(directory)
    env = clean_env(NOTIFY_SOCKET=str(directory / "notify"), WATCHDOG_USEC="400000")
    try:
        with DaemonProcess(directory, config=config_text(directory), env=env) as daemon:
            daemon.start()
            messages = _collect(notify, "READY=1")
            # READY=1 means: the journal is replayed and the socket serves, right now.
            assert call(daemon, "ping")["ok"] is True
            ready = next(m for m in messages if "READY=1" in m)
            assert "STATUS=" in ready and "preloaded" in ready
            assert f"MAINPID={daemon.pid}" in ready
            later = _collect(notify, "WATCHDOG=1")
            later += _collect(notify, "WATCHDOG=1")
            status_update = _collect(notify, "STATUS=2/2 preloaded")
            assert status_update
            daemon.signal(signal.SIGTERM)
            final = _collect(notify, "STOPPING=1")
            assert daemon.wait_exit() == 0
    finally:
        notify.close()
        shutil.rmtree(directory, ignore_errors=True)
    assert sum("WATCHDOG=1" in m for m in later) >= 2
    assert any(m.startswith("STOPPING=1") for m in final)


def test_socket_activation() -> None:
    directory = short_tempdir()
    path = directory / "activated.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(8)
    fd = listener.fileno()
    env = clean_env(LISTEN_FDS="1")
    # LISTEN_PID must be the daemon's own pid: the shell sets it to $$ and execs.
    wrapper = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'

    def onto_fd_3() -> None:  # in the child: the first passed socket is fd 3
        os.dup2(fd, 3)

    try:
        with DaemonProcess(directory, config=config_text(directory), env=env) as daemon:
            command = ["sh", "-c", wrapper, "sh", sys.executable, "-m", "dispoold"]
            with daemon.log_path.open("ab") as log_file:
                daemon.process = subprocess.Popen(
                    [*command, "--config", str(daemon.config_path)],
                    cwd=REPO,
                    env=env,
                    stdout=log_file,
                    stderr=log_file,
                    pass_fds=(3,),
                    preexec_fn=onto_fd_3,  # noqa: PLW1509
                )
            listener.close()  # only the daemon holds it now
            for _ in range(200):
                try:
                    with RawConnection(path) as conn:
                        if conn.call({"id": 1, "op": "ping"})["ok"]:
                            break
                except OSError:
                    time.sleep(0.05)
            else:
                raise AssertionError(daemon.log())
            assert not daemon.socket_path.exists()  # it did not make its own
            assert daemon.stop() == 0
            log = daemon.log()
        assert path.exists()  # systemd's socket: the daemon leaves it alone
        assert "serving on" in log and "from systemd" in log
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- configuration and startup --------------------------------------------------------


def _run_daemon(directory: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    config = directory / "dispoold.toml"
    config.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "dispoold", "--config", str(config), *args],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (lambda t: t.replace("[daemon]", "[daemon]\nsokcet = 1"), "daemon.sokcet: unknown key"),
        (
            lambda t: t.replace("drain_timeout = 2.0", 'drain_timeout = "soon"'),
            "daemon.drain_timeout",
        ),
        (
            lambda t: t.replace("preload_max = 2\nmemory = 400", 'preload_max = 2\nmemory = "x"'),
            "templates.fedora-dvm.memory",
        ),
        (
            lambda t: t.replace('default_dispvm = "fedora-dvm"', 'default_dispvm = "nope"'),
            "pool.default_dispvm",
        ),
        (lambda t: t.replace("[pool]", "[pool"), "not valid TOML"),
        (lambda t: t.replace('group = ""', 'group = "no-such-group"'), "daemon.group"),
    ],
    ids=["unknown-key", "wrong-type", "template-field", "bad-reference", "toml", "group"],
)
def test_a_bad_configuration_stops_the_daemon_before_anything_starts(
    change: Any, words: str
) -> None:
    directory = short_tempdir()
    try:
        text = change(config_text(directory))
        assert text != config_text(directory)
        done = _run_daemon(directory, text)
        assert done.returncode == 78, done
        assert str(directory / "dispoold.toml") in done.stderr
        assert words in done.stderr
        assert not (directory / "d.sock").exists()
        assert not (directory / "state").exists()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_missing_configuration_file() -> None:
    directory = short_tempdir()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "dispoold", "--config", str(directory / "none.toml")],
            cwd=REPO,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 78
        assert "none.toml: no such file" in done.stderr
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_check_validates_without_starting() -> None:
    directory = short_tempdir()
    try:
        done = _run_daemon(directory, config_text(directory), "--check")
        assert done.returncode == 0 and "valid" in done.stdout
        assert not (directory / "d.sock").exists()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_backend_that_cannot_be_loaded() -> None:
    directory = short_tempdir()
    try:
        text = config_text(directory).replace("tests.doubles:FakeBackend", "tests.doubles:Nope")
        done = _run_daemon(directory, text)
        assert done.returncode == 69
        assert "Nope" in done.stderr
        assert not (directory / "d.sock").exists()  # the listener was closed and removed
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_second_daemon_on_the_same_socket_refuses_to_start(daemon: DaemonProcess) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dispoold", "--config", str(daemon.config_path)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 69
    assert "already listening" in done.stderr
    assert call(daemon, "ping")["ok"] is True


def test_a_stale_socket_is_replaced_and_removed_at_exit() -> None:
    directory = short_tempdir()
    try:
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(directory / "d.sock"))
        stale.close()  # the file stays, nobody listens: like after a crash
        with DaemonProcess(directory, config=config_text(directory)) as daemon:
            daemon.start().wait_serving()
            assert "removing stale socket" in daemon.log()
            assert daemon.stop() == 0
        assert not (directory / "d.sock").exists()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# -- signals --------------------------------------------------------------------------


def test_sighup_reloads_and_keeps_the_old_configuration_on_a_bad_file() -> None:
    with running_daemon() as daemon:
        daemon.wait_until(lambda s: _paused(s, "fedora-dvm") == 2)
        good = daemon.config_path.read_text()
        changed = good.replace(
            "[templates.fedora-dvm]\npreload_max = 2", "[templates.fedora-dvm]\npreload_max = 3"
        )
        assert changed != good
        daemon.config_path.write_text(changed)
        daemon.signal(signal.SIGHUP)
        daemon.wait_until(lambda s: _paused(s, "fedora-dvm") == 3)
        assert _template(call(daemon, "status")["result"], "fedora-dvm")["max"] == 3

        daemon.config_path.write_text(changed.replace("[pool]", "[pool]\nbogus = 1"))
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload failed" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reload failed, keeping the running configuration" in daemon.log()
        assert "pool.bogus" in daemon.log()
        assert _template(call(daemon, "status")["result"], "fedora-dvm")["max"] == 3

        daemon.config_path.write_text(changed.replace('d.sock"', 'e.sock"'))
        daemon.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "daemon.socket changed" not in daemon.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "daemon.socket changed: it takes effect when dispoold restarts" in daemon.log()
        assert call(daemon, "ping")["ok"] is True


def test_sigterm_drains_then_cuts_short() -> None:
    with running_daemon(daemon={"drain_timeout": 0.5}) as daemon:
        with RawConnection(daemon.socket_path) as conn:
            conn.send({"id": 5, "op": "request", "args": {"target": "@dispvm:slow", "timeout": 60}})
            time.sleep(0.3)
            started = time.monotonic()
            daemon.signal(signal.SIGTERM)
            reply = conn.receive()
            assert reply["id"] == 5 and error_code(reply) == "shutting_down"
            assert conn.closed_by_peer()
        assert daemon.wait_exit() == 0
        took = time.monotonic() - started
        log = daemon.log()
    assert took < 30  # bounded: drain 0.5 s plus the engine's own (a hang detector)
    assert "SIGTERM: stopping" in log
    assert "shutdown cut 1 request(s) short" in log and "request (id 5" in log
    assert "stopped" in log


def test_logs_go_to_stderr_outside_systemd(daemon: DaemonProcess) -> None:
    log = daemon.log()
    assert "INFO dispoold: dispoold 0.1.0 ready on" in log
    assert os.environ.get("INVOCATION_ID") is None or "ready on" in log


def test_a_peer_that_hangs_up_mid_request_leaves_nothing_behind() -> None:
    with running_daemon() as daemon:
        for _ in range(10):
            with RawConnection(daemon.socket_path) as conn:
                conn.send({"id": 1, "op": "request", "args": {"target": "@dispvm:slow"}})
                daemon.wait_until(lambda s: bool(_template(s, "slow")["disposables"]))
        # Each hang-up cancelled its request, and the engine destroyed what it had begun.
        daemon.wait_until(lambda s: not _template(s, "slow")["disposables"])
        assert daemon.log().count("request (id 1)") == 10
