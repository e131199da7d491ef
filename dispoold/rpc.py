"""The daemon's socket face: frames in, checked commands to the engine, replies out.

This module knows the wire (:mod:`dispoold.protocol`) and who the peer is; it knows
nothing of VMs. Everything a peer sends is ``untrusted_...`` until
:func:`check_request` has looked at it; the engine only ever sees plain, checked
arguments. Engine errors become wire replies in exactly one place, :func:`error_for`.

Bounds, so that no peer can make the daemon grow without limit or stop serving others:

- at most :attr:`Limits.max_connections` connections, and
  :attr:`Limits.max_connections_per_uid` from one uid; one more gets an error frame
  and is closed;
- at most :attr:`Limits.max_in_flight` requests running per connection; past that the
  server stops reading from that connection until one finishes (the peer's writes
  block: back-pressure, not an error);
- a frame's body must arrive within :attr:`Limits.frame_timeout` of its header;
- a subscriber that stops reading is cut off by the event bus with an error frame
  (its queue is bounded), and the socket's own buffer is bounded by back-pressure.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import select
import socket
import struct
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from dispoold.config import describe_validation
from dispoold.events import SubscriberOverflow, Subscription
from dispoold.protocol import (
    HEADER,
    MAX_FRAME,
    MAX_ID,
    OPERATIONS,
    PROTOCOL_VERSION,
    Args,
    Engine,
    Envelope,
    ErrorCode,
    FrameError,
    Operation,
    Runs,
    Who,
    error_for,
    error_reply,
    event_reply,
    ok_reply,
    pack_frame,
    unpack_body,
)
from dispoold.views import View

INTERNAL_ERROR = "internal error, see the daemon's log"
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13


# -- who is calling -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """The connecting process as the kernel saw it at connect time (SO_PEERCRED)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()

    def __str__(self) -> str:
        return f"uid {self.uid} pid {self.pid}"


#: A peer whose credentials could not be read: allowed nothing.
UNKNOWN_PEER = Peer(pid=0, uid=-1, gid=-1)


def peer_of(sock: Any) -> Peer:
    """Credentials of the process at the other end of the Unix socket ``sock``."""
    try:
        pid, uid, gid = struct.unpack(
            "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        )
    except OSError:
        return UNKNOWN_PEER
    return Peer(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock))


def _peer_groups(sock: Any) -> frozenset[int]:
    # SO_PEERCRED has the primary group only; the configured group is usually a
    # supplementary one (qubes). Reading /proc/PID would race with PID reuse.
    size = 4 * 64
    while size <= 4 * 65536:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                size *= 16
                continue
            return frozenset()
        return frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    return frozenset()


@dataclass(frozen=True, slots=True)
class Access:
    """Who may call what: uid 0 anything; members of ``gid`` the operations for the
    group (:attr:`~dispoold.protocol.Who.GROUP`); anyone else nothing."""

    gid: int | None

    def allows(self, peer: Peer, who: Who) -> bool:
        if peer.uid == 0:
            return True
        if who is Who.ROOT or self.gid is None:
            return False
        return peer.gid == self.gid or self.gid in peer.groups


# -- checking a request: the one fenced place ---------------------------------------


@dataclass(frozen=True, slots=True)
class Command:
    """A request that passed every check: a known operation, allowed for this peer,
    with arguments of the right types."""

    id: int
    op: Operation[Any, Any]
    args: Args


@dataclass(frozen=True, slots=True)
class Rejection:
    """A request that did not: the reply it gets."""

    id: int | None
    code: ErrorCode
    message: str


def check_request(untrusted_body: bytes, peer: Peer, access: Access) -> Command | Rejection:
    """Decode and check one frame body. Never raises: every input gets a
    :class:`Command` to run or a :class:`Rejection` to answer with."""
    try:
        untrusted_message = unpack_body(untrusted_body)
    except FrameError as exc:
        return Rejection(None, ErrorCode.BAD_REQUEST, str(exc))
    # Echo the id in the error reply whenever it is a valid one, even if the rest is not.
    untrusted_id = untrusted_message.get("id")
    request_id = untrusted_id if type(untrusted_id) is int and 0 <= untrusted_id <= MAX_ID else None
    try:
        envelope = Envelope.model_validate(untrusted_message)
    except ValidationError as exc:
        return Rejection(request_id, ErrorCode.BAD_REQUEST, describe_validation(exc))
    op = OPERATIONS.get(envelope.op)
    if op is None:
        known = ", ".join(OPERATIONS)
        return Rejection(
            envelope.id,
            ErrorCode.UNKNOWN_OP,
            f"unknown op {envelope.op!r}; protocol {PROTOCOL_VERSION} knows {known}",
        )
    if not access.allows(peer, op.who):
        who = "root" if op.who is Who.ROOT else "root or the daemon's group"
        return Rejection(
            envelope.id, ErrorCode.UNAUTHORIZED, f"{op.name} is for {who}; you are {peer}"
        )
    try:
        args = op.args.model_validate(envelope.args)
    except ValidationError as exc:
        return Rejection(
            envelope.id, ErrorCode.BAD_REQUEST, describe_validation(exc, prefix="args")
        )
    return Command(envelope.id, op, args)


# -- the server ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Limits:
    max_connections: int = 1024
    #: So that one user (or one runaway script) cannot take every connection.
    max_connections_per_uid: int = 256
    max_in_flight: int = 64
    max_subscriptions: int = 16
    frame_timeout: float = 10.0


@dataclass(eq=False)
class _Pending:
    command: Command
    peer: Peer
    #: Set when shutdown cancelled it, so the reply says shutting_down.
    cut_short: bool = False


class Server:
    """Serves the protocol on a listening Unix socket, in front of ``engine``."""

    def __init__(
        self,
        engine: Engine,
        *,
        access: Access,
        log: logging.Logger,
        limits: Limits = Limits(),
    ) -> None:
        self.engine = engine
        #: Replaced on reload (SIGHUP); read on every request.
        self.access = access
        self.log = log
        self.limits = limits
        #: Shutdown has begun: new requests are answered with ``shutting_down``.
        self.closing = False
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_Connection] = set()
        self._reclaims: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        """Serve on ``sock``, a bound and listening Unix stream socket."""
        self._server = await asyncio.start_unix_server(
            self._accept, sock=sock, limit=MAX_FRAME + HEADER.size
        )

    @property
    def connections(self) -> int:
        return len(self._connections)

    def in_flight(self) -> list[_Pending]:
        return [p for c in self._connections for p in c.tasks.values()]

    async def shutdown(self, drain: float) -> list[str]:
        """Stop accepting; answer new requests with ``shutting_down``; wait up to
        ``drain`` seconds for running requests, then cut the rest short (their callers
        get ``shutting_down``); end subscriptions and close every connection.

        Returns a description of each request that was cut short.
        """
        self.closing = True
        if self._server is not None:
            self._server.close()
        tasks = [t for c in self._connections for t in c.tasks]
        if tasks:
            await asyncio.wait(tasks, timeout=drain)
        cut = [
            f"{p.command.op.name} (id {p.command.id}, {p.peer})"
            for c in self._connections
            for t, p in c.tasks.items()
            if not t.done()
        ]
        await asyncio.gather(*(c.stop() for c in list(self._connections)))
        if self._reclaims:
            await asyncio.wait(list(self._reclaims), timeout=max(drain, 1.0))
        return cut

    def reclaim(self, command: Command, result: View, peer: Peer) -> None:
        """``command`` succeeded, but ``peer`` left before hearing the answer: nobody
        else knows what it was given (a disposable), so undo it rather than leak it."""
        if command.op.undo is None:
            return
        self.log.warning(
            "%s left before receiving the answer to %s; undoing it", peer, command.op.name
        )
        task = asyncio.create_task(self._undo(command.op, result), name=f"reclaim-{command.id}")
        self._reclaims.add(task)
        task.add_done_callback(self._reclaims.discard)

    async def _undo(self, op: Operation[Any, Any], result: View) -> None:
        if op.undo is None:  # pragma: no cover - checked by reclaim
            return
        try:
            await op.undo(self.engine, result)
        except Exception:
            self.log.exception("could not undo %s, whose answer nobody received", op.name)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = peer_of(writer.get_extra_info("socket"))
        connection = _Connection(self, reader, writer, peer)
        mine = sum(1 for c in self._connections if c.peer.uid == peer.uid)
        if len(self._connections) >= self.limits.max_connections:
            reason = f"too many connections ({len(self._connections)}); try again later"
        elif mine >= self.limits.max_connections_per_uid:
            reason = f"too many connections from uid {peer.uid} ({mine}); try again later"
        else:
            reason = None
        if reason is not None:
            self.log.warning("refusing %s: %s", peer, reason)
            await connection.refuse(reason)
            return
        self._connections.add(connection)
        try:
            await connection.serve()
        finally:
            self._connections.discard(connection)


class _Connection:
    def __init__(
        self,
        server: Server,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: Peer,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.log = server.log
        self.tasks: dict[asyncio.Task[None], _Pending] = {}
        self.streams: dict[asyncio.Task[None], Subscription] = {}
        self._slots = asyncio.Semaphore(server.limits.max_in_flight)
        self._gone = False

    async def refuse(self, message: str) -> None:
        await self.send(error_reply(None, ErrorCode.BUSY, message))
        await self.close()

    async def serve(self) -> None:
        try:
            while (untrusted_body := await self._read_frame()) is not None:
                await self._handle(untrusted_body)
        except (ConnectionError, OSError):
            self._gone = True
        finally:
            await self._finish()

    async def _read_frame(self) -> bytes | None:
        """The next frame's body; None once the connection should end (after
        answering whatever made it end)."""
        try:
            header = await self.reader.readexactly(HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                await self.send(error_reply(None, ErrorCode.BAD_REQUEST, "truncated frame header"))
            return None
        (untrusted_length,) = HEADER.unpack(header)
        if untrusted_length > MAX_FRAME:
            await self.send(
                error_reply(
                    None,
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame of {untrusted_length} bytes; the limit is {MAX_FRAME}",
                )
            )
            return None
        try:
            async with asyncio.timeout(self.server.limits.frame_timeout):
                return await self.reader.readexactly(untrusted_length)
        except asyncio.IncompleteReadError as exc:
            message = f"truncated frame: {len(exc.partial)} of {untrusted_length} bytes"
        except TimeoutError:
            message = (
                f"incomplete frame: the rest of its {untrusted_length} bytes did not arrive"
                f" within {self.server.limits.frame_timeout:g} s"
            )
        await self.send(error_reply(None, ErrorCode.BAD_REQUEST, message))
        return None

    async def _handle(self, untrusted_body: bytes) -> None:
        checked = check_request(untrusted_body, self.peer, self.server.access)
        if isinstance(checked, Rejection):
            self.log.debug("%s: %s: %s", self.peer, checked.code, checked.message)
            await self.send(error_reply(checked.id, checked.code, checked.message))
            return
        command = checked
        self.log.debug("%s: %s (id %d)", self.peer, command.op.name, command.id)
        runs = command.op.runs
        if runs is Runs.TASK:
            # Each request runs on its own, so a slow one never holds up the rest; the
            # semaphore makes a peer with too many of them wait before we read more.
            await self._slots.acquire()
        if self.server.closing:  # also when shutdown began while this one waited
            if runs is Runs.TASK:
                self._slots.release()
            await self.send(
                error_reply(command.id, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            )
        elif runs is Runs.INLINE:
            await self._inline(command)
        elif runs is Runs.STREAM:
            await self._subscribe(command)
        else:
            pending = _Pending(command, self.peer)
            name = f"rpc-{command.op.name}-{command.id}"
            task = asyncio.create_task(self._run(pending), name=name)
            self.tasks[task] = pending

    async def _inline(self, command: Command) -> None:
        try:
            result = command.op.call(self.server.engine, command.args)
        except Exception as exc:
            await self.send(self._failure(command, exc))
        else:
            await self.send(ok_reply(command.id, result))

    async def _run(self, pending: _Pending) -> None:
        command = pending.command
        try:
            call: Awaitable[View] = command.op.call(self.server.engine, command.args)
            result = await call
        except asyncio.CancelledError:
            if not pending.cut_short:
                raise  # the peer is gone: nobody to answer
            await self.send(
                error_reply(
                    command.id,
                    ErrorCode.SHUTTING_DOWN,
                    "the daemon is shutting down; the request was cut short",
                )
            )
        except Exception as exc:
            await self.send(self._failure(command, exc))
        else:
            delivered = False
            try:
                delivered = await self.send(ok_reply(command.id, result))
            except asyncio.CancelledError:
                # Cut short while the reply waited for room in the socket: it is queued,
                # and reaches the peer unless the peer is gone.
                delivered = not (self._gone or self._peer_hung_up())
                raise
            finally:
                if not delivered:
                    self.server.reclaim(command, result, self.peer)
        finally:
            self._slots.release()
            self.tasks.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    def _failure(self, command: Command, exc: Exception) -> dict[str, Any]:
        mapped = error_for(exc)
        if mapped is None:
            self.log.error(
                "internal error in %s (id %d, %s)",
                command.op.name,
                command.id,
                self.peer,
                exc_info=exc,
            )
            return error_reply(command.id, ErrorCode.BACKEND_ERROR, INTERNAL_ERROR)
        code, message = mapped
        return error_reply(command.id, code, message)

    async def _subscribe(self, command: Command) -> None:
        if len(self.streams) >= self.server.limits.max_subscriptions:
            await self.send(
                error_reply(
                    command.id,
                    ErrorCode.BAD_REQUEST,
                    f"at most {self.server.limits.max_subscriptions} subscriptions per connection",
                )
            )
            return
        try:
            subscription: Subscription = command.op.call(self.server.engine, command.args)
        except Exception as exc:
            await self.send(self._failure(command, exc))
            return
        # The acknowledgement goes out before any event: whatever happens after the
        # client reads it is delivered.
        await self.send(ok_reply(command.id, command.op.result()))
        task = asyncio.create_task(
            self._stream(command.id, subscription), name=f"rpc-subscribe-{command.id}"
        )
        self.streams[task] = subscription

    async def _stream(self, request_id: int, subscription: Subscription) -> None:
        try:
            async for event in subscription:
                if not await self.send(event_reply(request_id, event.name, event.data)):
                    return
        except SubscriberOverflow as exc:
            self.log.info("%s: subscription %d cut off: %s", self.peer, request_id, exc)
            await self.send(error_reply(request_id, ErrorCode.CUT_OFF, str(exc)))
            return
        finally:
            subscription.close()
            self.streams.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
        if self.server.closing:
            await self.send(
                error_reply(request_id, ErrorCode.SHUTTING_DOWN, "the daemon is shutting down")
            )

    async def send(self, message: dict[str, Any]) -> bool:
        """Write one frame; False if the peer is gone."""
        if self._gone or self.writer.is_closing():
            return False
        try:
            frame = pack_frame(message)
        except (FrameError, TypeError, ValueError) as exc:
            self.log.error("cannot encode the reply to id %s: %s", message.get("id"), exc)
            frame = pack_frame(
                error_reply(message.get("id"), ErrorCode.BACKEND_ERROR, INTERNAL_ERROR)
            )
        try:
            self.writer.write(frame)
            await self.writer.drain()
        except (ConnectionError, OSError):
            self._gone = True
            return False
        return True

    def _peer_hung_up(self) -> bool:
        """After EOF: True if the peer closed the connection, False if it only shut
        down its sending side and still reads the answers (like ``nc -N``)."""
        sock = self.writer.get_extra_info("socket")
        if sock is None:
            return True
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLHUP)
        return any(mask & (select.POLLHUP | select.POLLERR) for _, mask in poller.poll(0))

    async def _finish(self) -> None:
        for subscription in self.streams.values():
            subscription.close()
        if self.tasks and (self._gone or self._peer_hung_up()):
            # Nobody will read the answers; the engine puts back what it had taken.
            for task in self.tasks:
                task.cancel()
        pending = [*self.tasks, *self.streams]
        if pending:
            await asyncio.wait(pending)
        await self.close()

    async def stop(self) -> None:
        """At shutdown, after the drain: cut short what still runs (its caller hears
        ``shutting_down``), end the subscriptions (likewise), then close."""
        for task, pending in self.tasks.items():
            pending.cut_short = True
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        await self.close()

    async def close(self) -> None:
        for subscription in self.streams.values():
            subscription.close()
        if self.streams:
            await asyncio.wait(list(self.streams), timeout=1.0)
        if not self.writer.is_closing():
            self.writer.close()
        try:
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        except (TimeoutError, ConnectionError, OSError):
            # A peer that does not read keeps our buffer full: drop it.
            self.writer.transport.abort()
