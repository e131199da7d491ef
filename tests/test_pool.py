"""The pool engine, behaviour by behaviour, against the test doubles in virtual time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from dispoold.config import MemorySettings
from dispoold.errors import (
    BadRequest,
    InvalidTarget,
    NoMemory,
    NoSuchTemplate,
    NotADispvmTemplate,
    NotFound,
    RequestTimeout,
    ShuttingDown,
    StartFailed,
)
from dispoold.lifecycle import Stage
from dispoold.views import Handout
from tests.doubles import FakeBackend
from tests.pool_harness import Harness, make_config, settle
from tests.virtual_time import run

PAUSED = Stage.PAUSED


# -- filling, maxima --------------------------------------------------------------------


def test_start_fills_every_disposable_template_to_its_maximum(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await settle()
        assert len(h.names(PAUSED, template="dvm")) == 2
        assert len(h.names(PAUSED, template="alt")) == 1
        assert h.pool_members("appvm") == []  # not a disposable template
        for name in h.names(PAUSED):
            domain = h.backend.domains[name]
            assert domain.paused and domain.paused_by_backend
            assert name in h.memory.shrunk and name in h.memory.excluded
        assert h.event_names("preload-ready").count("preload-ready") == 3
        await h.stop()

    run(scenario())


def test_global_max_applies_to_the_default_template_and_wins_even_at_zero(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=0))
        await h.start()
        await settle()
        assert h.pool_members("dvm") == []  # the template says 2, the global 0 wins
        assert len(h.pool_members("alt")) == 1  # not the default: its own value
        await h.pool.set_max(None, 3)
        await settle()
        assert len(h.names(PAUSED, template="dvm")) == 3
        await h.pool.set_max(None, None)  # the override goes: the file's 0 applies again
        await settle()
        assert h.pool_members("dvm") == []
        await h.stop()

    run(scenario())


def test_without_a_global_max_the_default_template_uses_its_own(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await h.pool.set_max(None, 0)
        await settle()
        assert h.pool_members("dvm") == []
        await h.pool.set_max(None, None)
        await settle()
        assert len(h.names(PAUSED, template="dvm")) == 2
        assert h.status("dvm")["templates"][0]["max"] == 2
        await h.stop()

    run(scenario())


def test_lowering_a_maximum_removes_the_least_advanced_first_and_raising_fills(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(startup_timeout=100))
        await h.start()
        await settle()
        ready = h.names(PAUSED, template="dvm")
        await h.pool.set_max("dvm", 4)
        h.backend.options.ready_delay = 50  # the two new ones are still booting when...
        await settle(5)
        assert len(h.pool_members("dvm")) == 4
        await h.pool.set_max("dvm", 2)  # ...the maximum goes back down
        await settle(1)
        assert h.pool_members("dvm") == ready  # the booting ones went, the ready stayed
        await settle(100)
        h.check_books()
        assert sorted(h.backend.domains) == sorted(h.names())
        await h.stop()

    run(scenario())


def test_set_max_refuses_unknown_and_non_disposable_templates(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        with pytest.raises(NoSuchTemplate):
            await h.pool.set_max("nope", 1)
        with pytest.raises(NotADispvmTemplate):
            await h.pool.set_max("appvm", 1)
        with pytest.raises(BadRequest):
            await h.pool.set_max("dvm", 100_000)
        await h.stop()

    run(scenario())


# -- memory threshold -------------------------------------------------------------------


def test_threshold_is_never_preloaded_into_and_the_gap_is_reported_then_filled(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        # 2000 MiB host, 1000 MiB kept free: room for two 400 MiB preloads of three wanted.
        h = Harness(
            tmp_path,
            make_config(threshold_mib=1000, gap_retry_interval=10),
            backend=FakeBackend({"host_mib": 2000}),
        )
        crossings: list[int] = []
        h.backend.on_create = lambda name: crossings.append(h.backend.free_mib() - 400)
        await h.start()
        await settle()
        assert len(h.names(PAUSED)) == 2
        assert all(free_after >= 1000 for free_after in crossings)
        gaps = h.events_of("gap")
        assert gaps and gaps[-1]["missing"] >= 1 and gaps[-1]["threshold_mib"] == 1000
        status = h.status()
        assert sum(t["threshold_gap"] for t in status["templates"]) == 1
        assert status["memory"]["threshold_mib"] == 1000
        # Memory frees up (the operator lowers the threshold): the gap closes by itself.
        await h.pool.set_threshold(200)
        await settle()
        assert len(h.names(PAUSED)) == 3
        assert sum(t["threshold_gap"] for t in h.status()["templates"]) == 0
        await h.stop()

    run(scenario())


def test_a_gap_is_retried_when_a_domain_frees_memory(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(
            tmp_path,
            make_config(threshold_mib=0, gap_retry_interval=3600),
            backend=FakeBackend({"host_mib": 1200}),
        )
        await h.start()
        await settle()
        assert len(h.names(PAUSED)) == 3  # 3 x 400 fills the host
        handout = await h.pool.request("@dispvm:alt")
        await settle(10)
        assert len(h.names(PAUSED)) == 2  # no room to refill alt
        await h.pool.release(handout.name)
        await settle(10)  # far less than the retry interval: the release itself retried
        assert len(h.names(PAUSED)) == 3
        await h.stop()

    run(scenario())


# -- stages and requests ----------------------------------------------------------------


def test_request_from_a_full_pool_hands_out_a_running_preload_and_refills_after_the_delay(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(refill_delay=3))
        await h.start()
        await settle()
        before = h.names(PAUSED, template="dvm")
        handout = await h.pool.request("@dispvm", source="personal")
        assert isinstance(handout, Handout)
        assert handout.origin == "preload" and handout.template == "dvm"
        assert handout.name in before and not handout.paused
        assert handout.name == f"disp{handout.dispid}"
        assert handout.waited_ms < 1  # virtual time: no boot, no sleep on the way
        assert h.books[handout.name].stage is Stage.USED
        assert not h.backend.domains[handout.name].paused
        assert handout.name in h.memory.included
        assert h.event_names("requested", "used")[-2:] == ["requested", "used"]
        await settle(2.9)
        assert len(h.pool_members("dvm")) == 1  # the refill waits for the delay...
        await settle(0.2)
        assert len(h.pool_members("dvm")) == 2  # ...then starts
        await h.stop()

    run(scenario())


def test_a_request_during_startup_takes_that_preload_and_it_is_never_paused(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=1), backend=FakeBackend({"ready_delay": 10}))
        await h.start()
        await settle(2)
        [booting] = h.pool_members("dvm")
        assert h.books[booting].stage is Stage.STARTUP
        handout = await h.pool.request("@dispvm")
        assert handout.name == booting and handout.origin == "preload"
        assert 7_000 < handout.waited_ms < 10_000  # it waited for the rest of the boot only
        pauses = [c for c in h.backend.counters.calls if c.operation == "pause"]
        assert all(c.name != booting for c in pauses)
        assert booting not in h.memory.shrunk
        await h.stop()

    run(scenario())


def test_a_request_during_the_shrink_cancels_it_and_gets_the_disposable_at_once(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=1))
        h.memory.shrink_delay = 30
        await h.start()
        await settle(5)
        [shrinking] = h.pool_members("dvm")
        assert h.books[shrinking].stage is Stage.SHRINKING
        handout = await h.pool.request("@dispvm")
        assert handout.name == shrinking
        assert handout.waited_ms < 1
        assert shrinking not in h.memory.shrunk  # cancelled before it finished
        assert not h.backend.domains[shrinking].paused
        await h.stop()

    run(scenario())


def test_a_failed_shrink_is_shown_in_status_and_the_preload_is_paused_anyway(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=1))
        h.memory.fail_shrink = True
        await h.start()
        await settle()
        [name] = h.names(PAUSED, template="dvm")
        [entry] = h.status("dvm")["templates"][0]["disposables"]
        assert entry["name"] == name and entry["stage"] == "paused"
        assert "shrink failed" in entry["note"]
        await h.stop()

    run(scenario())


def test_an_unrequested_unpause_taints_the_preload_which_stays_alive_and_is_never_handed_out(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=1, refill_delay=0))
        await h.start()
        await settle()
        [victim] = h.names(PAUSED, template="dvm")
        h.backend.external_unpause(victim)
        await settle()
        assert h.books[victim].stage is Stage.TAINTED
        assert victim in h.backend.domains  # not destroyed under whoever uses it
        assert h.events_of("tainted") == [{"name": victim, "template": "dvm"}]
        assert len(h.names(PAUSED, template="dvm")) == 1  # refilled
        handout = await h.pool.request("@dispvm")
        assert handout.name != victim
        await h.pool.release(victim)  # whoever owns it may still release it
        assert victim not in h.backend.domains
        await h.stop()

    run(scenario())


def test_a_foreign_unpause_not_yet_noticed_is_caught_at_hand_out(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=2))
        await h.start()
        await settle()
        first, second = h.names(PAUSED, template="dvm")
        h.books[first].since -= 1  # the one a request takes first: the longest paused
        # Unpaused behind the backend's back without an event: only unpause() can tell.
        h.backend.domains[first].paused = False
        handout = await h.pool.request("@dispvm")
        assert handout.name == second
        assert h.books[first].stage is Stage.TAINTED
        await h.stop()

    run(scenario())


def test_a_paused_hand_out_becomes_used_when_its_caller_unpauses_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await settle()
        handout = await h.pool.request("@dispvm", paused=True)
        assert handout.paused and h.backend.domains[handout.name].paused
        assert h.books[handout.name].stage is Stage.HANDED_PAUSED
        assert "used" not in h.event_names()
        h.backend.external_unpause(handout.name)
        await settle(0.1)
        assert h.books[handout.name].stage is Stage.USED
        assert h.events_of("used") == [{"name": handout.name, "template": "dvm"}]
        await h.stop()

    run(scenario())


def test_a_fresh_start_requested_paused_is_paused_before_hand_out(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=0))
        await h.start()
        handout = await h.pool.request("@dispvm", paused=True)
        assert handout.origin == "fresh" and h.backend.domains[handout.name].paused
        await h.stop()

    run(scenario())


# -- fallback and failures --------------------------------------------------------------


def test_with_no_preload_a_request_starts_a_fresh_disposable_within_its_timeout(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=0), backend=FakeBackend({"ready_delay": 8}))
        await h.start()
        handout = await h.pool.request("@dispvm", timeout=10)
        assert handout.origin == "fresh" and 8_000 <= handout.waited_ms < 10_000
        assert h.books[handout.name].stage is Stage.USED
        with pytest.raises(RequestTimeout):
            await h.pool.request("@dispvm", timeout=5)
        await settle(1)
        assert h.handed_out() == [handout.name]  # the abandoned fresh start is gone
        h.check_books()
        await h.stop()

    run(scenario())


def test_a_preload_that_fails_to_start_is_removed_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, backend=FakeBackend({"fail_create": ["alt"]}))
        await h.start()
        await settle(1)
        failed = h.events_of("preload-failed")
        assert failed and all(e["template"] == "alt" and "injected" in e["error"] for e in failed)
        assert all(e["name"] not in h.books for e in failed)
        assert h.pool_members("alt") == []
        assert len(h.names(PAUSED, template="dvm")) == 2  # one broken template, not all
        await h.stop()

    run(scenario())


def test_a_request_never_waits_on_a_preload_that_failed(tmp_path: Path) -> None:
    """Qubes #10928: the request that took a booting preload learns of its failure at
    once and falls back, instead of waiting for ever (or for the startup timeout)."""

    async def scenario() -> None:
        h = Harness(
            tmp_path,
            make_config(max=1, refill_delay=100),
            backend=FakeBackend({"ready_delay": 5}),
        )
        await h.start()
        await settle(1)
        [booting] = h.pool_members("dvm")
        request = asyncio.create_task(h.pool.request("@dispvm"))
        await settle(1)
        assert h.books[booting].stage is Stage.REQUESTED
        h.backend.kill(booting)  # it dies while booting
        handout = await request
        assert handout.origin == "fresh" and handout.name != booting
        assert 5_000 <= handout.waited_ms < 7_000  # 1 s on the dead one, 5 s fresh boot
        assert booting not in h.books and booting not in h.backend.domains
        await h.stop()

    run(scenario())


def test_repeated_start_failures_back_off(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(
            tmp_path,
            make_config(max=1, failure_backoff=5, failure_backoff_max=40),
            backend=FakeBackend({"fail_create": ["dvm"]}),
        )
        await h.start()
        await settle(100)
        attempts = len(h.events_of("preload-failed"))
        # 0, 5, 15, 35, 75: five attempts in 100 s with back-off, not hundreds.
        assert 4 <= attempts <= 6
        h.backend.options.fail_create = set()
        await settle(60)
        assert len(h.names(PAUSED, template="dvm")) == 1
        await h.stop()

    run(scenario())


def test_a_preload_that_never_boots_is_destroyed_and_its_request_falls_back(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(
            tmp_path,
            make_config(max=1, startup_timeout=20, request_timeout=90, refill_delay=100),
            backend=FakeBackend({"never_ready": ["dvm"]}),
        )
        await h.start()
        await settle(1)
        [stuck] = h.pool_members("dvm")
        h.backend.options.never_ready = set()
        handout = await h.pool.request("@dispvm")
        # It waited for the stuck one's startup timeout, then got a fresh one.
        assert handout.name != stuck and handout.origin == "fresh"
        assert 18_000 < handout.waited_ms < 21_000  # the timeout counts from boot start
        assert stuck not in h.backend.domains and stuck not in h.books
        await h.stop()

    run(scenario())


def test_a_fresh_start_that_fails_reports_the_backend_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=0), backend=FakeBackend({"fail_create": ["dvm"]}))
        await h.start()
        with pytest.raises(StartFailed, match="injected"):
            await h.pool.request("@dispvm")
        assert h.names(template="dvm") == []
        await h.stop()

    run(scenario())


def test_a_fresh_start_without_memory_reports_no_memory(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=0), backend=FakeBackend({"host_mib": 300}))
        await h.start()
        with pytest.raises(NoMemory):
            await h.pool.request("@dispvm")
        assert h.handed_out() == []
        await h.stop()

    run(scenario())


def test_rapid_maximum_changes_leave_no_domain_outside_the_books(tmp_path: Path) -> None:
    """Qubes #11129: max 0 -> 1 -> 0 -> 1 while creations are in flight."""

    async def scenario() -> None:
        h = Harness(
            tmp_path,
            make_config(max=0),
            backend=FakeBackend({"create_delay": 2, "ready_delay": 3}),
        )
        await h.start()
        for value in (1, 0, 1, 0, 1, 0, 1):
            await h.pool.set_max(None, value)
            await settle(0.3)
            h.check_books()
        await settle(60)
        h.check_books()
        assert sorted(h.backend.domains) == h.names(PAUSED)
        assert len(h.names(PAUSED, template="dvm")) == 1
        await h.stop()

    run(scenario())


def test_a_request_that_times_out_leaves_nothing_behind(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=1), backend=FakeBackend({"ready_delay": 50}))
        await h.start()
        await settle(1)
        with pytest.raises(RequestTimeout):
            await h.pool.request("@dispvm", timeout=5)
        await settle(100)
        assert h.handed_out() == []
        h.check_books()
        await h.stop()

    run(scenario())


def test_the_request_timeout_is_bounded(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        for bad in (0, -1, 10_000, float("nan")):
            with pytest.raises(BadRequest):
                await h.pool.request("@dispvm", timeout=bad)
        await h.stop()

    run(scenario())


# -- deaths, release --------------------------------------------------------------------


def test_a_preload_that_dies_is_removed_and_replaced(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=1))
        await h.start()
        await settle()
        [victim] = h.names(PAUSED, template="dvm")
        h.backend.kill(victim)
        await settle()
        assert victim not in h.backend.domains  # the dead domain was cleaned up
        assert {"name": victim, "template": "dvm", "reason": "the domain died"} in h.events_of(
            "removed"
        )
        assert len(h.names(PAUSED, template="dvm")) == 1
        await h.stop()

    run(scenario())


def test_release_destroys_a_handed_out_disposable_and_nothing_else(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await settle()
        handout = await h.pool.request("@dispvm")
        await h.pool.release(handout.name)
        assert handout.name not in h.backend.domains and handout.name not in h.books
        with pytest.raises(NotFound):
            await h.pool.release(handout.name)
        [preload, *_] = h.names(PAUSED)
        with pytest.raises(NotFound):
            await h.pool.release(preload)  # pool members are not anybody's to release
        with pytest.raises(NotFound):
            await h.pool.release("disp99999")
        await h.stop()

    run(scenario())


def test_a_disposable_being_destroyed_takes_no_part_in_balancing(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await settle()
        handout = await h.pool.request("@dispvm")
        assert handout.name in h.memory.included
        h.backend.options.op_delay = 1.0  # the destroy takes a while
        releasing = asyncio.ensure_future(h.pool.release(handout.name))
        await asyncio.sleep(0.5)
        # No memory may be handed to a domain on its way out.
        assert handout.name in h.memory.excluded and handout.name not in h.memory.included
        await releasing
        assert handout.name not in h.memory.excluded | h.memory.included
        await h.stop()

    run(scenario())


def test_a_handed_out_disposable_that_shuts_down_is_cleaned_up(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await settle()
        handout = await h.pool.request("@dispvm")
        h.backend.kill(handout.name)
        await settle(1)
        assert handout.name not in h.books and handout.name not in h.backend.domains
        await h.stop()

    run(scenario())


# -- targets ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "source", "template"),
    [
        ("@dispvm", None, "dvm"),
        ("@dispvm", "personal", "dvm"),  # no setting of its own: the system-wide default
        ("@dispvm", "work", "alt"),  # its own default_dispvm
        ("@dispvm:alt", "personal", "alt"),
        ("@dispvm:@tag:work", None, "dvm"),  # the oldest ready preload carrying the tag
    ],
)
def test_targets_resolve_as_qrexec_policy_does(
    tmp_path: Path, target: str, source: str | None, template: str
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await settle()
        handout = await h.pool.request(target, source=source)
        assert handout.template == template
        await h.stop()

    run(scenario())


@pytest.mark.parametrize(
    ("target", "source", "error"),
    [
        ("@dispvm:nope", None, NoSuchTemplate),
        ("@dispvm:appvm", None, NotADispvmTemplate),
        ("@dispvm:@tag:nothing", None, NoSuchTemplate),
        ("@dispvm", "nodefault", NoSuchTemplate),
        ("dvm", None, InvalidTarget),
        ("@dispvm:", None, InvalidTarget),
        ("@dispvm:@tag:", None, InvalidTarget),
    ],
)
def test_bad_targets_are_refused_with_a_named_error(
    tmp_path: Path, target: str, source: str | None, error: type[Exception]
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        with pytest.raises(error):
            await h.pool.request(target, source=source)
        assert h.handed_out() == []
        await h.stop()

    run(scenario())


def test_a_tag_target_takes_ready_preloads_from_every_tagged_template(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(refill_delay=100))
        await h.start()
        await settle()
        handouts = [await h.pool.request("@dispvm:@tag:work") for _ in range(4)]
        assert [x.origin for x in handouts] == ["preload"] * 3 + ["fresh"]
        assert sorted(x.template for x in handouts[:3]) == ["alt", "dvm", "dvm"]
        assert handouts[3].template == "alt"  # fresh: the first tagged template by name
        await h.stop()

    run(scenario())


# -- refresh, reload, suspend -----------------------------------------------------------


def test_refresh_replaces_every_idle_preload(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await settle()
        old = h.names(PAUSED, template="dvm")
        handout = await h.pool.request("@dispvm:alt")
        await h.pool.refresh("dvm")
        await settle()
        new = h.names(PAUSED, template="dvm")
        assert len(new) == 2 and not set(old) & set(new)
        assert handout.name in h.books  # handed-out ones are nobody's to refresh
        assert h.events_of("refreshed")[-1] == {
            "template": "dvm",
            "reason": "refresh requested",
            "discarded": 2,
        }
        with pytest.raises(NoSuchTemplate):
            await h.pool.refresh("nope")
        await h.stop()

    run(scenario())


def test_a_change_to_the_template_files_outdates_its_preloads(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"v1")
    config = make_config(
        {"dvm": {"preload_max": 2, "memory": 400, "kernel": str(kernel)}},
        refresh_check_interval=5,
    )

    async def scenario() -> None:
        h = Harness(tmp_path, config)
        await h.start()
        await settle()
        old = h.names(PAUSED)
        kernel.write_bytes(b"version 2")
        await settle(5)  # the next check sees the change
        assert h.events_of("refreshed")[-1]["reason"] == "the template's files changed"
        # Outdated ones are discarded at once and never handed out.
        assert not set(h.pool_members("dvm")) & set(old)
        handout = await h.pool.request("@dispvm")
        assert handout.name not in old
        await settle(20)  # the files stopped changing: new preloads
        assert len(h.names(PAUSED)) == 2
        assert not set(h.names(PAUSED)) & set(old)
        await h.stop()

    run(scenario())


def test_reconfigure_adds_removes_and_refreshes_templates(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        h.memory.settings = MemorySettings(preferred_floor_mib=1000)  # no shrink below 500
        await h.start()
        await settle()
        old_dvm = h.names(PAUSED, template="dvm")
        handout = await h.pool.request("@dispvm:alt")
        await settle()
        alt = h.names(PAUSED, template="alt")  # its refill
        assert alt and handout.name not in alt
        new = make_config(
            {
                "dvm": {"preload_max": 2, "memory": 500},  # changed definition
                "fresh": {"preload_max": 1, "memory": 400},  # new template
            }
        )
        await h.pool.reconfigure(new)
        await settle()
        assert len(h.names(PAUSED, template="fresh")) == 1
        assert h.pool_members("alt") == []  # removed from the configuration...
        assert handout.name in h.books  # ...but what was handed out stays tracked
        assert not set(alt) & set(h.names())
        new_dvm = h.names(PAUSED, template="dvm")
        assert len(new_dvm) == 2 and not set(new_dvm) & set(old_dvm)
        assert all(h.backend.domains[n].memory_mib == 500 for n in new_dvm)
        await h.stop()

    run(scenario())


def test_suspend_drops_every_preload_and_resume_refills(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await settle()
        handout = await h.pool.request("@dispvm")
        await h.pool.suspend()
        assert set(h.backend.domains) == {handout.name}  # handed-out ones are kept
        await settle()
        assert set(h.backend.domains) == {handout.name}  # and nothing refills
        assert "suspended" in h.pool.summary()
        await h.pool.resume()
        await settle()
        assert len(h.names(PAUSED)) == 3
        await h.stop()

    run(scenario())


def test_no_new_work_once_stopping(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await h.stop()
        with pytest.raises(ShuttingDown):
            await h.pool.request("@dispvm")

    run(scenario())


# -- status -----------------------------------------------------------------------------


def test_status_has_the_protocol_shape(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path)
        await h.start()
        await settle()
        handout = await h.pool.request("@dispvm")
        status = h.status()
        assert [t["name"] for t in status["templates"]] == ["alt", "appvm", "dvm"]
        dvm = status["templates"][2]
        assert set(dvm) == {"name", "max", "threshold_gap", "disposables", "volumes", "savefile"}
        by_name = {d["name"]: d for d in dvm["disposables"]}
        assert by_name[handout.name]["stage"] == "used"
        assert set(by_name[handout.name]) == {
            "name",
            "domid",
            "stage",
            "since",
            "memory_mib",
            "origin",
            "note",
        }
        assert h.pool.summary() == "2/3 preloaded, 0 starting, 1 handed out"
        with pytest.raises(NoSuchTemplate):
            h.status("nope")
        await h.stop()

    run(scenario())


def test_negative_refill_delay_waits_until_the_pool_is_empty(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=2, refill_delay=-1))
        await h.start()
        await settle()
        await h.pool.request("@dispvm")
        await settle()
        assert len(h.pool_members("dvm")) == 1  # one left: no refill
        await h.pool.request("@dispvm")
        await settle()
        assert len(h.names(PAUSED, template="dvm")) == 2  # empty: refilled
        await h.stop()

    run(scenario())


def test_concurrent_requests_never_share_a_disposable(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=4))
        await h.start()
        await settle()
        handouts = await asyncio.gather(*(h.pool.request("@dispvm") for _ in range(12)))
        names = [handout.name for handout in handouts]
        assert len(set(names)) == 12
        assert sum(handout.origin == "preload" for handout in handouts) == 4
        await h.stop()

    run(scenario())
