"""The transition table: the stages the protocol names, and only legal moves."""

from __future__ import annotations

import pytest

from dispoold.lifecycle import (
    HANDED_OUT,
    POOL,
    TRANSITIONS,
    Event,
    IllegalTransition,
    Stage,
    next_stage,
)

PROTOCOL_STAGES = {
    "preload",
    "startup",
    "shrinking",
    "paused",
    "requested",
    "used",
    "tainted",
    "destroying",
}


def test_the_stages_are_the_protocols() -> None:
    assert {stage.wire for stage in Stage} == PROTOCOL_STAGES
    assert POOL | {Stage.REQUESTED} | HANDED_OUT | {Stage.DESTROYING} == set(Stage)
    assert not POOL & HANDED_OUT


def test_the_forward_path() -> None:
    path = [Event.START, Event.READY, Event.PAUSED, Event.REQUEST, Event.HAND_OUT, Event.RELEASE]
    stage = Stage.PRELOAD
    seen = []
    for event in path:
        next_ = next_stage("d", stage, event)
        assert next_ is not None
        stage = next_
        seen.append(stage)
    assert seen == [
        Stage.STARTUP,
        Stage.SHRINKING,
        Stage.PAUSED,
        Stage.REQUESTED,
        Stage.USED,
        Stage.DESTROYING,
    ]
    assert next_stage("d", Stage.DESTROYING, Event.DESTROYED) is None


@pytest.mark.parametrize(
    ("stage", "event"),
    [
        (Stage.PAUSED, Event.START),
        (Stage.USED, Event.DISCARD),  # someone is using it
        (Stage.TAINTED, Event.DISCARD),
        (Stage.USED, Event.FAIL),
        (Stage.PAUSED, Event.HAND_OUT),  # only a request can hand out
        (Stage.HANDED_PAUSED, Event.DISCARD),  # handed over: its caller has it
        (Stage.REQUESTED, Event.RELEASE),  # not handed over yet: nothing to release
        (Stage.PRELOAD, Event.DESTROYED),  # destruction goes through destroying
    ],
)
def test_illegal_moves_are_named_errors(stage: Stage, event: Event) -> None:
    with pytest.raises(IllegalTransition, match=f"{event.value!r} is not allowed in stage"):
        next_stage("disp1", stage, event)


def test_a_disposable_in_use_is_only_ended_by_its_user_or_its_death() -> None:
    for stage in HANDED_OUT:
        endings = {e for (s, e), n in TRANSITIONS.items() if s is stage and n is Stage.DESTROYING}
        assert endings == {Event.RELEASE, Event.DIE}
