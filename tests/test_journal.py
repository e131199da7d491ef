"""The journal: records survive the process, dispids are not reused too soon."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from dispoold.errors import DispidsExhausted
from dispoold.journal import DISPID_RANGE, Journal, Record
from dispoold.lifecycle import Stage

LOG = logging.getLogger("test")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class AlwaysSeven(random.Random):
    """Proposes dispid 7 on every random pick."""

    def randrange(self, *args: object, **kwargs: object) -> int:
        return 7


def record(name: str, dispid: int, stage: Stage = Stage.PRELOAD) -> Record:
    return Record(name, dispid, "dvm", stage, 1.0, None, "preload", "f", False)


def test_records_survive_reopening(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite", log=LOG)
    journal.put(record("disp1", 1))
    journal.put(record("disp1", 1, Stage.PAUSED))
    journal.put(record("disp2", 2))
    journal.set_setting("max", 3)
    journal.close()
    reopened = Journal(tmp_path / "j.sqlite", log=LOG)
    assert [(r.name, r.stage) for r in reopened.records()] == [
        ("disp1", Stage.PAUSED),
        ("disp2", Stage.PRELOAD),
    ]
    assert reopened.get_setting("max") == 3
    reopened.set_setting("max", None)
    assert reopened.get_setting("max") is None


def test_a_freed_dispid_is_quarantined_for_the_period_then_reusable(tmp_path: Path) -> None:
    clock = Clock()
    rng = AlwaysSeven(0)
    journal = Journal(tmp_path / "j.sqlite", log=LOG, now=clock, rng=rng)
    week = 7 * 86400
    journal.put(record("disp7", 7))
    assert journal.allocate_dispid(week) != 7  # in use
    journal.remove("disp7")
    clock.now += week - 1
    assert journal.allocate_dispid(week) != 7  # freed too recently
    clock.now += 2
    assert journal.allocate_dispid(week) == 7


def test_exhaustion_is_a_clear_error_and_a_scan_finds_the_last_free_dispid(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path / "j.sqlite", log=LOG)
    all_but_one = frozenset(range(DISPID_RANGE)) - {4242}
    assert journal.allocate_dispid(0, exclude=all_but_one) == 4242
    with pytest.raises(DispidsExhausted, match="10000 dispids"):
        journal.allocate_dispid(0, exclude=frozenset(range(DISPID_RANGE)))


def test_a_damaged_journal_is_set_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    journal = Journal(path, log=LOG)
    assert journal.records() == []
    assert list(tmp_path.glob("j.sqlite.damaged-*"))
