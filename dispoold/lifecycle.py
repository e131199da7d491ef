"""The life of a disposable: stages, the events that move it, and one transition table.

::

    preload --start--> startup --ready--> shrinking --paused--> paused
       |                  |                   |                   |  \\
       +------------------+-----request-------+-------------------+   unpause (foreign)
                                   v                                   v
            handed-paused <--hand_out_paused-- requested --hand_out--> used     tainted
                  |   \\--unpause (its caller's)---------------------^  |        ^  |
                  |                                requested --unpause (foreign)-+  |
                  +---------------release, die--------+--------------+--------------+
                                                      v
                                                 destroying --destroyed--> (gone)

    fail, die, discard: from preload, startup, shrinking, paused and requested straight
    to destroying.

``requested`` is a disposable a request has taken and not yet handed over (it may still
be booting); ``handed-paused`` is one handed over paused, whose caller has not unpaused
it yet. On the wire both are ``requested`` (:attr:`Stage.wire`): for a client the
difference is whether its own request has returned.

Every (stage, event) pair that may happen is in :data:`TRANSITIONS`; anything else
raises :class:`IllegalTransition`, never an ``assert`` (asserts vanish under ``-O``).
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    #: In the books and the journal; the domain is being created.
    PRELOAD = "preload"
    #: Created and booting; waiting for the guest to report readiness.
    STARTUP = "startup"
    #: Ready; memory going down to the preferred size before the pause.
    SHRINKING = "shrinking"
    #: Ready, shrunk and paused: in the pool, waiting for a request.
    PAUSED = "paused"
    #: Taken by a request that has not handed it over yet (it may still be booting).
    REQUESTED = "requested"
    #: Handed over paused (``paused: true``); its caller's own unpause is the use.
    HANDED_PAUSED = "handed-paused"
    #: Unpaused for, or by, whoever requested it.
    USED = "used"
    #: Unpaused while in the pool without a request: never handed out, never destroyed
    #: under whoever is using it.
    TAINTED = "tainted"
    #: Being destroyed.
    DESTROYING = "destroying"

    @property
    def wire(self) -> str:
        """The stage as the protocol names it."""
        return Stage.REQUESTED.value if self is Stage.HANDED_PAUSED else self.value


class Event(StrEnum):
    START = "start"  # the domain exists and boots
    READY = "ready"  # the guest reported readiness
    PAUSED = "paused"  # the engine paused it (after the shrink)
    REQUEST = "request"  # a request took it
    HAND_OUT = "hand_out"  # the request got it running (the engine unpaused it)
    HAND_OUT_PAUSED = "hand_out_paused"  # the request handed it over paused
    UNPAUSE = "unpause"  # the backend saw an unpause the engine did not do
    RELEASE = "release"  # its user released it
    DISCARD = "discard"  # the engine no longer wants it (max lowered, refresh, outdated)
    FAIL = "fail"  # an operation on it failed
    DIE = "die"  # the domain died or shut down
    DESTROYED = "destroyed"  # the domain no longer exists


#: Where the stage is in the books.
POOL = frozenset({Stage.PRELOAD, Stage.STARTUP, Stage.SHRINKING, Stage.PAUSED})
#: Whoever requested these has them (or someone took one from the pool): only a release
#: or the domain's death ends them.
HANDED_OUT = frozenset({Stage.HANDED_PAUSED, Stage.USED, Stage.TAINTED})

#: Events that end a disposable the engine still controls (in the pool, or taken by a
#: request that has not handed it over yet).
_ENDINGS = (Event.FAIL, Event.DIE, Event.DISCARD)

#: (stage, event) -> next stage. ``None`` means the disposable leaves the books.
TRANSITIONS: dict[tuple[Stage, Event], Stage | None] = {
    (Stage.PRELOAD, Event.START): Stage.STARTUP,
    # A fresh start is a disposable requested before it exists.
    (Stage.PRELOAD, Event.REQUEST): Stage.REQUESTED,
    (Stage.STARTUP, Event.READY): Stage.SHRINKING,
    (Stage.STARTUP, Event.REQUEST): Stage.REQUESTED,
    (Stage.SHRINKING, Event.PAUSED): Stage.PAUSED,
    (Stage.SHRINKING, Event.REQUEST): Stage.REQUESTED,
    (Stage.PAUSED, Event.REQUEST): Stage.REQUESTED,
    (Stage.PAUSED, Event.UNPAUSE): Stage.TAINTED,
    # The backend reports the foreign unpause before the engine has recorded its pause.
    (Stage.SHRINKING, Event.UNPAUSE): Stage.TAINTED,
    # Requested during startup: it keeps booting; the waiting request learns the outcome.
    (Stage.REQUESTED, Event.START): Stage.REQUESTED,
    (Stage.REQUESTED, Event.READY): Stage.REQUESTED,
    (Stage.REQUESTED, Event.HAND_OUT): Stage.USED,
    (Stage.REQUESTED, Event.HAND_OUT_PAUSED): Stage.HANDED_PAUSED,
    # Unpaused by someone else before its request handed it over: that request moves on.
    (Stage.REQUESTED, Event.UNPAUSE): Stage.TAINTED,
    # Handed out paused: the caller's own unpause is the use.
    (Stage.HANDED_PAUSED, Event.UNPAUSE): Stage.USED,
    **{
        (stage, event): Stage.DESTROYING for stage in (*POOL, Stage.REQUESTED) for event in _ENDINGS
    },
    # Someone has these: only their user (release) or their death ends them. A failed
    # operation or a refresh never destroys them.
    **{
        (stage, event): Stage.DESTROYING
        for stage in HANDED_OUT
        for event in (Event.RELEASE, Event.DIE)
    },
    # The backend only reports unpauses of domains it paused itself; these are late echoes.
    (Stage.USED, Event.UNPAUSE): Stage.USED,
    (Stage.TAINTED, Event.UNPAUSE): Stage.TAINTED,
    (Stage.DESTROYING, Event.UNPAUSE): Stage.DESTROYING,
    # Destruction already under way absorbs every other ending.
    **{(Stage.DESTROYING, event): Stage.DESTROYING for event in (*_ENDINGS, Event.RELEASE)},
    (Stage.DESTROYING, Event.DESTROYED): None,
}


class IllegalTransition(Exception):
    """An event arrived in a stage that does not allow it."""

    def __init__(self, name: str, stage: Stage, event: Event) -> None:
        super().__init__(f"{name}: event {event.value!r} is not allowed in stage {stage.value!r}")
        self.name = name
        self.stage = stage
        self.event = event


def next_stage(name: str, stage: Stage, event: Event) -> Stage | None:
    """The stage after ``event``; raises :class:`IllegalTransition`."""
    try:
        return TRANSITIONS[(stage, event)]
    except KeyError:
        raise IllegalTransition(name, stage, event) from None
