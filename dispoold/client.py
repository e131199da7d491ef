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
code (``exc.code``; ``exc.retry_later`` says whether the same call may succeed later);
failing to reach the daemon is :class:`DaemonUnavailable`; ``except NotAllowed`` catches
both ways of being refused (socket permissions, or the daemon's ``unauthorized``).
Results are checked against the models of :data:`dispoold.protocol.OPERATIONS`.
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
from typing import Any, Self, TypeVar

from pydantic import ValidationError

from dispoold import DEFAULT_SOCKET
from dispoold.protocol import (
    HEADER,
    MAX_FRAME,
    OPERATIONS,
    PING,
    REQUEST,
    RETRY_LATER,
    STATUS,
    ErrorCode,
    ErrorReply,
    EventReply,
    FrameError,
    Operation,
    Pong,
    pack_frame,
    read_reply,
    unpack_body,
)
from dispoold.views import Handout, PoolView, View


def default_socket() -> Path:
    """``$DISPOOLD_SOCKET``, else the daemon's default socket path."""
    return Path(os.environ.get("DISPOOLD_SOCKET") or DEFAULT_SOCKET)


# -- errors -------------------------------------------------------------------------
#
# Named from the client's side (what happened to the call), so that they never read
# like the daemon's own errors (dispoold.errors) in a grep or a review.


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

    @property
    def retry_later(self) -> bool:
        """The same call may succeed if made again later (busy, out of memory, timed
        out, the daemon stopping); otherwise something must change first."""
        return self.code in RETRY_LATER


class InvalidRequest(RemoteError):
    """The daemon refused the request's shape or values (``bad_request``)."""

    code = ErrorCode.BAD_REQUEST.value


class UnsupportedOperation(RemoteError):
    """This daemon does not know the operation (``unknown_op``)."""

    code = ErrorCode.UNKNOWN_OP.value


class MessageTooLarge(RemoteError):
    """A frame was over the size limit (``frame_too_large``)."""

    code = ErrorCode.FRAME_TOO_LARGE.value


class PermissionRefused(RemoteError, NotAllowed):
    """The daemon does not allow this caller the operation (``unauthorized``)."""

    code = ErrorCode.UNAUTHORIZED.value


class UnknownTemplate(RemoteError):
    """No such template, none with that tag, or no default one (``no_such_template``)."""

    code = ErrorCode.NO_SUCH_TEMPLATE.value


class NotDisposableTemplate(RemoteError):
    """The template exists but is not a disposable template (``not_a_dispvm_template``)."""

    code = ErrorCode.NOT_A_DISPVM_TEMPLATE.value


class OutOfMemory(RemoteError):
    """The host cannot spare the memory for a disposable now (``no_memory``)."""

    code = ErrorCode.NO_MEMORY.value


class TimedOut(RemoteError):
    """No disposable within the request's timeout (``timeout``)."""

    code = ErrorCode.TIMEOUT.value


class DaemonFailed(RemoteError):
    """The hypervisor, the memory manager or the daemon itself failed (``backend_error``)."""

    code = ErrorCode.BACKEND_ERROR.value


class UnknownDisposable(RemoteError):
    """No handed-out disposable of that name (``not_found``)."""

    code = ErrorCode.NOT_FOUND.value


class DaemonStopping(RemoteError):
    """The daemon is shutting down (``shutting_down``)."""

    code = ErrorCode.SHUTTING_DOWN.value


class DaemonBusy(RemoteError):
    """No room for this connection or request now (``busy``): try again later."""

    code = ErrorCode.BUSY.value


class SubscriptionCutOff(RemoteError):
    """The subscriber read too slowly and its stream was ended (``cut_off``)."""

    code = ErrorCode.CUT_OFF.value


REMOTE_ERRORS: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        InvalidRequest,
        UnsupportedOperation,
        MessageTooLarge,
        PermissionRefused,
        UnknownTemplate,
        NotDisposableTemplate,
        OutOfMemory,
        TimedOut,
        DaemonFailed,
        UnknownDisposable,
        DaemonStopping,
        DaemonBusy,
        SubscriptionCutOff,
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
        reply = read_reply(unpack_body(body))
    except FrameError as exc:
        raise ProtocolViolation(f"bad frame from dispoold: {exc}") from None
    if isinstance(reply, EventReply):
        return _Reply(reply.id, event=Event(reply.event, reply.data))
    if isinstance(reply, ErrorReply):
        return _Reply(reply.id, error=remote_error(reply.error.code, reply.error.message))
    return _Reply(reply.id, result=reply.result)


R = TypeVar("R", bound=View)


def _checked(op: Operation[Any, R], untrusted_result: dict[str, Any]) -> R:
    """``untrusted_result`` checked against the operation's result model."""
    try:
        return op.check_result(untrusted_result)
    except ValidationError as exc:
        raise ProtocolViolation(f"malformed {op.name} result from dispoold: {exc}") from None


def _operation(name: str) -> Operation[Any, Any]:
    op = OPERATIONS.get(name)
    if op is None:
        raise UnsupportedOperation(f"protocol 1 has no operation {name!r}")
    return op


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

    def invoke(self, op: str, **args: Any) -> View:
        """Call any operation of the table (:data:`dispoold.protocol.OPERATIONS`) with
        keyword arguments (None ones left out); returns its checked result."""
        operation: Operation[Any, View] = _operation(op)
        return _checked(operation, self.call(op, _args(**args)))

    def ping(self) -> Pong:
        return _checked(PING, self.call("ping"))

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
        return _checked(REQUEST, self.call("request", args))

    def release(self, name: str) -> None:
        self.call("release", {"name": name})

    def status(self, template: str | None = None) -> PoolView:
        return _checked(STATUS, self.call("status", _args(template=template)))

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
            raise MessageTooLarge(str(exc)) from None
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

    async def invoke(self, op: str, **args: Any) -> View:
        """Call any operation of the table with keyword arguments (None ones left out);
        returns its checked result."""
        operation: Operation[Any, View] = _operation(op)
        return _checked(operation, await self.call(op, _args(**args)))

    async def ping(self) -> Pong:
        return _checked(PING, await self.call("ping"))

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
        return _checked(REQUEST, await self.call("request", args))

    async def release(self, name: str) -> None:
        await self.call("release", {"name": name})

    async def status(self, template: str | None = None) -> PoolView:
        return _checked(STATUS, await self.call("status", _args(template=template)))

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
            raise MessageTooLarge(str(exc)) from None
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
