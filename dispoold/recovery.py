"""Restart recovery: what becomes of each journal record and each domain found at start.

The journal record of a disposable is written before its domain is created and deleted
only after the domain is destroyed, so after a crash at any point the records name every
domain the daemon may have made. At start, each record is matched with the domains the
backend finds carrying this daemon's marker, and :func:`plan` decides, from nothing but
those facts, what each one becomes (the table in ``docs/design.md``). The engine carries
the plan out. Deciding and doing are apart so that every case of the table is a plain
function call in the tests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from dispoold.backend import DomainInfo
from dispoold.journal import Record
from dispoold.lifecycle import POOL, Stage


class Fate(Enum):
    #: The domain is gone: the record is dropped.
    DROP = "drop"
    #: A paused preload, unchanged: back into the pool.
    READOPT = "readopt"
    #: A paused preload found running: someone unpaused it; tracked, never handed out.
    TAINT = "taint"
    #: The engine no longer wants it (half-started, outdated, cut short): destroyed.
    DISCARD = "discard"
    #: It was being destroyed, or its guest shut down: the destroy is finished.
    DESTROY = "destroy"
    #: Handed out paused, and its caller has unpaused it meanwhile: in use now.
    USED = "used"
    #: Handed out (or tainted): tracked until released or dead.
    KEEP = "keep"


@dataclass(frozen=True, slots=True)
class Decision:
    record: Record
    domain: DomainInfo | None
    fate: Fate
    reason: str


@dataclass(frozen=True, slots=True)
class Stray:
    """A domain carrying our marker that the journal does not know (the state directory
    was lost or damaged)."""

    domain: DomainInfo
    #: A running one may be someone's: tracked as handed out until released or dead.
    #: A paused or dead one, or one whose dispid is taken, is destroyed.
    track: bool


def plan(
    records: Iterable[Record],
    found: Iterable[DomainInfo],
    fingerprints: Mapping[str, str],
) -> tuple[list[Decision], list[Stray]]:
    """Decide the fate of every record and of every marked domain no record names.

    ``fingerprints``: the current fingerprint of each configured disposable template.
    """
    domains = {info.name: info for info in found}
    decisions = []
    for record in records:
        info = domains.pop(record.name, None)
        fate, reason = _fate(record, info, fingerprints)
        decisions.append(Decision(record, info, fate, reason))
    taken = {record.dispid for record in (d.record for d in decisions)}
    strays = []
    for info in domains.values():
        marker = info.marker
        track = not (info.paused or info.shutdown or marker is None or marker.dispid in taken)
        if track and marker is not None:
            taken.add(marker.dispid)
        strays.append(Stray(info, track))
    return decisions, strays


def _fate(
    record: Record, info: DomainInfo | None, fingerprints: Mapping[str, str]
) -> tuple[Fate, str]:
    stage = record.stage
    if info is None:
        return Fate.DROP, f"{stage.value}: its domain no longer exists"
    # Checked before the guest's shutdown: a destroy cut short by the crash must be
    # finished whatever the guest did meanwhile (else the record stays "destroying" for
    # good and the dead domain keeps its memory).
    if stage is Stage.DESTROYING:
        return Fate.DESTROY, "its destruction was cut short by a restart"
    if info.shutdown:
        return Fate.DESTROY, "found shut down at start-up"
    if stage is Stage.PAUSED:
        if not info.paused:
            return Fate.TAINT, "found running: someone unpaused it"
        if record.template not in fingerprints:
            return Fate.DISCARD, "its template is no longer configured"
        if record.fingerprint != fingerprints[record.template]:
            return Fate.DISCARD, "outdated"
        return Fate.READOPT, "paused preload re-adopted"
    if stage in POOL:
        return Fate.DISCARD, "half-started when the daemon stopped"
    if stage is Stage.REQUESTED:
        return Fate.DISCARD, "its request was cut short by a restart"
    if stage is Stage.HANDED_PAUSED and not info.paused:
        return Fate.USED, "its caller unpaused it meanwhile"
    return Fate.KEEP, f"still {stage.value}"
