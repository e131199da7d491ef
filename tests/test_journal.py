"""The journal: records survive the process, dispids are not reused too soon."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import pytest

from dispoold.config import DISPIDS
from dispoold.errors import DispidsExhausted
from dispoold.journal import Journal, Record
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
    return Record(name, dispid, "dvm", stage, 1.0, None, "preload", "f")


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
    all_but_one = frozenset(range(DISPIDS)) - {4242}
    assert journal.allocate_dispid(0, exclude=all_but_one) == 4242
    with pytest.raises(DispidsExhausted, match="10000 dispids"):
        journal.allocate_dispid(0, exclude=frozenset(range(DISPIDS)))


def test_a_damaged_journal_is_set_aside_and_a_new_one_started(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    journal = Journal(path, log=LOG)
    assert journal.records() == []
    assert list(tmp_path.glob("j.sqlite.damaged-*"))


def test_a_version_1_journal_is_migrated_and_keeps_its_hand_outs(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "j.sqlite"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE disposables (name TEXT PRIMARY KEY, dispid INTEGER NOT NULL UNIQUE,
            template TEXT NOT NULL, stage TEXT NOT NULL, since REAL NOT NULL, domid INTEGER,
            origin TEXT NOT NULL, fingerprint TEXT NOT NULL,
            delivered INTEGER NOT NULL DEFAULT 0);
        CREATE TABLE freed_dispids (dispid INTEGER PRIMARY KEY, freed_at REAL NOT NULL);
        CREATE TABLE settings (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
        INSERT INTO disposables VALUES ('disp1', 1, 'dvm', 'requested', 1.0, 5, 'preload', 'f', 1);
        INSERT INTO disposables VALUES ('disp2', 2, 'dvm', 'requested', 1.0, 6, 'fresh', 'f', 0);
        INSERT INTO disposables VALUES ('disp3', 3, 'dvm', 'used', 1.0, 7, 'preload', 'f', 1);
        INSERT INTO settings VALUES ('max', 3);
        PRAGMA user_version = 1;
        """
    )
    old.close()
    journal = Journal(path, log=LOG)
    stages = {r.name: r.stage for r in journal.records()}
    # Handed out paused (requested and delivered) is a stage of its own now; a request
    # that had not answered its caller stays requested.
    assert stages == {"disp1": Stage.HANDED_PAUSED, "disp2": Stage.REQUESTED, "disp3": Stage.USED}
    assert journal.get_setting("max") == 3
    journal.close()
    assert Journal(path, log=LOG).records()[0].name == "disp1"  # reopened: no migration twice
