"""One test for each class of bug the engine has had or could easily have (issue 16).

Each test fails if its mistake is made: that was checked by making the mistake in the
engine and watching the test fail (for the bugs found on real Xen: against the engine
that had them). Those for bugs the engine still has are strict xfails: the fix turns
them into failures until the mark goes.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dispoold.config import Config
from dispoold.lifecycle import HANDED_OUT, Stage
from tests.doubles import BACKEND_STEPS, MEMORY_STEPS, FakeBackend
from tests.pool_harness import Harness, make_config, settle
from tests.virtual_time import run

PAUSED = Stage.PAUSED


def one_template(**pool: Any) -> Config:
    """``dvm`` alone (the default disposable template, 400 MiB, max 2)."""
    return make_config({"dvm": {"preload_max": 2, "memory": 400}}, **pool)


# -- an await between choosing a preload and marking it requested ------------------------


def test_concurrent_requests_never_choose_the_same_preload_however_slow_the_backend(
    tmp_path: Path,
) -> None:
    """Choosing a preload and marking it requested must happen without an await in
    between: every backend and memory call takes time here, so one anywhere in between
    lets two requests choose the same one (the second then finds it taken)."""

    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=3, refill_delay=100))
        await h.start()
        await settle()
        ready = h.names(PAUSED, template="dvm")
        assert len(ready) == 3
        for step in (*BACKEND_STEPS, *MEMORY_STEPS):
            h.backend.steps.delays[step] = 0.01
        handouts = await asyncio.gather(*(h.pool.request("@dispvm") for _ in range(3)))
        assert sorted(x.name for x in handouts) == ready
        assert {x.origin for x in handouts} == {"preload"}
        await h.stop()

    run(scenario())


# -- the journal record written after create instead of before ----------------------------


def test_a_preloads_record_is_on_disk_before_its_domain_exists(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, one_template(max=1))
        hold = h.backend.steps.hold("create")
        await h.start()
        name = await hold.reached
        assert name not in h.backend.domains
        [record] = [r for r in h.records_on_disk() if r.name == name]
        assert record.stage is Stage.PRELOAD
        hold.release()
        await settle()
        await h.stop()

    run(scenario())


@pytest.mark.parametrize("step", ["create", "create.build", "create.start", "create.return"])
def test_a_kill_at_any_step_of_a_creation_leaves_nothing_outside_the_books(
    tmp_path: Path, step: str
) -> None:
    first = Harness(tmp_path, one_template(max=1))
    state: dict[str, str] = {}

    async def killed_in_a_creation() -> None:
        hold = first.backend.steps.hold(step)
        await first.start()
        state["name"] = await hold.reached

    run(killed_in_a_creation(), crash=True)
    second = first.next_lifetime()

    async def after_the_restart() -> None:
        await second.start()
        await settle()
        second.check_books()
        # Nobody asked for it: it is nobody's, and no one holds it as handed out.
        assert second.names(*HANDED_OUT) == []
        assert state["name"] not in second.backend.domains
        assert sorted(second.backend.domains) == second.names(PAUSED)
        await second.stop()

    run(after_the_restart())


# -- the threshold re-check at creation ---------------------------------------------------


def test_a_preload_is_not_created_into_the_threshold_once_a_fresh_start_took_the_memory(
    tmp_path: Path,
) -> None:
    """The fill decides two preloads (2000 MiB free, 1000 kept free: room for two of
    400). A fresh start takes 400 MiB while the second waits for its turn: it must not be
    created, as it would leave 800 MiB, less than the threshold. Only the re-check inside
    the allocation sees that, counting this preload's own memory."""

    async def scenario() -> None:
        h = Harness(
            tmp_path,
            one_template(
                threshold_mib=1000,
                max_concurrent_starts=1,
                gap_retry_interval=3600,
                refill_delay=3600,
            ),
            backend=FakeBackend({"host_mib": 2000, "create_delay": 2, "ready_delay": 5}),
        )
        left: dict[str, int] = {}

        def on_create(name: str) -> None:
            left[name] = h.backend.free_mib() - 400

        h.backend.on_create = on_create
        await h.start()
        await settle(1)  # the first preload is being built, the second waits for a slot
        [building] = [n for n in h.names(Stage.PRELOAD) if n in h.backend.domains]
        [waiting] = [n for n in h.names(Stage.PRELOAD) if n not in h.backend.domains]
        handout = await h.pool.request("@dispvm")
        assert handout.origin == "fresh"
        await settle(60)
        preloads = {n: mib for n, mib in left.items() if n != handout.name}
        assert preloads == {building: 1600}, preloads
        assert waiting not in h.backend.domains
        assert h.status()["templates"][0]["threshold_gap"] == 1
        await h.stop()

    run(scenario())


def test_a_preload_may_leave_exactly_the_threshold_free(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(
            tmp_path,
            one_template(threshold_mib=1000),
            backend=FakeBackend({"host_mib": 1800}),
        )
        await h.start()
        await settle()
        assert len(h.names(PAUSED)) == 2  # (1800 - 1000) // 400
        assert h.backend.free_mib() == 1000
        await h.stop()

    run(scenario())


# -- a per-template run-time maximum against the global one --------------------------------


@pytest.mark.parametrize("global_first", [True, False])
def test_the_global_maximum_beats_a_run_time_template_maximum_on_the_default_template(
    tmp_path: Path, global_first: bool
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        settings = [(None, 1), ("dvm", 3)]
        for template, value in settings if global_first else reversed(settings):
            await h.pool.set_max(template, value)
        await h.pool.set_max("alt", 2)
        await settle()
        assert len(h.names(PAUSED, template="dvm")) == 1  # the global 1, not dvm's 3
        assert len(h.names(PAUSED, template="alt")) == 2  # not the default: its own
        await h.pool.set_max(None, None)
        await settle()
        assert len(h.names(PAUSED, template="dvm")) == 3
        await h.stop()

    run(scenario())


# -- a clean stop and the preloads that are shrinking ---------------------------------------


def test_a_clean_stop_destroys_preloads_still_shrinking(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, one_template(max=1))
        h.backend.steps.delays["memory.shrink"] = 1000  # a balloon that hardly moves
        await h.start()
        await settle(10)
        assert len(h.names(Stage.SHRINKING)) == 1
        await h.stop(drain=5)
        assert h.backend.domains == {}
        assert h.records_on_disk() == []

    run(scenario())


# -- found on real Xen: a kill during the destroy of a domain that had shut down ------------


@pytest.mark.parametrize("whose", ["handed out", "paused preload"])
def test_a_kill_during_the_destroy_of_a_dead_domain_is_finished_at_the_next_start(
    tmp_path: Path, whose: str
) -> None:
    first = Harness(tmp_path, one_template(max=1, refill_delay=3600))
    state: dict[str, str] = {}

    async def killed_while_destroying() -> None:
        await first.start()
        await settle()
        if whose == "handed out":
            name = (await first.pool.request("@dispvm")).name
        else:
            [name] = first.names(PAUSED)
        hold = first.backend.steps.hold("destroy", name=name)
        first.backend.kill(name)  # the guest shuts down; the engine destroys it...
        await hold.reached  # ...and is killed in the middle
        state["name"] = name

    run(killed_while_destroying(), crash=True)
    name = state["name"]
    assert first.backend.domains[name].shutdown
    second = first.next_lifetime()

    async def after_the_restart() -> None:
        await second.start()
        await settle()
        assert name not in second.backend.domains  # its memory is free again
        assert name not in second.books
        await second.stop()

    run(after_the_restart())


# -- found on real Xen: a guest that dies while it boots --------------------------------------


def test_a_guest_that_dies_while_booting_is_a_failed_start_and_its_template_backs_off(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(
            tmp_path,
            one_template(max=1, failure_backoff=5, failure_backoff_max=40),
            backend=FakeBackend({"ready_delay": 1, "die_booting": ["dvm"]}),  # a broken init
        )
        await h.start()
        await settle(100)
        failed = h.events_of("preload-failed")
        # Tries at 0, 6, 17, 38, 79 s with the back-off, not one every second.
        assert 4 <= h.backend.counters.created <= 6, h.backend.counters.created
        assert len(failed) == h.backend.counters.created
        await h.stop()

    run(scenario())


def test_a_preload_that_dies_while_shrinking_is_a_failed_start(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, one_template(max=1, failure_backoff=5))
        h.backend.steps.delays["memory.shrink"] = 30
        await h.start()
        await settle(10)
        [victim] = h.names(Stage.SHRINKING)
        h.backend.kill(victim)
        await settle(1)
        assert [e["name"] for e in h.events_of("preload-failed")] == [victim]
        await h.stop()

    run(scenario())


# -- found on real Xen: a preload that never becomes ready, and the start slots --------------


def test_preloads_that_never_become_ready_do_not_hold_up_another_templates_refill(
    tmp_path: Path,
) -> None:
    config = make_config(
        {
            "dvm": {"preload_max": 1, "memory": 400},
            # Its guests never report: a broken readiness service.
            "stuck": {"preload_max": 0, "memory": 400, "options": {"boot": "never"}},
        },
        max_concurrent_starts=2,
        startup_timeout=60,
        refill_delay=0,
    )

    async def scenario() -> None:
        h = Harness(tmp_path, config, backend=FakeBackend({"ready_delay": 5}))
        await h.start()
        await settle()
        await h.pool.set_max("stuck", 2)  # two preloads that would hold both slots for ever
        await settle(1)
        # One boots for ever; the other waits: one slot is kept for another template.
        assert len(h.names(Stage.STARTUP, template="stuck")) == 1
        assert len(h.names(Stage.PRELOAD, template="stuck")) == 1
        await h.pool.request("@dispvm")
        await settle(12)  # the refill: a 5 s boot
        assert len(h.names(PAUSED, template="dvm")) == 1
        await h.stop()

    run(scenario())


# -- found on real Xen: memory of disposables handed out before a crash --------------------


def test_a_handed_out_preload_gets_back_the_memory_it_gave_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, one_template(max=1, refill_delay=3600))
        h.memory.settings = h.memory.settings.model_copy(update={"preferred_floor_mib": 100})
        await h.start()
        await settle()
        [name] = h.names(PAUSED)
        assert h.backend.domains[name].memory_mib == 130  # shrunk to 100 used x 1.3
        await h.pool.request("@dispvm")
        await settle(1)
        assert h.backend.domains[name].memory_mib == 400
        await h.stop()

    run(scenario())


def test_disposables_handed_out_just_before_a_crash_are_given_their_memory_back(
    tmp_path: Path,
) -> None:
    first = Harness(tmp_path, one_template(max=2, refill_delay=3600))
    state: dict[str, str] = {}

    async def crashed_after_a_hand_out() -> None:
        await first.start()
        await settle()
        state["name"] = (await first.pool.request("@dispvm")).name

    run(crashed_after_a_hand_out(), crash=True)
    second = first.next_lifetime()

    async def after_the_restart() -> None:
        await second.start()
        assert second.books[state["name"]].stage is Stage.USED
        # The memory manager is told it runs again, and so gives it what it needs.
        assert state["name"] in second.memory.included
        await second.stop()

    run(after_the_restart())
