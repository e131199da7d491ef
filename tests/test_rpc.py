"""The server in-process, in front of a scripted engine: concurrency, bounds, shutdown.

What needs the engine to misbehave on cue (block, fail, ignore a cancel) is tested here;
the daemon as shipped is tested through a real process in ``test_daemon.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import pytest_asyncio

from dispoold import errors
from dispoold.backend import BackendError
from dispoold.events import EventBus
from dispoold.protocol import HEADER, ErrorCode
from dispoold.rpc import INTERNAL_ERROR, Access, Limits, Server
from dispoold.views import Handout, PoolView
from tests.daemon_harness import short_tempdir


class StubEngine:
    """Answers at once, unless a test holds a target back (``gates``) or makes an op fail
    (``failures``)."""

    def __init__(self, bus: EventBus | None = None) -> None:
        self.bus = bus or EventBus()
        self.gates: dict[str, asyncio.Event] = {}
        self.failures: dict[str, BaseException] = {}
        self.calls: list[tuple[str, Any]] = []
        self.cancelled: list[str] = []
        self.released: list[str] = []
        self._next = 0

    async def request(
        self,
        target: str = "@dispvm",
        source: str | None = None,
        paused: bool = False,
        timeout: float | None = None,
    ) -> Handout:
        self.calls.append(("request", (target, source, paused, timeout)))
        if (failure := self.failures.get("request")) is not None:
            raise failure
        if (gate := self.gates.get(target)) is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(target)
                raise
        self._next += 1
        n = self._next
        return Handout(
            name=f"disp{n}",
            domid=n,
            dispid=n,
            template="t",
            origin="preload",
            paused=paused,
            waited_ms=1.0,
        )

    async def release(self, name: str) -> None:
        self.calls.append(("release", name))
        if (failure := self.failures.get("release")) is not None:
            raise failure
        self.released.append(name)

    def status(self, template: str | None = None) -> PoolView:
        self.calls.append(("status", template))
        if (failure := self.failures.get("status")) is not None:
            raise failure
        return PoolView(templates=[], memory={})

    async def set_max(self, template: str | None, value: int | None) -> None:
        self.calls.append(("set_max", (template, value)))

    async def set_threshold(self, mib: int | None) -> None:
        self.calls.append(("set_threshold", mib))

    async def refresh(self, template: str) -> None:
        self.calls.append(("refresh", template))

    async def suspend(self) -> None:
        self.calls.append(("suspend", None))

    async def resume(self) -> None:
        self.calls.append(("resume", None))


class Peer:
    """A raw asyncio connection speaking frames."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, path: Path) -> Peer:
        reader, writer = await asyncio.open_unix_connection(str(path))
        return cls(reader, writer)

    async def send(self, message: Any) -> None:
        body = msgpack.packb(message, use_bin_type=True)
        self.writer.write(HEADER.pack(len(body)) + body)
        await self.writer.drain()

    async def receive(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            (length,) = HEADER.unpack(await self.reader.readexactly(HEADER.size))
            reply = msgpack.unpackb(await self.reader.readexactly(length), raw=False)
        assert isinstance(reply, dict)
        return reply

    async def nothing_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self.reader.readexactly(1)
        except TimeoutError:
            return True
        return False

    async def closed_by_server(self) -> bool:
        async with asyncio.timeout(5.0):
            return await self.reader.read(1) == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


@dataclass
class Rig:
    server: Server
    engine: StubEngine
    path: Path
    peers: list[Peer] = field(default_factory=list)

    async def connect(self) -> Peer:
        peer = await Peer.connect(self.path)
        self.peers.append(peer)
        return peer

    async def stop(self) -> None:
        await self.server.shutdown(0.0)
        for peer in self.peers:
            await peer.close()


async def start_rig(engine: StubEngine, limits: Limits, directory: Path) -> Rig:
    path = directory / "s.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(16)
    sock.setblocking(False)
    server = Server(
        engine, access=Access(gid=None), log=logging.getLogger("test.rpc"), limits=limits
    )
    await server.start(sock)
    return Rig(server, engine, path)


@pytest.fixture
def directory() -> Iterator[Path]:
    path = short_tempdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest_asyncio.fixture
async def rig(directory: Path) -> AsyncIterator[Rig]:
    rig = await start_rig(StubEngine(), Limits(), directory)
    yield rig
    await rig.stop()


# -- out of order ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_slow_request_does_not_hold_up_a_ping(rig: Rig) -> None:
    rig.engine.gates["@dispvm:slow"] = gate = asyncio.Event()
    peer = await rig.connect()
    await peer.send({"id": 1, "op": "request", "args": {"target": "@dispvm:slow"}})
    await peer.send({"id": 2, "op": "ping"})
    await peer.send({"id": 3, "op": "status"})
    await peer.send({"id": 4, "op": "request"})
    first = [await peer.receive() for _ in range(3)]
    assert sorted(r["id"] for r in first) == [2, 3, 4]
    gate.set()
    last = await peer.receive()
    assert last["id"] == 1 and last["ok"] is True
    assert last["result"]["name"].startswith("disp")
    await peer.close()


@pytest.mark.asyncio
async def test_requests_past_the_in_flight_bound_wait_for_a_free_slot(directory: Path) -> None:
    rig = await start_rig(StubEngine(), Limits(max_in_flight=2), directory)
    rig.engine.gates["@dispvm:a"] = gate = asyncio.Event()
    peer = await rig.connect()
    for request_id in (1, 2, 3):
        await peer.send({"id": request_id, "op": "request", "args": {"target": "@dispvm:a"}})
    await peer.send({"id": 4, "op": "ping"})
    # Two run, the third waits to be read, and so does the ping behind it.
    assert await peer.nothing_within(0.3)
    assert len(rig.server.in_flight()) == 2
    gate.set()
    replies = [await peer.receive() for _ in range(4)]
    assert sorted(r["id"] for r in replies) == [1, 2, 3, 4]
    assert all(r["ok"] for r in replies)
    await peer.close()
    await rig.stop()


# -- errors ---------------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (errors.InvalidTarget("bad target"), ErrorCode.BAD_REQUEST),
        (errors.NoSuchTemplate("no such"), ErrorCode.NO_SUCH_TEMPLATE),
        (errors.NotADispvmTemplate("not one"), ErrorCode.NOT_A_DISPVM_TEMPLATE),
        (errors.NoMemory("no memory"), ErrorCode.NO_MEMORY),
        (errors.RequestTimeout("too slow"), ErrorCode.TIMEOUT),
        (errors.StartFailed("create disp1: boom"), ErrorCode.BACKEND_ERROR),
        (errors.HypervisorError("destroy disp1: boom"), ErrorCode.BACKEND_ERROR),
        (errors.DispidsExhausted("all used"), ErrorCode.BACKEND_ERROR),
        (errors.ShuttingDown("stopping"), ErrorCode.SHUTTING_DOWN),
    ],
)
async def test_engine_errors_reach_the_caller_with_their_code(
    rig: Rig, failure: Exception, code: ErrorCode
) -> None:
    rig.engine.failures["request"] = failure
    peer = await rig.connect()
    await peer.send({"id": 5, "op": "request"})
    reply = await peer.receive()
    assert reply == {"id": 5, "ok": False, "error": {"code": code.value, "message": str(failure)}}
    await peer.close()


@pytest.mark.asyncio
async def test_a_port_error_that_escapes_the_engine_is_a_bug(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    # The engine wraps what the backend raises into its own family; one that gets
    # through unwrapped is not mapped to a code of its own, but logged as the bug it is.
    rig.engine.failures["request"] = BackendError("create", "disp1", "boom")
    peer = await rig.connect()
    await peer.send({"id": 1, "op": "request"})
    reply = await peer.receive()
    assert reply["error"] == {"code": "backend_error", "message": INTERNAL_ERROR}
    assert "internal error in request" in caplog.text
    await peer.close()


@pytest.mark.asyncio
async def test_a_bug_is_logged_answered_and_survived(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    rig.engine.failures["release"] = KeyError("oops")
    rig.engine.failures["status"] = ZeroDivisionError("status oops")
    peer = await rig.connect()
    await peer.send({"id": 1, "op": "release", "args": {"name": "disp1"}})
    await peer.send({"id": 2, "op": "status"})
    replies = {r["id"]: r for r in [await peer.receive(), await peer.receive()]}
    for request_id in (1, 2):
        assert replies[request_id]["error"] == {
            "code": "backend_error",
            "message": INTERNAL_ERROR,
        }
    await peer.send({"id": 3, "op": "ping"})
    assert (await peer.receive())["ok"] is True
    assert "internal error in release" in caplog.text
    assert "KeyError" in caplog.text and "ZeroDivisionError" in caplog.text
    await peer.close()


@pytest.mark.asyncio
async def test_an_unencodable_result_is_an_internal_error(rig: Rig) -> None:
    unencodable = PoolView(templates=[], memory={"figure": object()})
    rig.engine.status = lambda template=None: unencodable  # type: ignore[method-assign]
    peer = await rig.connect()
    await peer.send({"id": 1, "op": "status"})
    reply = await peer.receive()
    assert reply["error"]["code"] == "backend_error"
    await peer.send({"id": 2, "op": "ping"})
    assert (await peer.receive())["ok"] is True
    await peer.close()


# -- bounds ---------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_frame_body_that_never_comes_is_answered_then_closed(directory: Path) -> None:
    rig = await start_rig(StubEngine(), Limits(frame_timeout=0.2), directory)
    peer = await rig.connect()
    peer.writer.write(HEADER.pack(100) + b"\x81")
    reply = await peer.receive()
    assert reply["id"] is None
    assert reply["error"]["code"] == "bad_request"
    assert "did not arrive" in reply["error"]["message"]
    assert await peer.closed_by_server()
    await rig.stop()


@pytest.mark.asyncio
async def test_connections_past_the_limit_are_told_and_closed(directory: Path) -> None:
    rig = await start_rig(StubEngine(), Limits(max_connections=2), directory)
    first, second = await rig.connect(), await rig.connect()
    for peer in (first, second):
        await peer.send({"id": 1, "op": "ping"})
        assert (await peer.receive())["ok"] is True
    third = await rig.connect()
    reply = await third.receive()
    assert reply["id"] is None and reply["error"]["code"] == "busy"
    assert "too many connections" in reply["error"]["message"]
    assert await third.closed_by_server()
    await first.close()
    await asyncio.sleep(0.1)
    fourth = await rig.connect()
    await fourth.send({"id": 1, "op": "ping"})
    assert (await fourth.receive())["ok"] is True
    assert rig.server.connections == 2
    await rig.stop()


@pytest.mark.asyncio
async def test_one_uid_cannot_take_every_connection(directory: Path) -> None:
    rig = await start_rig(StubEngine(), Limits(max_connections_per_uid=1), directory)
    first = await rig.connect()
    await first.send({"id": 1, "op": "ping"})
    assert (await first.receive())["ok"] is True
    second = await rig.connect()
    reply = await second.receive()
    assert reply["error"]["code"] == "busy"
    assert "too many connections from uid 0 (1)" in reply["error"]["message"]
    assert await second.closed_by_server()
    await rig.stop()


@pytest.mark.asyncio
async def test_subscriptions_per_connection_are_bounded(directory: Path) -> None:
    rig = await start_rig(StubEngine(), Limits(max_subscriptions=1), directory)
    peer = await rig.connect()
    await peer.send({"id": 1, "op": "subscribe"})
    assert (await peer.receive()) == {"id": 1, "ok": True, "result": {}}
    await peer.send({"id": 2, "op": "subscribe"})
    reply = await peer.receive()
    assert reply["id"] == 2 and reply["error"]["code"] == "bad_request"
    await rig.stop()


# -- subscriptions --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_subscribers_get_the_events_they_asked_for(rig: Rig) -> None:
    peer = await rig.connect()
    await peer.send({"id": 7, "op": "subscribe", "args": {"events": ["used", "removed"]}})
    assert (await peer.receive()) == {"id": 7, "ok": True, "result": {}}
    rig.engine.bus.publish("preload-started", {"name": "disp1"})
    rig.engine.bus.publish("used", {"name": "disp1", "template": "t"})
    rig.engine.bus.publish("removed", {"name": "disp1", "template": "t", "reason": "released"})
    assert (await peer.receive()) == {
        "id": 7,
        "event": "used",
        "data": {"name": "disp1", "template": "t"},
    }
    assert (await peer.receive())["event"] == "removed"
    # The connection still serves requests beside the stream.
    await peer.send({"id": 8, "op": "ping"})
    assert (await peer.receive())["id"] == 8
    await peer.close()


@pytest.mark.asyncio
async def test_a_subscriber_too_slow_to_read_is_cut_off(directory: Path) -> None:
    rig = await start_rig(StubEngine(EventBus(queue_size=8)), Limits(), directory)
    peer = await rig.connect()
    await peer.send({"id": 1, "op": "subscribe"})
    await peer.receive()
    for n in range(100):  # faster than anyone could read: no await in between
        rig.engine.bus.publish("used", {"n": n})
    frames = []
    while "error" not in (frame := await peer.receive()):
        frames.append(frame)
    assert [f["data"]["n"] for f in frames] == list(range(8))
    assert frame["id"] == 1 and frame["error"]["code"] == "cut_off"
    assert "subscribe again" in frame["error"]["message"]
    # Cut off from the bus: nothing more is queued for it.
    assert not rig.engine.bus._subscribers
    await peer.send({"id": 2, "op": "ping"})
    assert (await peer.receive())["id"] == 2
    await rig.stop()


# -- peers that leave -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_peer_that_hangs_up_has_its_request_cancelled(rig: Rig) -> None:
    rig.engine.gates["@dispvm:slow"] = asyncio.Event()
    peer = await rig.connect()
    await peer.send({"id": 1, "op": "request", "args": {"target": "@dispvm:slow"}})
    await asyncio.sleep(0.1)
    await peer.close()
    for _ in range(50):
        if rig.engine.cancelled:
            break
        await asyncio.sleep(0.02)
    assert rig.engine.cancelled == ["@dispvm:slow"]
    assert not rig.server.in_flight()


@pytest.mark.asyncio
async def test_a_peer_that_only_stops_sending_still_gets_its_answers(rig: Rig) -> None:
    rig.engine.gates["@dispvm:slow"] = gate = asyncio.Event()
    peer = await rig.connect()
    await peer.send({"id": 1, "op": "request", "args": {"target": "@dispvm:slow"}})
    peer.writer.write_eof()
    await asyncio.sleep(0.2)
    assert rig.engine.cancelled == []
    gate.set()
    reply = await peer.receive()
    assert reply["id"] == 1 and reply["ok"] is True
    assert await peer.closed_by_server()


@pytest.mark.asyncio
async def test_a_disposable_nobody_could_be_told_about_is_released(rig: Rig) -> None:
    rig.engine.gates["@dispvm:slow"] = gate = asyncio.Event()
    peer = await rig.connect()
    await peer.send({"id": 1, "op": "request", "args": {"target": "@dispvm:slow"}})
    peer.writer.write_eof()
    await asyncio.sleep(0.1)
    peer.writer.transport.abort()  # gone for good, after the server saw only EOF
    await asyncio.sleep(0.1)
    gate.set()
    for _ in range(50):
        if rig.engine.released:
            break
        await asyncio.sleep(0.02)
    assert rig.engine.released == ["disp1"]


# -- shutdown -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_shutdown_drains_then_cuts_short_and_says_so(directory: Path) -> None:
    rig = await start_rig(StubEngine(), Limits(), directory)
    rig.engine.gates["@dispvm:slow"] = asyncio.Event()
    rig.engine.gates["@dispvm:quick"] = quick = asyncio.Event()
    peer = await rig.connect()
    watcher = await rig.connect()
    await watcher.send({"id": 9, "op": "subscribe"})
    await watcher.receive()
    await peer.send({"id": 1, "op": "request", "args": {"target": "@dispvm:slow"}})
    await peer.send({"id": 2, "op": "request", "args": {"target": "@dispvm:quick"}})
    await asyncio.sleep(0.1)
    shutdown = asyncio.create_task(rig.server.shutdown(0.5))
    await asyncio.sleep(0.1)
    # New work is refused while the drain runs; finishing work is answered.
    await peer.send({"id": 3, "op": "ping"})
    assert (await peer.receive())["error"]["code"] == "shutting_down"
    quick.set()
    assert (await peer.receive())["id"] == 2
    cut = await shutdown
    reply = await peer.receive()
    assert reply["id"] == 1
    assert reply["error"]["code"] == "shutting_down"
    assert "cut short" in reply["error"]["message"]
    assert len(cut) == 1 and cut[0].startswith("request (id 1, uid 0")
    end = await watcher.receive()
    assert end["id"] == 9 and end["error"]["code"] == "shutting_down"
    assert await peer.closed_by_server()
    assert await watcher.closed_by_server()
    # No new connection is accepted any more.
    with pytest.raises(OSError):
        await Peer.connect(rig.path)
    await rig.stop()
