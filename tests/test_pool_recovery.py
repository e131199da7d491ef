"""Restart recovery: a daemon killed at any point comes back with consistent books.

Each test runs two or more daemon lifetimes on one fake host. ``run(..., crash=True)``
freezes the first lifetime where it stands, with no clean-up at all, as ``kill -9``
would; the next lifetime starts from the journal on disk and the domains left behind.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dispoold.lifecycle import Stage
from tests.doubles import FakeBackend
from tests.pool_harness import Harness, make_config, settle
from tests.virtual_time import run

PAUSED = Stage.PAUSED


def test_a_killed_daemon_readopts_paused_preloads_and_destroys_half_started_ones(
    tmp_path: Path,
) -> None:
    # Three start slots, so that both refills of dvm boot at once (with two templates
    # wanting preloads, one slot stays free for the other).
    first = Harness(tmp_path, make_config(max=3, refill_delay=0, max_concurrent_starts=3))
    state: dict[str, list[str]] = {}

    async def before_the_kill() -> None:
        await first.start()
        await settle()
        state["paused"] = first.names(PAUSED)
        handout = await first.pool.request("@dispvm")
        paused_handout = await first.pool.request("@dispvm", paused=True)
        state["handed_out"] = [handout.name, paused_handout.name]
        first.backend.options.ready_delay = 1000  # the refills are still booting...
        await settle(5)
        state["booting"] = first.names(Stage.STARTUP)
        assert len(state["booting"]) == 2
        # ...when the daemon is killed.

    run(before_the_kill(), crash=True)
    second = first.next_lifetime()
    second.backend.options.ready_delay = 0
    created_before = second.backend.counters.created

    async def after_the_restart() -> None:
        await second.start()
        await settle(1)
        readopted = [n for n in state["paused"] if n not in state["handed_out"]]
        assert set(readopted) <= set(second.names(PAUSED))
        for name in state["booting"]:
            assert name not in second.backend.domains and name not in second.books
        assert [second.books[n].stage for n in state["handed_out"]] == [
            Stage.USED,
            Stage.HANDED_PAUSED,
        ]
        second.check_books()
        await settle()
        assert len(second.names(PAUSED, template="dvm")) == 3
        # The re-adopted ones were not made again: only the missing ones were.
        assert second.backend.counters.created - created_before == 2
        await second.stop()

    run(after_the_restart())


def test_a_request_cut_short_by_the_kill_is_never_handed_out(tmp_path: Path) -> None:
    first = Harness(tmp_path, make_config(max=0), backend=FakeBackend({"ready_delay": 30}))
    state: dict[str, str] = {}

    async def before_the_kill() -> None:
        await first.start()
        request = asyncio.create_task(first.pool.request("@dispvm"))  # a fresh start, booting
        await settle(10)
        [state["name"]] = first.names(Stage.REQUESTED)
        assert not request.done()

    run(before_the_kill(), crash=True)
    second = first.next_lifetime()

    async def after_the_restart() -> None:
        await second.start()
        await settle(1)
        # Its caller never got an answer: it is nobody's, so it is destroyed.
        assert state["name"] not in second.backend.domains
        assert second.names() == sorted(second.backend.domains)
        await second.stop()

    run(after_the_restart())


def test_a_clean_stop_destroys_half_started_preloads_and_keeps_paused_ones(
    tmp_path: Path,
) -> None:
    first = Harness(tmp_path, make_config(max=2))
    state: dict[str, list[str]] = {}

    async def first_life() -> None:
        await first.start()
        await settle()
        state["paused"] = first.names(PAUSED)
        first.backend.options.ready_delay = 1000
        await first.pool.set_max(None, 4)
        await settle(5)
        state["booting"] = first.names(Stage.STARTUP, template="dvm")
        await first.stop()
        assert sorted(first.backend.domains) == sorted(state["paused"])

    run(first_life())
    second = first.next_lifetime()

    async def second_life() -> None:
        await second.start()
        assert second.names(PAUSED) == sorted(state["paused"])
        await second.stop()

    run(second_life())


def test_domains_marked_as_ours_but_unknown_to_the_journal_are_reconciled(
    tmp_path: Path,
) -> None:
    first = Harness(tmp_path)
    state: dict[str, str] = {}

    async def first_life() -> None:
        await first.start()
        await settle()
        state["used"] = (await first.pool.request("@dispvm")).name

    run(first_life(), crash=True)
    # The state directory is lost.
    for path in tmp_path.glob("journal.sqlite*"):
        path.unlink()
    second = first.next_lifetime()
    paused_before = {d.domid for d in second.backend.domains.values() if d.paused}

    async def second_life() -> None:
        await second.start()
        await settle(1)
        # A running one may be somebody's: tracked as handed out, not destroyed.
        assert second.books[state["used"]].stage is Stage.USED
        assert state["used"] in second.backend.domains
        # Paused ones can't be trusted as fresh: destroyed, and replaced.
        assert not paused_before & {d.domid for d in second.backend.domains.values()}
        await settle()
        assert len(second.names(PAUSED)) == 3
        await second.pool.release(state["used"])
        assert state["used"] not in second.backend.domains
        await second.stop()

    run(second_life())


def test_a_preload_unpaused_while_the_daemon_was_down_is_tainted(tmp_path: Path) -> None:
    first = Harness(tmp_path, make_config(max=1))
    state: dict[str, str] = {}

    async def first_life() -> None:
        await first.start()
        await settle()
        [state["name"]] = first.names(PAUSED, template="dvm")

    run(first_life(), crash=True)
    first.backend.domains[state["name"]].paused = False  # someone unpaused it meanwhile
    second = first.next_lifetime()

    async def second_life() -> None:
        await second.start()
        assert second.books[state["name"]].stage is Stage.TAINTED
        assert state["name"] in second.backend.domains
        await second.stop()

    run(second_life())


def test_preloads_outdated_while_the_daemon_was_down_are_replaced(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"v1")
    config = make_config({"dvm": {"preload_max": 2, "memory": 400, "kernel": str(kernel)}})
    first = Harness(tmp_path, config)
    state: dict[str, list[str]] = {}

    async def first_life() -> None:
        await first.start()
        await settle()
        state["old"] = first.names(PAUSED)

    run(first_life(), crash=True)
    kernel.write_bytes(b"v2, longer")
    second = first.next_lifetime()

    async def second_life() -> None:
        await second.start()
        await settle()
        assert len(second.names(PAUSED)) == 2
        assert not set(second.names(PAUSED)) & set(state["old"])
        await second.stop()

    run(second_life())


def test_freed_dispids_stay_unused_for_seven_days_across_restarts(tmp_path: Path) -> None:
    first = Harness(tmp_path, make_config(max=1, refill_delay=0))
    freed: set[int] = set()

    async def first_life() -> None:
        await first.start()
        await settle()
        for _ in range(30):
            handout = await first.pool.request("@dispvm")
            await first.pool.release(handout.name)
            freed.add(handout.dispid)
            await settle(1)
        await first.stop()

    run(first_life())
    assert first.journal is not None
    second = first.next_lifetime(skip=6 * 86400)  # six days later

    async def second_life() -> None:
        await second.start()
        await settle()
        for _ in range(30):
            handout = await second.pool.request("@dispvm")
            assert handout.dispid not in freed
            await second.pool.release(handout.name)
        await second.stop()

    run(second_life())


# -- killed inside an operation (the doubles hold it at one of its steps) -------------------

#: Tasks of killed lifetimes, frozen where they stood (as tests/virtual_time.py keeps loops).
_FROZEN: list[asyncio.Task[Any]] = []


def _killed_at(tmp_path: Path, step: str, prepare: str) -> tuple[Harness, str]:
    """Start a daemon, bring it to ``prepare``, kill it with an operation of ``step`` under
    way; return the next lifetime and the disposable the operation was about."""
    first = Harness(tmp_path, make_config(max=1, refill_delay=3600))
    state: dict[str, str] = {}
    # The caller's task, frozen by the kill, kept from the garbage collector.
    frozen: list[asyncio.Task[Any]] = []

    async def killed() -> None:
        await first.start()
        await settle()
        if prepare == "shrink":
            first.backend.steps.delays["memory.shrink"] = 100
            await first.pool.refresh("dvm")
            await settle(5)
            [state["name"]] = first.names(Stage.SHRINKING, template="dvm")
            return
        hold = first.backend.steps.hold(step)
        if prepare == "hand-out":
            frozen.append(asyncio.create_task(first.pool.request("@dispvm")))
            state["name"] = await hold.reached
        else:  # release
            handout = await first.pool.request("@dispvm")
            frozen.append(asyncio.create_task(first.pool.release(handout.name)))
            state["name"] = await hold.reached

    run(killed(), crash=True)
    assert not any(task.done() for task in frozen)
    _FROZEN.extend(frozen)
    return first.next_lifetime(), state["name"]


@pytest.mark.parametrize(
    ("step", "prepare", "stage"),
    [
        ("memory.shrink", "shrink", Stage.SHRINKING),
        ("unpause", "hand-out", Stage.REQUESTED),  # its caller never heard of it
        ("destroy", "release", Stage.DESTROYING),
    ],
)
def test_a_daemon_killed_inside_an_operation_finishes_or_undoes_it_at_the_next_start(
    tmp_path: Path, step: str, prepare: str, stage: Stage
) -> None:
    second, name = _killed_at(tmp_path, step, prepare)
    [record] = [r for r in second.records_on_disk() if r.name == name]
    assert record.stage is stage and name in second.backend.domains

    async def after_the_restart() -> None:
        second.backend.steps.delays.clear()
        await second.start()
        await settle()
        assert name not in second.backend.domains and name not in second.books
        second.check_books()
        assert sorted(second.backend.domains) == second.names(PAUSED)
        await second.stop()

    run(after_the_restart())
