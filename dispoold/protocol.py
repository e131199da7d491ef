"""The wire protocol, version 1: framing, the table of operations, errors, replies.

Shared by the server (:mod:`dispoold.rpc`) and the clients (:mod:`dispoold.client`),
so that each shape is declared once. ``docs/protocol.md`` is the description for people;
this is the one for programs.

- A frame is a 4-byte big-endian length N (at most :data:`MAX_FRAME`), then N bytes
  holding exactly one msgpack map.
- :data:`OPERATIONS` is the whole public surface, closed: for each operation its
  argument model, its result model, who may call it, how it runs, and the engine call it
  makes. The server dispatches from this table alone, and the client checks every result
  against the same models. Adding an operation is a row here and a method on the engine.
- :func:`error_for` is the one place an error becomes a wire code: only the engine's
  family (:mod:`dispoold.errors`) maps; anything else is a bug.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Generic, Protocol, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dispoold import __version__, errors
from dispoold.config import describe_validation
from dispoold.events import EVENT_NAMES, EventBus, Subscription
from dispoold.limits import MAX_PRELOAD
from dispoold.views import Handout, PoolView, View

PROTOCOL_VERSION = 1
#: The largest frame body either side sends or accepts, in bytes.
MAX_FRAME = 65536
HEADER = struct.Struct(">I")
#: Largest request id (ids are msgpack unsigned integers).
MAX_ID = 2**64 - 1
#: No string a client sends has any business being longer (template names are at
#: most 31 characters, targets add a short prefix).
MAX_STRING = 256
#: The most event names a ``subscribe`` may list (there are far fewer events).
MAX_EVENT_NAMES = 64


class ErrorCode(StrEnum):
    BAD_REQUEST = "bad_request"
    UNKNOWN_OP = "unknown_op"
    FRAME_TOO_LARGE = "frame_too_large"
    UNAUTHORIZED = "unauthorized"
    NO_SUCH_TEMPLATE = "no_such_template"
    NOT_A_DISPVM_TEMPLATE = "not_a_dispvm_template"
    NO_MEMORY = "no_memory"
    TIMEOUT = "timeout"
    BACKEND_ERROR = "backend_error"
    NOT_FOUND = "not_found"
    SHUTTING_DOWN = "shutting_down"
    #: The daemon has no room for this connection or request now: try again later.
    BUSY = "busy"
    #: A subscriber fell too far behind and its stream was ended: subscribe again.
    CUT_OFF = "cut_off"


#: Codes after which the same call may succeed if made again later, unchanged.
RETRY_LATER = frozenset(
    {ErrorCode.BUSY, ErrorCode.NO_MEMORY, ErrorCode.TIMEOUT, ErrorCode.SHUTTING_DOWN}
)

#: The engine's errors and their wire codes, most specific first.
_ERROR_CODES: tuple[tuple[type[errors.DispooldError], ErrorCode], ...] = (
    (errors.BadRequest, ErrorCode.BAD_REQUEST),
    (errors.NoSuchTemplate, ErrorCode.NO_SUCH_TEMPLATE),
    (errors.NotADispvmTemplate, ErrorCode.NOT_A_DISPVM_TEMPLATE),
    (errors.NotFound, ErrorCode.NOT_FOUND),
    (errors.NoMemory, ErrorCode.NO_MEMORY),
    (errors.RequestTimeout, ErrorCode.TIMEOUT),
    (errors.ShuttingDown, ErrorCode.SHUTTING_DOWN),
    (errors.StartFailed, ErrorCode.BACKEND_ERROR),
    (errors.HypervisorError, ErrorCode.BACKEND_ERROR),
    (errors.DispidsExhausted, ErrorCode.BACKEND_ERROR),
)


def error_for(exc: BaseException) -> tuple[ErrorCode, str] | None:
    """The wire code and message for an error a request ended with, or None when the
    error is not the engine's (a bug: the caller logs it and answers "internal error")."""
    for kind, code in _ERROR_CODES:
        if isinstance(exc, kind):
            return code, str(exc)
    return None


class FrameError(Exception):
    """A frame body is not exactly one msgpack map; the message says what it is instead."""


# -- framing ------------------------------------------------------------------------


def pack_frame(message: Mapping[str, Any]) -> bytes:
    """Header and body of one frame. Raises :class:`FrameError` past :data:`MAX_FRAME`."""
    body: bytes = msgpack.packb(message, use_bin_type=True)
    if len(body) > MAX_FRAME:
        raise FrameError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return HEADER.pack(len(body)) + body


def unpack_body(untrusted_body: bytes) -> dict[Any, Any]:
    """Decode a frame body that must hold exactly one msgpack map.

    Raises :class:`FrameError` for anything else: bad msgpack, trailing bytes, invalid
    UTF-8, nesting too deep for the decoder, a top-level value that is not a map, map
    keys that are neither strings nor bytes.
    """
    if len(untrusted_body) > MAX_FRAME:
        raise FrameError(f"frame of {len(untrusted_body)} bytes exceeds {MAX_FRAME}")
    try:
        untrusted_value = msgpack.unpackb(
            untrusted_body, raw=False, strict_map_key=True, use_list=True
        )
    except msgpack.ExtraData:
        raise FrameError("the frame holds more than one msgpack value") from None
    except UnicodeDecodeError:
        raise FrameError("a string in the frame is not valid UTF-8") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # ValueError covers truncated input, StackError (nesting) and bad map keys.
        raise FrameError(f"the frame is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(untrusted_value, dict):
        raise FrameError(f"the frame holds a {_kind(untrusted_value)}, not a map")
    return untrusted_value


def _kind(value: Any) -> str:
    return {
        list: "list",
        str: "string",
        bytes: "byte string",
        int: "integer",
        float: "float",
        bool: "boolean",
        type(None): "nil",
    }.get(type(value), type(value).__name__)


# -- requests -----------------------------------------------------------------------

#: Client-sent strings: bounded, so that a huge string is refused by name.
WireStr = Annotated[str, Field(max_length=MAX_STRING)]
RequestId = Annotated[int, Field(ge=0, le=MAX_ID)]


class Args(BaseModel):
    # strict: "1" is not 1 and 1.0 is not True; extra="forbid": an unknown key is an
    # error, never ignored (protocol v1).
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Envelope(Args):
    id: RequestId
    op: WireStr
    args: dict[WireStr, Any] = Field(default_factory=dict)


class NoArgs(Args):
    pass


class RequestArgs(Args):
    target: WireStr = "@dispvm"
    #: The calling qube, for ``@dispvm``; nil is the same as leaving it out.
    source: WireStr | None = None
    paused: bool = False
    #: Seconds; nil or absent: the daemon's ``pool.request_timeout``.
    timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None


class ReleaseArgs(Args):
    name: WireStr


class StatusArgs(Args):
    template: WireStr | None = None


class SetMaxArgs(Args):
    #: nil (or absent): the global value.
    template: WireStr | None = None
    #: nil deletes the run-time override; the key itself is required.
    max: Annotated[int, Field(ge=0, le=MAX_PRELOAD)] | None


class SetThresholdArgs(Args):
    #: nil deletes the run-time override; the key itself is required.
    mib: Annotated[int, Field(ge=0, le=2**40)] | None


class RefreshArgs(Args):
    template: WireStr


class SubscribeArgs(Args):
    events: Annotated[list[WireStr], Field(max_length=MAX_EVENT_NAMES)] | None = None

    @field_validator("events")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (unknown := set(value) - EVENT_NAMES):
            known = ", ".join(sorted(EVENT_NAMES))
            raise ValueError(f"unknown events {', '.join(sorted(unknown))}; known: {known}")
        return value


# -- results ------------------------------------------------------------------------


class Pong(View):
    protocol: int
    version: str


class Done(View):
    """The result of an operation that only says it was done: ``{}``."""


# -- the table ----------------------------------------------------------------------


class Who(StrEnum):
    #: uid 0, or a member of the configured group.
    GROUP = "group"
    #: uid 0 only.
    ROOT = "root"


class Runs(StrEnum):
    #: Answered at once, in order, without waiting for anything (``status``).
    INLINE = "inline"
    #: Runs on its own task: a slow one never holds up the others on the connection.
    TASK = "task"
    #: Answered with ``{}``, then event frames until the connection closes.
    STREAM = "stream"


class Engine(Protocol):
    """What the operations call: the pool engine (:class:`dispoold.pool.Pool`)."""

    @property
    def bus(self) -> EventBus: ...

    async def request(
        self, target: str, source: str | None, paused: bool, timeout: float | None
    ) -> Handout: ...

    async def release(self, name: str) -> None: ...

    def status(self, template: str | None = None) -> PoolView: ...

    async def set_max(self, template: str | None, value: int | None) -> None: ...

    async def set_threshold(self, mib: int | None) -> None: ...

    async def refresh(self, template: str) -> None: ...

    async def suspend(self) -> None: ...

    async def resume(self) -> None: ...


A = TypeVar("A", bound=Args)
R = TypeVar("R", bound=View)


@dataclass(frozen=True, slots=True)
class Operation(Generic[A, R]):
    name: str
    args: type[A]
    result: type[R]
    who: Who
    runs: Runs
    #: The engine call. Returns the result (INLINE), an awaitable of it (TASK), or the
    #: :class:`~dispoold.events.Subscription` to stream (STREAM).
    call: Callable[[Engine, A], Any]
    #: For an operation whose success hands something to the caller: undoes it when
    #: the answer could not be delivered (the caller left), so nothing is leaked.
    undo: Callable[[Engine, R], Awaitable[None]] | None = None

    def check_result(self, untrusted_result: Mapping[str, Any]) -> R:
        """The result a daemon answered with, as this operation's model (client side).
        Raises :class:`~pydantic.ValidationError`."""
        return self.result.model_validate(untrusted_result)


async def _done(result: Awaitable[None]) -> Done:
    await result
    return Done()


def _ping(engine: Engine, args: NoArgs) -> Pong:
    return Pong(protocol=PROTOCOL_VERSION, version=__version__)


def _subscribe(engine: Engine, args: SubscribeArgs) -> Subscription:
    return engine.bus.subscribe(args.events)


PING = Operation("ping", NoArgs, Pong, Who.GROUP, Runs.INLINE, _ping)
REQUEST = Operation(
    "request",
    RequestArgs,
    Handout,
    Who.GROUP,
    Runs.TASK,
    lambda engine, a: engine.request(a.target, a.source, a.paused, a.timeout),
    undo=lambda engine, handout: engine.release(handout.name),
)
RELEASE = Operation(
    "release", ReleaseArgs, Done, Who.GROUP, Runs.TASK, lambda e, a: _done(e.release(a.name))
)
STATUS = Operation(
    "status", StatusArgs, PoolView, Who.GROUP, Runs.INLINE, lambda e, a: e.status(a.template)
)
SET_MAX = Operation(
    "set_max",
    SetMaxArgs,
    Done,
    Who.ROOT,
    Runs.TASK,
    lambda e, a: _done(e.set_max(a.template, a.max)),
)
SET_THRESHOLD = Operation(
    "set_threshold",
    SetThresholdArgs,
    Done,
    Who.ROOT,
    Runs.TASK,
    lambda e, a: _done(e.set_threshold(a.mib)),
)
REFRESH = Operation(
    "refresh", RefreshArgs, Done, Who.ROOT, Runs.TASK, lambda e, a: _done(e.refresh(a.template))
)
SUBSCRIBE = Operation("subscribe", SubscribeArgs, Done, Who.GROUP, Runs.STREAM, _subscribe)
SUSPEND = Operation("suspend", NoArgs, Done, Who.ROOT, Runs.TASK, lambda e, a: _done(e.suspend()))
RESUME = Operation("resume", NoArgs, Done, Who.ROOT, Runs.TASK, lambda e, a: _done(e.resume()))

#: Every operation by name: the whole public surface of protocol version 1.
OPERATIONS: Mapping[str, Operation[Any, Any]] = {
    op.name: op
    for op in (
        PING,
        REQUEST,
        RELEASE,
        STATUS,
        SET_MAX,
        SET_THRESHOLD,
        REFRESH,
        SUBSCRIBE,
        SUSPEND,
        RESUME,
    )
}


# -- replies ------------------------------------------------------------------------


class Reply(BaseModel):
    # Replies are read leniently: a newer server may add keys.
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)


class OkReply(Reply):
    id: int
    ok: bool
    result: dict[str, Any]


class ErrorBody(Reply):
    code: str
    message: str


class ErrorReply(Reply):
    #: nil for an error about the connection, not a request (a frame too large, ...).
    id: int | None
    ok: bool
    error: ErrorBody


class EventReply(Reply):
    id: int
    event: str
    data: dict[str, Any]


def ok_reply(request_id: int, result: View) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result.model_dump()}


def error_reply(request_id: int | None, code: ErrorCode, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code.value, "message": message}}


def event_reply(request_id: int, name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "event": name, "data": data}


def read_reply(untrusted_message: Mapping[str, Any]) -> OkReply | ErrorReply | EventReply:
    """One frame from the daemon, as the envelope it is. Raises :class:`FrameError`
    for anything that is none of the three."""
    if "event" in untrusted_message:
        model: type[Reply] = EventReply
    elif untrusted_message.get("ok") is True:
        model = OkReply
    elif untrusted_message.get("ok") is False:
        model = ErrorReply
    else:
        raise FrameError(f"not a reply: keys {sorted(map(str, untrusted_message))}")
    try:
        reply = model.model_validate(untrusted_message)
    except ValidationError as exc:
        raise FrameError(f"malformed {model.__name__}: {describe_validation(exc)}") from None
    if not isinstance(reply, OkReply | ErrorReply | EventReply):  # pragma: no cover
        raise FrameError("not a reply")
    return reply
