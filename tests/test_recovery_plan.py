"""Restart recovery's decisions, row by row of the table in docs/design.md.

:func:`dispoold.recovery.plan` decides from plain facts (the journal's records, the
domains found, the templates' fingerprints); these tests hold it to the table. How the
engine carries a plan out across a real kill is in ``test_pool_recovery.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dispoold.backend import DomainInfo, Marker
from dispoold.journal import Record
from dispoold.lifecycle import Stage
from dispoold.recovery import Fate, plan
from tests.doubles import FakeBackend
from tests.pool_harness import Harness, make_config, settle
from tests.virtual_time import run

FINGERPRINTS = {"dvm": "f1"}


def record(stage: Stage, *, name: str = "disp1", fingerprint: str = "f1") -> Record:
    return Record(name, 1, "dvm", stage, 1.0, 7, "preload", fingerprint)


def domain(
    *, name: str = "disp1", paused: bool = True, shutdown: bool = False, dispid: int = 1
) -> DomainInfo:
    return DomainInfo(name, 7, paused, shutdown, 400, 400, Marker("dispoold", "dvm", dispid))


@pytest.mark.parametrize(
    ("stage", "found", "fate"),
    [
        (Stage.PAUSED, domain(), Fate.READOPT),
        (Stage.PAUSED, domain(paused=False), Fate.TAINT),
        (Stage.PRELOAD, domain(), Fate.DISCARD),
        (Stage.STARTUP, domain(paused=False), Fate.DISCARD),
        (Stage.SHRINKING, domain(paused=False), Fate.DISCARD),
        (Stage.REQUESTED, domain(paused=False), Fate.DISCARD),
        (Stage.HANDED_PAUSED, domain(), Fate.KEEP),
        (Stage.HANDED_PAUSED, domain(paused=False), Fate.USED),
        (Stage.USED, domain(paused=False), Fate.KEEP),
        (Stage.TAINTED, domain(paused=False), Fate.KEEP),
        (Stage.DESTROYING, domain(), Fate.DESTROY),
        (Stage.USED, domain(paused=False, shutdown=True), Fate.DESTROY),
        (Stage.PAUSED, domain(shutdown=True), Fate.DESTROY),
        # The bug found on real Xen: a hand-out whose guest shut down, killed while
        # being destroyed. The shut-down check must not hide the destroy.
        (Stage.DESTROYING, domain(paused=False, shutdown=True), Fate.DESTROY),
        (Stage.USED, None, Fate.DROP),
        (Stage.DESTROYING, None, Fate.DROP),
    ],
)
def test_each_row_of_the_table(stage: Stage, found: DomainInfo | None, fate: Fate) -> None:
    decisions, strays = plan([record(stage)], [] if found is None else [found], FINGERPRINTS)
    assert [d.fate for d in decisions] == [fate]
    assert strays == []


def test_a_paused_preload_of_a_changed_or_removed_template_is_discarded() -> None:
    (outdated,), _ = plan([record(Stage.PAUSED, fingerprint="old")], [domain()], FINGERPRINTS)
    assert outdated.fate is Fate.DISCARD and outdated.reason == "outdated"
    (removed,), _ = plan([record(Stage.PAUSED)], [domain()], {})
    assert removed.fate is Fate.DISCARD and "no longer configured" in removed.reason


def test_domains_the_journal_does_not_know() -> None:
    running = domain(name="disp2", paused=False, dispid=2)
    paused = domain(name="disp3", dispid=3)
    dead = domain(name="disp4", paused=False, shutdown=True, dispid=4)
    clash = domain(name="disp5", paused=False, dispid=1)  # the dispid of a record
    twin = domain(name="disp6", paused=False, dispid=2)  # the dispid of another stray
    _, strays = plan(
        [record(Stage.USED)],
        [domain(paused=False), running, paused, dead, clash, twin],
        FINGERPRINTS,
    )
    assert {s.domain.name: s.track for s in strays} == {
        "disp2": True,
        "disp3": False,
        "disp4": False,
        "disp5": False,
        "disp6": False,
    }


def test_a_kill_during_the_destroy_of_a_shut_down_hand_out_is_finished_after_restart(
    tmp_path: Path,
) -> None:
    backend = FakeBackend({"op_delay": 1.0})
    first = Harness(tmp_path, make_config(max=1, refill_delay=100), backend=backend)
    state: dict[str, str] = {}

    async def before_the_kill() -> None:
        await first.start()
        await settle()
        handout = await first.pool.request("@dispvm")
        state["name"] = handout.name
        backend.kill(handout.name)  # its guest shuts down; the engine starts destroying it
        await settle(0.5)
        assert first.books[handout.name].stage is Stage.DESTROYING

    run(before_the_kill(), crash=True)
    name = state["name"]
    assert backend.domains[name].shutdown  # still there: the destroy was cut short
    second = first.next_lifetime()

    async def after_the_restart() -> None:
        await second.start()
        await settle()
        assert name not in backend.domains
        assert name not in second.books
        second.check_books()
        await second.stop()

    run(after_the_restart())
