"""Talking to dispoold: a client library for dispoolctl, the qrexec service and other tools.

Two flavours with the same methods: :class:`Client` (blocking, one call at a time) and
:class:`AsyncClient` (asyncio; any number of calls at once on one connection, answered
in whatever order the daemon finishes them)::

    with Client() as dispoold:
        vm = dispoold.request("@dispvm:fedora-dvm", source="work")
        print(vm.name)

    async with AsyncClient() as dispoold:
        async for event in await dispoold.subscribe(["used"]):
            print(event.name, event.data)

Errors the daemon answers with are :class:`RemoteError` subclasses carrying the wire
code (``exc.code``); failing to reach the daemon is :class:`DaemonUnavailable`;
``except NotAllowed`` catches both ways of being refused (socket permissions, or the
daemon's ``unauthorized``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import socket
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from dispoold.protocol import (
    HEADER,
    MAX_FRAME,
    ErrorCode,
    FrameError,
    Handout,
    PingResult,
    StatusResult,
    pack_frame,
    unpack_body,
)

DEFAULT_SOCKET = Path("/run/dispoold/dispoold.sock")


def default_socket() -> Path:
    """``$DISPOOLD_SOCKET``, else the daemon's default socket path."""
    return Path(os.environ.get("DISPOOLD_SOCKET") or DEFAULT_SOCKET)


# -- errors -------------------------------------------------------------------------


class ClientError(Exception):
    """Anything that kept a call from getting an answer."""


class NotAllowed(ClientError):
    """The caller is not allowed: by the socket's permissions, or by the daemon."""


class DaemonUnavailable(ClientError):
    """The daemon cannot be reached: not running, wrong socket path, connection lost."""


class SocketAccessDenied(DaemonUnavailable, NotAllowed):
    """The socket exists but this user may not connect to it."""


class ProtocolViolation(ClientError):
    """The daemon sent something that is not protocol version 1."""


class RemoteError(ClientError):
    """The daemon answered with an error; ``code`` is the wire code."""

    code: str = ""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class BadRequest(RemoteError):
    code = ErrorCode.BAD_REQUEST.value


class UnknownOp(RemoteError):
    code = ErrorCode.UNKNOWN_OP.value


class FrameTooLarge(RemoteError):
    code = ErrorCode.FRAME_TOO_LARGE.value


class Unauthorized(RemoteError, NotAllowed):
    code = ErrorCode.UNAUTHORIZED.value


class NoSuchTemplate(RemoteError):
    code = ErrorCode.NO_SUCH_TEMPLATE.value


class NotADispvmTemplate(RemoteError):
    code = ErrorCode.NOT_A_DISPVM_TEMPLATE.value


class NoMemory(RemoteError):
    code = ErrorCode.NO_MEMORY.value


class Timeout(RemoteError):
    code = ErrorCode.TIMEOUT.value


class BackendError(RemoteError):
    code = ErrorCode.BACKEND_ERROR.value


class NotFound(RemoteError):
    code = ErrorCode.NOT_FOUND.value


class ShuttingDown(RemoteError):
    code = ErrorCode.SHUTTING_DOWN.value


REMOTE_ERRORS: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnknownOp,
        FrameTooLarge,
        Unauthorized,
        NoSuchTemplate,
        NotADispvmTemplate,
        NoMemory,
        Timeout,
        BackendError,
        NotFound,
        ShuttingDown,
    )
}


def remote_error(code: str, message: str) -> RemoteError:
    """The exception for a wire error; a code from a newer daemon gives a plain
    :class:`RemoteError` with that code."""
    cls = REMOTE_ERRORS.get(code)
    return cls(message) if cls is not None else RemoteError(message, code)


def _connect_error(path: Path, exc: OSError) -> ClientError:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return SocketAccessDenied(
            f"not allowed to connect to {path}: ask for root or membership of the daemon's group"
        )
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
        return DaemonUnavailable(f"dispoold is not running (nothing listens on {path})")
    return DaemonUnavailable(f"cannot connect to dispoold at {path}: {exc.strerror or exc}")


# -- messages -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    name: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Reply:
    """One frame from the daemon, checked for shape."""

    id: int | None
    result: dict[str, Any] | None = None
    error: RemoteError | None = None
    event: Event | None = None


def _reply(body: bytes) -> _Reply:
    try:
        message = unpack_body(body)
    except FrameError as exc:
        raise ProtocolViolation(f"bad frame from dispoold: {exc}") from None
    request_id = message.get("id")
    if request_id is not None and type(request_id) is not int:
        raise ProtocolViolation(f"reply id {request_id!r} is not an integer")
    if "event" in message:
        name, data = message.get("event"), message.get("data")
        if not isinstance(name, str) or not isinstance(data, dict) or request_id is None:
            raise ProtocolViolation("malformed event frame from dispoold")
        return _Reply(request_id, event=Event(name, data))
    if message.get("ok") is True and isinstance(message.get("result"), dict):
        return _Reply(request_id, result=message["result"])
    error = message.get("error")
    if message.get("ok") is False and isinstance(error, dict):
        code, text = error.get("code"), error.get("message")
        if isinstance(code, str) and isinstance(text, str):
            return _Reply(request_id, error=remote_error(code, text))
    raise ProtocolViolation(f"malformed reply from dispoold: {sorted(map(str, message))}")


def _args(**values: Any) -> dict[str, Any]:
    """Leave out what the caller left out, so the daemon's defaults apply."""
    return {key: value for key, value in values.items() if value is not None}


# -- blocking -----------------------------------------------------------------------


class Client:
    """A blocking connection to dispoold; one call at a time. Not thread-safe."""

    def __init__(self, path: Path | str | None = None, *, connect_timeout: float = 5.0) -> None:
        self.path = Path(path) if path is not None else default_socket()
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.connect_timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise _connect_error(self.path, exc) from None
        sock.settimeout(None)
        self._sock = sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Self:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and return its result; raises :class:`ClientError`."""
        request_id = self._send(op, args)
        while True:
            reply = self._receive()
            if reply.id is None and reply.error is not None:
                raise reply.error
            if reply.id != request_id or reply.event is not None:
                continue  # an answer to an abandoned call or subscription
            if reply.error is not None:
                raise reply.error
            if reply.result is None:  # pragma: no cover (_reply guarantees one of them)
                raise ProtocolViolation("reply without a result")
            return reply.result

    def ping(self) -> PingResult:
        return PingResult.model_validate(self.call("ping"))

    def request(
        self,
        target: str = "@dispvm",
        *,
        source: str | None = None,
        paused: bool = False,
        timeout: float | None = None,
    ) -> Handout:
        args = _args(target=target, source=source, timeout=timeout)
        args["paused"] = paused
        return Handout.model_validate(self.call("request", args))

    def release(self, name: str) -> None:
        self.call("release", {"name": name})

    def status(self, template: str | None = None) -> StatusResult:
        return StatusResult.model_validate(self.call("status", _args(template=template)))

    def set_max(self, value: int | None, template: str | None = None) -> None:
        self.call("set_max", {"template": template, "max": value})

    def set_threshold(self, mib: int | None) -> None:
        self.call("set_threshold", {"mib": mib})

    def refresh(self, template: str) -> None:
        self.call("refresh", {"template": template})

    def suspend(self) -> None:
        self.call("suspend")

    def resume(self) -> None:
        self.call("resume")

    def subscribe(self, events: list[str] | None = None) -> Iterator[Event]:
        """Subscribe, and return the events as they happen, until the connection closes.

        The subscription is in place when this returns: every event after that is
        delivered. Use a connection of its own for it (other calls on it would have to
        wait for the stream to be read). Iterating raises :class:`RemoteError` if the
        daemon ends the stream (a subscriber too slow to read is cut off, or the daemon
        stops)."""
        request_id = self._send("subscribe", _args(events=events))
        while True:
            reply = self._receive()
            if reply.id is None and reply.error is not None:
                raise reply.error
            if reply.id != request_id:
                continue
            if reply.error is not None:
                raise reply.error
            if reply.result is not None:
                return self._events(request_id)

    def _events(self, request_id: int) -> Iterator[Event]:
        while True:
            try:
                reply = self._receive()
            except DaemonUnavailable:
                return
            if reply.id is None and reply.error is not None:
                raise reply.error
            if reply.id != request_id:
                continue
            if reply.error is not None:
                raise reply.error
            if reply.event is not None:
                yield reply.event

    def _send(self, op: str, args: Mapping[str, Any] | None) -> int:
        if self._sock is None:
            self.connect()
        if self._sock is None:  # pragma: no cover
            raise DaemonUnavailable("not connected")
        request_id = next(self._ids)
        message: dict[str, Any] = {"id": request_id, "op": op}
        if args:
            message["args"] = dict(args)
        try:
            self._sock.sendall(pack_frame(message))
        except FrameError as exc:
            raise FrameTooLarge(str(exc)) from None
        except OSError as exc:
            self.close()
            raise DaemonUnavailable(f"connection to dispoold lost: {exc.strerror or exc}") from None
        return request_id

    def _receive(self) -> _Reply:
        (length,) = HEADER.unpack(self._read(HEADER.size))
        if length > MAX_FRAME:
            self.close()
            raise ProtocolViolation(f"dispoold sent a frame of {length} bytes")
        return _reply(self._read(length))

    def _read(self, size: int) -> bytes:
        if self._sock is None:
            raise DaemonUnavailable("not connected")
        chunks = []
        while size:
            try:
                chunk = self._sock.recv(min(size, 1 << 16))
            except OSError as exc:
                chunk = b""
                reason = exc.strerror or str(exc)
            else:
                reason = "the daemon closed the connection"
            if not chunk:
                self.close()
                raise DaemonUnavailable(f"connection to dispoold lost: {reason}")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)


# -- asyncio ------------------------------------------------------------------------


class EventStream:
    """The events of one subscription (:meth:`AsyncClient.subscribe`)."""

    def __init__(
        self, queue: asyncio.Queue[Event | BaseException | None], forget: Callable[[], object]
    ) -> None:
        self._queue = queue
        self._forget = forget
        self._ended = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        if self._ended:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is None:
            self.close()
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.close()
            raise item
        return item

    def close(self) -> None:
        """Stop receiving (the daemon keeps sending until the connection closes)."""
        self._ended = True
        self._forget()


class AsyncClient:
    """An asyncio connection to dispoold. Calls may run concurrently on it; each waits
    for its own answer."""

    def __init__(self, path: Path | str | None = None, *, connect_timeout: float = 5.0) -> None:
        self.path = Path(path) if path is not None else default_socket()
        self.connect_timeout = connect_timeout
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._streams: dict[int, asyncio.Queue[Event | BaseException | None]] = {}
        self._lost: ClientError | None = None

    async def connect(self) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, self._writer = await asyncio.open_unix_connection(
                    str(self.path), limit=MAX_FRAME + HEADER.size
                )
        except TimeoutError:
            raise DaemonUnavailable(
                f"dispoold at {self.path} does not accept connections"
            ) from None
        except OSError as exc:
            raise _connect_error(self.path, exc) from None
        self._lost = None
        self._reader_task = asyncio.create_task(self._read_loop(reader), name="dispoold-client")

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None
        self._fail_all(DaemonUnavailable("connection closed"))

    async def __aenter__(self) -> Self:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def call(self, op: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send one request and wait for its result; raises :class:`ClientError`."""
        request_id = self._next_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[request_id] = future
        try:
            await self._send(request_id, op, args)
            return await future
        finally:
            self._calls.pop(request_id, None)

    async def ping(self) -> PingResult:
        return PingResult.model_validate(await self.call("ping"))

    async def request(
        self,
        target: str = "@dispvm",
        *,
        source: str | None = None,
        paused: bool = False,
        timeout: float | None = None,
    ) -> Handout:
        args = _args(target=target, source=source, timeout=timeout)
        args["paused"] = paused
        return Handout.model_validate(await self.call("request", args))

    async def release(self, name: str) -> None:
        await self.call("release", {"name": name})

    async def status(self, template: str | None = None) -> StatusResult:
        return StatusResult.model_validate(await self.call("status", _args(template=template)))

    async def set_max(self, value: int | None, template: str | None = None) -> None:
        await self.call("set_max", {"template": template, "max": value})

    async def set_threshold(self, mib: int | None) -> None:
        await self.call("set_threshold", {"mib": mib})

    async def refresh(self, template: str) -> None:
        await self.call("refresh", {"template": template})

    async def suspend(self) -> None:
        await self.call("suspend")

    async def resume(self) -> None:
        await self.call("resume")

    async def subscribe(self, events: list[str] | None = None) -> EventStream:
        """Subscribe; returns once the subscription is in place, so that every event
        after that is delivered::

            stream = await client.subscribe(["used"])
            async for event in stream: ...

        Iterating raises :class:`RemoteError` if the daemon ends the stream (a
        subscriber too slow to read is cut off, or the daemon stops), and ends when the
        connection closes."""
        request_id = self._next_id()
        queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()
        self._streams[request_id] = queue
        ack: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._calls[request_id] = ack
        try:
            await self._send(request_id, "subscribe", _args(events=events))
            await ack
        except BaseException:
            self._streams.pop(request_id, None)
            raise
        finally:
            self._calls.pop(request_id, None)
        return EventStream(queue, lambda: self._streams.pop(request_id, None))

    def _next_id(self) -> int:
        return next(self._ids)

    async def _send(self, request_id: int, op: str, args: Mapping[str, Any] | None) -> None:
        if self._lost is not None:
            raise self._lost
        if self._writer is None:
            await self.connect()
        if self._writer is None:  # pragma: no cover
            raise DaemonUnavailable("not connected")
        message: dict[str, Any] = {"id": request_id, "op": op}
        if args:
            message["args"] = dict(args)
        try:
            frame = pack_frame(message)
        except FrameError as exc:
            raise FrameTooLarge(str(exc)) from None
        try:
            self._writer.write(frame)
            await self._writer.drain()
        except OSError as exc:
            raise DaemonUnavailable(f"connection to dispoold lost: {exc.strerror or exc}") from None

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        lost: ClientError = DaemonUnavailable("connection to dispoold lost: the daemon closed it")
        try:
            while True:
                (length,) = HEADER.unpack(await reader.readexactly(HEADER.size))
                if length > MAX_FRAME:
                    raise ProtocolViolation(f"dispoold sent a frame of {length} bytes")
                self._dispatch(_reply(await reader.readexactly(length)))
        except asyncio.IncompleteReadError:
            pass
        except OSError as exc:
            lost = DaemonUnavailable(f"connection to dispoold lost: {exc.strerror or exc}")
        except ProtocolViolation as exc:
            lost = exc
        except RemoteError as exc:  # a connection-level error (id nil): it ends the connection
            lost = exc
        self._fail_all(lost)

    def _dispatch(self, reply: _Reply) -> None:
        if reply.id is None:
            if reply.error is not None:
                raise reply.error
            return
        stream = self._streams.get(reply.id)
        if reply.event is not None:
            if stream is not None:
                stream.put_nowait(reply.event)
            return
        future = self._calls.pop(reply.id, None)
        if future is not None and not future.done():
            if reply.error is not None:
                future.set_exception(reply.error)
            else:
                future.set_result(reply.result or {})
        elif stream is not None and reply.error is not None:
            stream.put_nowait(reply.error)

    def _fail_all(self, error: ClientError) -> None:
        self._lost = error
        for future in self._calls.values():
            if not future.done():
                future.set_exception(error)
        self._calls.clear()
        for queue in self._streams.values():
            queue.put_nowait(None if isinstance(error, DaemonUnavailable) else error)
