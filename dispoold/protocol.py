"""The wire protocol, version 1: framing, error codes and the shape of every message.

Shared by the server (:mod:`dispoold.rpc`) and the clients (:mod:`dispoold.client`),
so that each shape is declared once. Nothing here knows about VMs or the pool: this
module turns bytes into checked values and back. ``docs/protocol.md`` is the
description for people; this is the one for programs.

A frame is a 4-byte big-endian length N (at most :data:`MAX_FRAME`), then N bytes
holding exactly one msgpack map.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dispoold.events import EVENT_NAMES

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


class WireError(Exception):
    """A request must be answered with an error reply of ``code``."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


class _Strict(BaseModel):
    # strict: "1" is not 1 and 1.0 is not True; extra="forbid": an unknown key is an
    # error, never ignored (protocol v1).
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)


class Envelope(_Strict):
    id: RequestId
    op: WireStr
    args: dict[WireStr, Any] = Field(default_factory=dict)


class NoArgs(_Strict):
    pass


class RequestArgs(_Strict):
    target: WireStr = "@dispvm"
    #: The calling qube, for ``@dispvm``; nil is the same as leaving it out.
    source: WireStr | None = None
    paused: bool = False
    #: Seconds; nil or absent: the daemon's ``pool.request_timeout``.
    timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None


class ReleaseArgs(_Strict):
    name: WireStr


class StatusArgs(_Strict):
    template: WireStr | None = None


class SetMaxArgs(_Strict):
    #: nil (or absent): the global value.
    template: WireStr | None = None
    #: nil deletes the run-time override; the key itself is required.
    max: Annotated[int, Field(ge=0, le=1000)] | None


class SetThresholdArgs(_Strict):
    #: nil deletes the run-time override; the key itself is required.
    mib: Annotated[int, Field(ge=0, le=2**40)] | None


class RefreshArgs(_Strict):
    template: WireStr


class SubscribeArgs(_Strict):
    events: Annotated[list[WireStr], Field(max_length=MAX_EVENT_NAMES)] | None = None

    @field_validator("events")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (unknown := set(value) - EVENT_NAMES):
            known = ", ".join(sorted(EVENT_NAMES))
            raise ValueError(f"unknown events {', '.join(sorted(unknown))}; known: {known}")
        return value


#: Every operation and the model its ``args`` must satisfy: the whole public surface.
ARGS: dict[str, type[_Strict]] = {
    "ping": NoArgs,
    "request": RequestArgs,
    "release": ReleaseArgs,
    "status": StatusArgs,
    "set_max": SetMaxArgs,
    "set_threshold": SetThresholdArgs,
    "refresh": RefreshArgs,
    "subscribe": SubscribeArgs,
    "suspend": NoArgs,
    "resume": NoArgs,
}

#: Operations only uid 0 may call; the rest need uid 0 or the configured group.
ROOT_ONLY = frozenset({"set_max", "set_threshold", "refresh", "suspend", "resume"})


def describe_validation(exc: ValidationError, *, prefix: str = "") -> str:
    """A validation failure in words a person can act on, naming each field."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required"
        parts.append(f"{where or '(message)'}: {message}")
    return "; ".join(parts)


# -- replies ------------------------------------------------------------------------


def ok_reply(request_id: int, result: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "ok": True, "result": result}


def error_reply(request_id: int | None, code: ErrorCode, message: str) -> dict[str, Any]:
    return {"id": request_id, "ok": False, "error": {"code": code.value, "message": message}}


def event_frame(request_id: int, name: str, data: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": request_id, "event": name, "data": data}


class _Result(BaseModel):
    # Results are read leniently: a newer server may add keys.
    model_config = ConfigDict(extra="ignore", frozen=True)


class PingResult(_Result):
    protocol: int
    version: str


class Handout(_Result):
    """The result of ``request``: the disposable the caller now owns."""

    name: str
    domid: int
    dispid: int
    template: str
    origin: Literal["preload", "fresh"]
    paused: bool
    waited_ms: float


class DisposableStatus(_Result):
    name: str
    domid: int | None
    stage: str
    since: float
    memory_mib: int | None


class TemplateStatus(_Result):
    name: str
    max: int
    threshold_gap: int
    disposables: list[DisposableStatus]


class StatusResult(_Result):
    templates: list[TemplateStatus]
    memory: dict[str, Any]
