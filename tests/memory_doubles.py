"""Doubles for the memory managers' tests: a qmemman on a real Unix socket, and a backend
whose balloon drivers take time.

:class:`QmemmanServer` speaks qmemman's client protocol as qmemman does (one request per
connection, the global lock taken before answering and held until the client closes, a
second line on the same connection ends it, a request it chokes on ends the connection
without an answer). Unlike qmemman, which serves one connection at a time, it accepts
connections concurrently (each waits for the lock), so a test can count how many a client
held open at once.

:class:`BalloonBackend` is :class:`tests.doubles.FakeBackend` with slow balloons: a domain's
actual size moves toward its target at a set speed (MiB/s, per domain), never below a
set floor (a guest that cannot give more), and not at all while it is paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dispoold.backend import MemoryInfo
from tests.doubles import FakeBackend

MIB = 1024 * 1024

#: What the server does with a request instead of answering it.
NO_ANSWER = "<no answer>"  # keep the connection open, say nothing
HANG_UP = "<hang up>"  # close the connection without an answer (qmemman on an exception)


@dataclass
class Request:
    line: str
    answer: str
    #: Seconds between the answer and the client closing the connection.
    held: float | None = None
    #: The client had hung up before qmemman was done with the request.
    gone_before_answer: bool = False


@dataclass
class QmemmanServer:
    path: Path
    #: Answers by request kind: "free" (``<bytes>``), "set" (``<domid>:<bytes> ...``),
    #: "invalid" (anything else); values OK / FAIL / INVALID_ARG / NO_ANSWER / HANG_UP.
    answers: dict[str, str] = field(
        default_factory=lambda: {"free": "OK", "set": "OK", "invalid": "INVALID_ARG"}
    )
    #: Seconds qmemman spends on a request (ballooning) before it answers.
    delay: float = 0.0
    #: Called with {domid: bytes} when a set request is answered OK (simulates ballooning).
    on_set: Callable[[dict[int, int]], None] | None = None
    requests: list[Request] = field(default_factory=list)
    open_now: int = 0
    max_open: int = 0
    second_lines: int = 0

    def __post_init__(self) -> None:
        self.lock = asyncio.Lock()
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.closed = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> QmemmanServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @staticmethod
    def kind(line: str) -> str:
        words = line.split()
        if line.isdigit():
            return "free"
        if words and ":" in words[0]:
            return "set"
        return "invalid"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        loop = asyncio.get_running_loop()
        got_lock = False
        try:
            line = (await reader.read(1024)).strip().decode("ascii", "replace")
            if not line:
                return
            kind = self.kind(line)
            answer = self.answers[kind]
            request = Request(line, answer)
            self.requests.append(request)
            await self.lock.acquire()
            got_lock = True
            answered_at = loop.time()
            await asyncio.sleep(self.delay)
            request.gone_before_answer = reader.at_eof()
            if answer == HANG_UP:
                return
            if answer == NO_ANSWER:
                await reader.read()
                return
            if kind == "set" and answer == "OK" and self.on_set is not None:
                self.on_set({int(d): int(b) for d, b in (pair.split(":") for pair in line.split())})
            writer.write(f"{answer}\n".encode("ascii"))
            await writer.drain()
            # qmemman keeps its lock until the client hangs up.
            if await reader.read(1024):
                self.second_lines += 1  # qmemman: "Second request over qmemman.sock?"
            request.held = loop.time() - answered_at
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            if got_lock:
                self.lock.release()
            self.open_now -= 1
            writer.close()
            self._handlers.discard(task)


def write_avail(path: Path, content: str) -> None:
    """Write qmemman's available-memory file the way qmemman does (temp file + rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(content, encoding="ascii")
    os.replace(tmp, path)


class BalloonBackend(FakeBackend):
    def __init__(self, options: dict[str, Any] | None = None, *, speed_mib_s: float = 1e6) -> None:
        super().__init__(options)
        self.default_speed = speed_mib_s
        #: Per-domain balloon speed (MiB/s) and the size below which it cannot go.
        self.speed: dict[str, float] = {}
        self.stuck_at: dict[str, int] = {}
        #: Every target set, in order: (name, target MiB).
        self.targets: list[tuple[str, int]] = []
        #: Seconds a target request takes to land (a slow hypervisor call in a thread).
        self.set_delay = 0.0
        self._exact: dict[str, float] = {}
        self._moved_at: dict[str, float] = {}

    def advance(self) -> None:
        now = asyncio.get_running_loop().time()
        for domain in self.domains.values():
            exact = self._exact.get(domain.name, float(domain.memory_mib))
            elapsed = now - self._moved_at.get(domain.name, now)
            self._moved_at[domain.name] = now
            step = (
                0.0 if domain.paused else self.speed.get(domain.name, self.default_speed) * elapsed
            )
            target = float(domain.target_mib)
            if exact > target:
                floor = max(target, float(self.stuck_at.get(domain.name, 0)))
                exact = max(exact - step, floor) if exact > floor else exact
            elif exact < target:
                exact = min(exact + step, target)
            self._exact[domain.name] = exact
            domain.memory_mib = round(exact)

    async def set_memory_target(self, name: str, mib: int) -> None:
        await asyncio.sleep(self.set_delay)
        self.advance()
        domain = await self._op("set_memory_target", name)
        domain.target_mib = min(mib, domain.maxmem_mib)
        self.targets.append((name, domain.target_mib))

    async def memory(self, name: str) -> MemoryInfo:
        self.advance()
        return await super().memory(name)

    async def free_memory_mib(self) -> int:
        self.advance()
        return self.free_mib()
