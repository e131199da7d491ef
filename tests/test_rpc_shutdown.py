"""A request that gets its slot only after shutdown began is answered, and not run.

A peer past its in-flight bound waits for a slot before its next request is read on;
if shutdown begins meanwhile, that request must still get a reply (``shutting_down``).
Started as a task once shutdown was under way, it would be cut short before it ran its
first line, and its caller would hear nothing at all (issue 16).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from typing import Any

import msgpack
import pytest

from dispoold.events import EventBus
from dispoold.protocol import HEADER
from dispoold.rpc import Access, Limits, Server
from dispoold.views import Handout, PoolView
from tests.daemon_harness import short_tempdir


class SlowEngine:
    """Answers requests once ``gate`` opens; records which targets it was asked for."""

    def __init__(self) -> None:
        self.bus = EventBus()
        self.gate = asyncio.Event()
        self.asked: list[str] = []
        self.running = asyncio.Event()

    async def request(
        self,
        target: str = "@dispvm",
        source: str | None = None,
        paused: bool = False,
        timeout: float | None = None,
    ) -> Handout:
        self.asked.append(target)
        self.running.set()
        await self.gate.wait()
        n = len(self.asked)
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
        pass

    def status(self, template: str | None = None) -> PoolView:
        return PoolView(templates=[], memory={})

    async def set_max(self, template: str | None, value: int | None) -> None:
        pass

    async def set_threshold(self, mib: int | None) -> None:
        pass

    async def refresh(self, template: str) -> None:
        pass

    async def suspend(self) -> None:
        pass

    async def resume(self) -> None:
        pass


async def send(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
    body = msgpack.packb(message, use_bin_type=True)
    writer.write(HEADER.pack(len(body)) + body)
    await writer.drain()


async def replies(reader: asyncio.StreamReader, timeout: float) -> list[dict[str, Any]]:
    """Every reply until the server closes the connection (or ``timeout``)."""
    got: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                got.append(msgpack.unpackb(await reader.readexactly(length), raw=False))
    except (asyncio.IncompleteReadError, TimeoutError):
        return got


@pytest.mark.asyncio
async def test_a_request_that_gets_its_slot_after_shutdown_began_is_told_so_and_not_run() -> None:
    directory = short_tempdir()
    try:
        path = directory / "s.sock"
        listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listening.bind(str(path))
        listening.listen(4)
        listening.setblocking(False)
        engine = SlowEngine()
        server = Server(
            engine,
            access=Access(gid=None),
            log=logging.getLogger("test.rpc"),
            limits=Limits(max_in_flight=1),
        )
        await server.start(listening)
        reader, writer = await asyncio.open_unix_connection(str(path))
        await send(writer, {"id": 1, "op": "request", "args": {"target": "@dispvm:first"}})
        await send(writer, {"id": 2, "op": "request", "args": {"target": "@dispvm:second"}})
        await asyncio.wait_for(engine.running.wait(), 5)  # the first runs...
        await asyncio.sleep(0.2)  # ...and the second has been read: it waits for the slot
        assert engine.asked == ["@dispvm:first"]
        shutdown = asyncio.create_task(server.shutdown(5.0))
        await asyncio.sleep(0.2)
        engine.gate.set()  # the first finishes within the drain, and frees the slot
        await shutdown
        got = {reply["id"]: reply for reply in await replies(reader, 5.0)}
        writer.close()
        assert got[1]["ok"] is True
        assert 2 in got, "the second request got no reply at all"
        assert engine.asked == ["@dispvm:first"], "the second ran although shutdown had begun"
        assert got[2].get("error", {}).get("code") == "shutting_down", got[2]
    finally:
        shutil.rmtree(directory, ignore_errors=True)
