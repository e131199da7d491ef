"""The wire layer without a socket: framing, checking a request, the one error mapping."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispoold import errors
from dispoold.backend import BackendError, BackendUnavailable, NoSuchDomain, NotReady
from dispoold.memory import MemoryManagerError, NoMemory
from dispoold.protocol import (
    MAX_FRAME,
    OPERATIONS,
    ErrorCode,
    FrameError,
    RequestArgs,
    SetMaxArgs,
    Who,
    error_for,
    pack_frame,
    unpack_body,
)
from dispoold.rpc import Access, Command, Peer, Rejection, check_request

ROOT_ONLY = {name for name, op in OPERATIONS.items() if op.who is Who.ROOT}

ROOT = Peer(pid=1, uid=0, gid=0)
MEMBER = Peer(pid=2, uid=1000, gid=1000, groups=frozenset({1000, 990}))
PRIMARY_MEMBER = Peer(pid=3, uid=1001, gid=990)
STRANGER = Peer(pid=4, uid=1002, gid=1002, groups=frozenset({1002}))
ACCESS = Access(gid=990)


def body(message: Any) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


def check(message: Any, peer: Peer = ROOT) -> Command | Rejection:
    return check_request(body(message), peer, ACCESS)


def rejected(message: Any, code: ErrorCode, peer: Peer = ROOT) -> Rejection:
    outcome = check(message, peer)
    assert isinstance(outcome, Rejection), outcome
    assert outcome.code is code, outcome
    assert outcome.message
    return outcome


# -- framing --------------------------------------------------------------------------


def test_frame_round_trip() -> None:
    frame = pack_frame({"id": 7, "op": "ping"})
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert unpack_body(frame[4:]) == {"id": 7, "op": "ping"}


def test_a_message_over_the_limit_is_not_framed() -> None:
    with pytest.raises(FrameError, match="65536"):
        pack_frame({"blob": b"x" * MAX_FRAME})


@pytest.mark.parametrize(
    ("untrusted", "words"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),  # a byte msgpack never uses
        (body({"a": 1})[:-1], "not valid msgpack"),  # truncated
        (body({"a": 1}) + body({"b": 2}), "more than one"),
        (body([1, 2]), "list"),
        (body("ping"), "string"),
        (body(5), "integer"),
        (body(None), "nil"),
        (b"\x81\xa1a\xa2\xff\xfe", "UTF-8"),  # {"a": <invalid UTF-8>}
        (b"\x81\x01\x02", "not valid msgpack"),  # {1: 2}: a non-string key
        (b"\x91" * 5000 + b"\xc0", "not valid msgpack"),  # nesting too deep
    ],
)
def test_bodies_that_are_not_one_map(untrusted: bytes, words: str) -> None:
    with pytest.raises(FrameError, match=words):
        unpack_body(untrusted)


# -- checking requests ----------------------------------------------------------------


def test_a_valid_request_becomes_a_command_with_typed_args() -> None:
    outcome = check(
        {"id": 3, "op": "request", "args": {"target": "@dispvm:x", "paused": True, "timeout": 5}}
    )
    assert isinstance(outcome, Command)
    assert outcome.id == 3 and outcome.op.name == "request"
    assert outcome.args == RequestArgs(target="@dispvm:x", paused=True, timeout=5.0)


def test_args_may_be_left_out() -> None:
    outcome = check({"id": 0, "op": "ping"})
    assert isinstance(outcome, Command) and outcome.op.name == "ping"


@pytest.mark.parametrize(
    ("message", "echoed_id", "words"),
    [
        ({"op": "ping"}, None, "id: required"),
        ({"id": -1, "op": "ping"}, None, "id"),
        ({"id": -(2**63), "op": "ping"}, None, "id"),
        ({"id": "1", "op": "ping"}, None, "id"),  # no coercion of "1" to 1
        ({"id": True, "op": "ping"}, None, "id"),
        ({"id": 1.0, "op": "ping"}, None, "id"),
        ({"id": 1}, 1, "op: required"),
        ({"id": 1, "op": 5}, 1, "op"),
        ({"id": 1, "op": "ping", "extra": 1}, 1, "extra: unknown key"),
        ({"id": 1, "op": "ping", "args": [1]}, 1, "args"),
        ({"id": 1, "op": "ping", "args": {"x": 1}}, 1, "args.x: unknown key"),
        ({"id": 1, "op": "request", "args": {"paused": 1}}, 1, "args.paused"),
        ({"id": 1, "op": "request", "args": {"paused": "true"}}, 1, "args.paused"),
        ({"id": 1, "op": "request", "args": {"timeout": "5"}}, 1, "args.timeout"),
        ({"id": 1, "op": "request", "args": {"timeout": 0}}, 1, "args.timeout"),
        ({"id": 1, "op": "request", "args": {"timeout": float("nan")}}, 1, "args.timeout"),
        ({"id": 1, "op": "request", "args": {"timeout": float("inf")}}, 1, "args.timeout"),
        ({"id": 1, "op": "request", "args": {"target": 1}}, 1, "args.target"),
        ({"id": 1, "op": "request", "args": {"target": "x" * 300}}, 1, "at most 256"),
        ({"id": 1, "op": "release", "args": {}}, 1, "args.name: required"),
        ({"id": 1, "op": "release", "args": {"name": b"disp1"}}, 1, "args.name"),
        ({"id": 1, "op": "set_max", "args": {"template": "x"}}, 1, "args.max: required"),
        ({"id": 1, "op": "set_max", "args": {"max": -1}}, 1, "args.max"),
        ({"id": 1, "op": "set_max", "args": {"max": 1001}}, 1, "args.max"),
        ({"id": 1, "op": "set_threshold", "args": {}}, 1, "args.mib: required"),
        ({"id": 1, "op": "set_threshold", "args": {"mib": 1.5}}, 1, "args.mib"),
        ({"id": 1, "op": "subscribe", "args": {"events": ["used", "nope"]}}, 1, "nope"),
        ({"id": 1, "op": "subscribe", "args": {"events": "used"}}, 1, "args.events"),
        ({"id": 1, "op": "subscribe", "args": {"events": ["used"] * 65}}, 1, "args.events"),
        ({"id": 1, "op": "refresh", "args": {"template": None}}, 1, "args.template"),
    ],
)
def test_malformed_requests_are_bad_requests(
    message: dict[str, Any], echoed_id: int | None, words: str
) -> None:
    outcome = rejected(message, ErrorCode.BAD_REQUEST)
    assert outcome.id == echoed_id
    assert words in outcome.message


def test_nil_is_an_explicit_value_for_set_max_and_set_threshold() -> None:
    outcome = check({"id": 1, "op": "set_max", "args": {"max": None}})
    assert isinstance(outcome, Command)
    assert outcome.args == SetMaxArgs(template=None, max=None)
    outcome = check({"id": 1, "op": "set_threshold", "args": {"mib": None}})
    assert isinstance(outcome, Command)


def test_unknown_ops_are_named() -> None:
    outcome = rejected({"id": 9, "op": "reboot"}, ErrorCode.UNKNOWN_OP)
    assert outcome.id == 9
    assert "'reboot'" in outcome.message and "ping" in outcome.message


def test_a_frame_that_is_no_map_is_answered_with_a_nil_id() -> None:
    outcome = check_request(b"\xc1", ROOT, ACCESS)
    assert isinstance(outcome, Rejection)
    assert outcome == Rejection(None, ErrorCode.BAD_REQUEST, outcome.message)


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_root_may_call_everything(op: str) -> None:
    outcome = check({"id": 1, "op": op, "args": _minimal_args(op)})
    assert isinstance(outcome, Command), outcome


@pytest.mark.parametrize("peer", [MEMBER, PRIMARY_MEMBER], ids=["supplementary", "primary"])
@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_group_members_may_call_all_but_the_root_only_ops(peer: Peer, op: str) -> None:
    outcome = check({"id": 1, "op": op, "args": _minimal_args(op)}, peer)
    if op in ROOT_ONLY:
        assert isinstance(outcome, Rejection)
        assert outcome.code is ErrorCode.UNAUTHORIZED
        assert "root" in outcome.message and "uid" in outcome.message
    else:
        assert isinstance(outcome, Command), outcome


@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_anyone_else_may_call_nothing(op: str) -> None:
    rejected({"id": 1, "op": op, "args": _minimal_args(op)}, ErrorCode.UNAUTHORIZED, STRANGER)


def test_without_a_group_only_root_is_let_in() -> None:
    outcome = check_request(body({"id": 1, "op": "ping"}), MEMBER, Access(gid=None))
    assert isinstance(outcome, Rejection) and outcome.code is ErrorCode.UNAUTHORIZED


def test_authorization_comes_before_argument_checks() -> None:
    # A stranger learns nothing about what the arguments should have been.
    rejected({"id": 1, "op": "set_max", "args": {"bogus": 1}}, ErrorCode.UNAUTHORIZED, MEMBER)


def test_root_only_ops_are_the_documented_ones() -> None:
    assert {"set_max", "set_threshold", "refresh", "suspend", "resume"} == ROOT_ONLY


def _minimal_args(op: str) -> dict[str, Any]:
    minimal: dict[str, dict[str, Any]] = {
        "release": {"name": "disp1"},
        "set_max": {"max": 1},
        "set_threshold": {"mib": 1},
        "refresh": {"template": "t"},
    }
    return minimal.get(op, {})


# -- the error mapping ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.InvalidTarget("x"), ErrorCode.BAD_REQUEST),
        (errors.BadRequest("x"), ErrorCode.BAD_REQUEST),
        (errors.NoSuchTemplate("x"), ErrorCode.NO_SUCH_TEMPLATE),
        (errors.NotADispvmTemplate("x"), ErrorCode.NOT_A_DISPVM_TEMPLATE),
        (errors.NoMemory("x"), ErrorCode.NO_MEMORY),
        (errors.RequestTimeout("x"), ErrorCode.TIMEOUT),
        (errors.StartFailed("x"), ErrorCode.BACKEND_ERROR),
        (errors.HypervisorError("x"), ErrorCode.BACKEND_ERROR),
        (errors.DispidsExhausted("x"), ErrorCode.BACKEND_ERROR),
        (errors.NotFound("x"), ErrorCode.NOT_FOUND),
        (errors.ShuttingDown("x"), ErrorCode.SHUTTING_DOWN),
    ],
)
def test_every_engine_error_has_its_wire_code(exc: Exception, code: ErrorCode) -> None:
    mapped = error_for(exc)
    assert mapped is not None
    assert mapped[0] is code
    assert "x" in mapped[1]


def test_every_error_of_the_family_has_a_code() -> None:
    def family(cls: type[errors.DispooldError]) -> list[type[errors.DispooldError]]:
        return [cls, *(c for sub in cls.__subclasses__() for c in family(sub))]

    for cls in family(errors.DispooldError)[1:]:
        assert error_for(cls("x")) is not None, cls


@pytest.mark.parametrize(
    "exc",
    [
        KeyError("k"),
        RuntimeError("r"),
        errors.DispooldError("only its subclasses mean something"),
        # The ports' own errors are wrapped by the engine; one that escapes is a bug.
        BackendError("create", "disp1", "x"),
        NoSuchDomain("pause", "disp1", "x"),
        NotReady("wait_ready", "disp1", "x"),
        BackendUnavailable("open", None, "x"),
        MemoryManagerError("x"),
        NoMemory("x"),
    ],
)
def test_anything_else_is_a_bug(exc: Exception) -> None:
    assert error_for(exc) is None


# -- fuzzing the decoder --------------------------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.binary(max_size=40)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_keys = st.sampled_from(["id", "op", "args", "target", "name", "max", "mib", "x"]) | st.text(
    max_size=6
)
_ops = st.sampled_from([*OPERATIONS, "", "nope"]) | st.text(max_size=10)
_messages = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(min_value=-5, max_value=5) | _scalars,
        "op": _ops | _scalars,
        "args": st.dictionaries(_keys, _values, max_size=5) | _values,
    },
) | st.dictionaries(_keys, _values, max_size=5)
_peers = st.sampled_from([ROOT, MEMBER, PRIMARY_MEMBER, STRANGER])


def _is_answerable(outcome: object) -> None:
    assert isinstance(outcome, Command | Rejection)
    if isinstance(outcome, Rejection):
        assert outcome.code in ErrorCode
        assert isinstance(outcome.message, str) and outcome.message
        assert outcome.id is None or 0 <= outcome.id < 2**64
        # The reply itself must be sendable.
        assert len(pack_frame({"id": outcome.id, "message": outcome.message})) <= MAX_FRAME + 4


@settings(max_examples=400, deadline=None)
@given(untrusted=st.binary(max_size=512), peer=_peers)
def test_fuzz_raw_bytes_never_raise(untrusted: bytes, peer: Peer) -> None:
    _is_answerable(check_request(untrusted, peer, ACCESS))


@settings(max_examples=300, deadline=None)
@given(message=_messages, peer=_peers)
def test_fuzz_structured_messages_never_raise(message: dict[str, Any], peer: Peer) -> None:
    outcome = check_request(body(message), peer, ACCESS)
    _is_answerable(outcome)
    if isinstance(outcome, Command):
        # Only what passed every check becomes a command.
        assert ACCESS.allows(peer, outcome.op.who)
        assert outcome.op is OPERATIONS[message["op"]]
        assert type(message["id"]) is int


@settings(max_examples=200, deadline=None)
@given(message=_messages, cut=st.integers(min_value=0, max_value=200), junk=st.binary(max_size=8))
def test_fuzz_damaged_messages_never_raise(message: dict[str, Any], cut: int, junk: bytes) -> None:
    raw = body(message)
    _is_answerable(check_request(raw[: max(0, len(raw) - cut)] + junk, ROOT, ACCESS))
