"""Qubes OS' own integration scenarios for preloaded disposables, against the engine.

What each of Qubes' integration tests checks (qubes-core-admin, the dispvm tests of
TC_20_DispVMMixin: test_012, 015, 016, 018, 019, and the fix for Qubes #10928), stated
again in this engine's terms: a feature ``preload-dispvm-max`` on a template is
``set_max(template, n)``, on dom0 ``set_max(None, n)``; deleting one is ``None``; the
system's default disposable template is ``[pool] default_dispvm``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dispoold.config import Config
from dispoold.errors import StartFailed
from dispoold.lifecycle import POOL, Stage
from tests.doubles import FakeBackend
from tests.pool_harness import Harness, make_config, settle
from tests.virtual_time import run

PAUSED = Stage.PAUSED


def two_templates(default: str | None = "dvm", **pool: Any) -> Config:
    """``dvm`` and ``alt``, no preloads unless a test asks for them (no features set)."""
    return make_config(
        {
            "dvm": {"preload_max": 0, "memory": 400},
            "alt": {"preload_max": 0, "memory": 400},
        },
        default_dispvm=default,
        **pool,
    )


# -- 015: a race of several requests -------------------------------------------------------


def test_015_concurrent_requests_get_distinct_disposables_and_a_disjoint_refill(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, two_templates())
        await h.start()
        await h.pool.set_max("dvm", 3)
        await settle()
        old = h.names(PAUSED, template="dvm")
        assert len(old) == 3
        targets = await asyncio.gather(*(h.pool.request("@dispvm:dvm") for _ in range(3)))
        names = [t.name for t in targets]
        assert len(set(names)) == 3
        assert sorted(names) == old  # each got one of the preloads
        await settle()
        refill = h.names(PAUSED, template="dvm")
        assert len(refill) == 3 and not set(refill) & set(old)
        await h.stop()

    run(scenario())


# -- 016: a request while the maximum drops to 0 -------------------------------------------


@pytest.mark.parametrize("booted", [True, False])
@pytest.mark.parametrize("request_first", [True, False])
def test_016_a_request_while_the_maximum_is_zeroed_still_gets_a_disposable(
    tmp_path: Path, booted: bool, request_first: bool
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, two_templates(), backend=FakeBackend({"ready_delay": 20}))
        await h.start()
        await h.pool.set_max("dvm", 1)
        await settle(60 if booted else 5)
        assert len(h.pool_members("dvm")) == 1
        calls = [h.pool.request("@dispvm:dvm"), h.pool.set_max("dvm", 0)]
        results = await asyncio.gather(*(calls if request_first else reversed(calls)))
        handout = results[0] if request_first else results[1]
        assert handout is not None and handout.name.startswith("disp")
        assert h.books[handout.name].stage is Stage.USED
        await settle()
        assert h.pool_members("dvm") == []
        h.check_books()
        await h.stop()

    run(scenario())


# -- 012: memory for one preload of two ----------------------------------------------------


@pytest.mark.parametrize(
    ("host_mib", "threshold"),
    [(400, 0), (800, 400)],
    ids=["memory for one", "memory for two, one of them kept free"],
)
def test_012_available_memory_for_one_preload_of_two_gives_one(
    tmp_path: Path, host_mib: int, threshold: int
) -> None:
    async def scenario() -> None:
        h = Harness(
            tmp_path,
            two_templates(threshold_mib=threshold),
            backend=FakeBackend({"host_mib": host_mib}),
        )
        await h.start()
        await h.pool.set_max("dvm", 2)
        await settle(15)
        assert len(h.names(PAUSED, template="dvm")) == 1
        [dvm] = [t for t in h.status()["templates"] if t["name"] == "dvm"]
        assert dvm["threshold_gap"] == 1
        gap = h.events_of("gap")[-1]
        assert (gap["missing"], gap["threshold_mib"]) == (1, threshold)
        await h.stop()

    run(scenario())


# -- 018: local and global maxima, and switching the default template -----------------------


def test_018_local_and_global_maxima_and_default_template_switches(tmp_path: Path) -> None:
    """The nine steps, each with its "state must / must not change"."""
    h = Harness(tmp_path, two_templates(default="dvm"))

    def preloads(template: str) -> list[str]:
        return h.names(PAUSED, template=template)

    async def step(expect: dict[str, int], *, unchanged: bool = False) -> None:
        created = h.backend.counters.created
        before = {t: preloads(t) for t in expect}
        await settle()
        assert {t: len(preloads(t)) for t in expect} == expect
        assert all(d.stage is PAUSED for d in h.books.values() if d.stage in POOL)
        if unchanged:  # not only as many: the same ones, and nothing made meanwhile
            assert {t: preloads(t) for t in expect} == before
            assert h.backend.counters.created == created

    async def scenario() -> None:
        await h.start()
        # 1. The global maximum, on the default template: must change.
        await h.pool.set_max(None, 1)
        await step({"dvm": 1, "alt": 0})
        # 2. A local maximum on the default template: the global one wins, no change.
        await h.pool.set_max("dvm", 2)
        await step({"dvm": 1, "alt": 0}, unchanged=True)
        # 3. The local one deleted: no change.
        await h.pool.set_max("dvm", None)
        await step({"dvm": 1, "alt": 0}, unchanged=True)
        # 4. Local set, global deleted: the local one applies, must change.
        await h.pool.set_max("dvm", 2)
        await h.pool.set_max(None, None)
        await step({"dvm": 2, "alt": 0})
        # 5. Local emptied, then the global set: the global one, must change.
        emptied = preloads("dvm")
        await h.pool.set_max("dvm", 0)
        await step({"dvm": 0, "alt": 0})
        await h.pool.set_max(None, 1)
        await step({"dvm": 1, "alt": 0})
        assert not set(preloads("dvm")) & set(emptied)
        # 6. The default switched to alt: the global maximum follows it, must change.
        await h.pool.reconfigure(two_templates(default="alt"))
        await step({"dvm": 0, "alt": 1})
        # 7. A local maximum on dvm, no longer the default: alt must not change.
        kept = preloads("alt")
        await h.pool.set_max("dvm", 2)
        await step({"dvm": 2, "alt": 1})
        assert preloads("alt") == kept
        # 8. The default switched back to dvm: alt's go, the global one wins on dvm.
        await h.pool.reconfigure(two_templates(default="dvm"))
        await step({"dvm": 1, "alt": 0})
        # 9. No default template any more: the global maximum applies to none, dvm's own
        #    applies again, must change.
        await h.pool.reconfigure(two_templates(default=None))
        await step({"dvm": 2, "alt": 0})
        h.check_books()
        await h.stop()

    run(scenario())


# -- 019-021: outdated preloads are discarded and never handed out -------------------------


def test_019_preloads_outdated_by_their_files_are_replaced_and_never_handed_out(
    tmp_path: Path,
) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"v1")
    config = make_config(
        {"dvm": {"preload_max": 2, "memory": 400, "kernel": str(kernel)}},
        refresh_check_interval=5,
        refill_delay=0,
    )

    async def scenario() -> None:
        h = Harness(tmp_path, config)
        await h.start()
        await settle()
        old = set(h.names(PAUSED))
        kernel.write_bytes(b"v2, the template was updated")
        await settle(5)  # the next check
        handed_out = [(await h.pool.request("@dispvm")).name for _ in range(3)]
        await settle(1)
        handed_out += [(await h.pool.request("@dispvm")).name for _ in range(2)]
        await settle(30)
        new = set(h.names(PAUSED))
        assert len(new) == 2 and not new & old
        assert not set(handed_out) & old
        assert not old & set(h.backend.domains)  # destroyed, not only set aside
        await h.stop()

    run(scenario())


@pytest.mark.parametrize("how", ["refresh requested", "definition changed"])
def test_020_preloads_outdated_by_a_refresh_or_a_new_definition_are_never_handed_out(
    tmp_path: Path, how: str
) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=2, refill_delay=0))
        await h.start()
        await settle()
        old = set(h.names(PAUSED, template="dvm"))
        if how == "refresh requested":
            await h.pool.refresh("dvm")
        else:
            changed = make_config(
                {
                    "dvm": {"preload_max": 2, "memory": 500, "tags": ["work"]},
                    "alt": {"preload_max": 1, "memory": 400, "tags": ["work"]},
                },
                max=2,
                refill_delay=0,
            )
            await h.pool.reconfigure(changed)
        # At once, and while the new ones are still starting.
        handouts = [await h.pool.request("@dispvm") for _ in range(3)]
        assert not {x.name for x in handouts} & old
        await settle()
        new = set(h.names(PAUSED, template="dvm"))
        assert len(new) == 2 and not new & old
        await h.stop()

    run(scenario())


def test_021_preloads_outdated_while_still_starting_are_discarded_too(tmp_path: Path) -> None:
    async def scenario() -> None:
        # Three start slots: with two templates wanting preloads, one keeps a slot free
        # for the other, and both of these may boot at once.
        config = make_config(max=2, max_concurrent_starts=3)
        h = Harness(tmp_path, config, backend=FakeBackend({"ready_delay": 30}))
        await h.start()
        await settle(5)
        booting = set(h.names(Stage.STARTUP, template="dvm"))
        assert len(booting) == 2
        await h.pool.refresh("dvm")
        handout = await h.pool.request("@dispvm")
        assert handout.name not in booting
        await settle(100)
        assert not booting & set(h.backend.domains)
        assert len(h.names(PAUSED, template="dvm")) == 2
        await h.stop()

    run(scenario())


def test_019_a_preload_outdated_since_the_last_look_is_not_handed_out(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"v1")
    config = make_config(
        {"dvm": {"preload_max": 1, "memory": 400, "kernel": str(kernel)}},
        refresh_check_interval=5,
    )

    async def scenario() -> None:
        h = Harness(tmp_path, config)
        await h.start()
        await settle(7)  # just after a look
        [old] = h.names(PAUSED)
        kernel.write_bytes(b"v2, the template was updated")
        handout = await h.pool.request("@dispvm")
        assert handout.name != old
        await h.stop()

    run(scenario())


# -- Qubes #10928: a failed start ----------------------------------------------------------


def test_10928_a_fresh_disposable_that_fails_to_start_is_removed_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        h = Harness(tmp_path, make_config(max=0), backend=FakeBackend({"ready_delay": 5}))
        await h.start()
        fault = h.backend.steps.fail("create.build", template="dvm")
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(StartFailed):
            await h.pool.request("@dispvm", timeout=60)
        assert loop.time() - start < 1  # told at once, not after a timeout
        assert fault.hits == 1
        assert h.names(template="dvm") == []
        assert not any(d.template == "dvm" for d in h.backend.domains.values())
        handout = await h.pool.request("@dispvm", timeout=60)  # the next one is unaffected
        assert h.names(template="dvm") == [handout.name]
        await h.stop()

    run(scenario())


@pytest.mark.parametrize("step", ["wait_ready", "pause"])
def test_10928_no_request_waits_for_a_preload_that_failed_to_start(
    tmp_path: Path, step: str
) -> None:
    async def scenario() -> None:
        h = Harness(
            tmp_path,
            make_config(max=1, refill_delay=100, startup_timeout=60),
            backend=FakeBackend({"ready_delay": 10}),
        )
        await h.start()
        await settle(2)
        [preload] = h.pool_members("dvm")
        if step == "wait_ready":
            request = asyncio.create_task(h.pool.request("@dispvm"))
            await settle(1)
            assert h.books[preload].stage is Stage.REQUESTED  # it waits on that one...
            h.backend.steps.fail(step, name=preload)  # ...which then fails to boot...
            handout = await request
            # ...until the failure, then starts afresh at once: 10 s of boot in all, not
            # 1.2 x the startup timeout.
            assert handout.origin == "fresh" and handout.waited_ms < 12_000
        else:
            h.backend.steps.fail(step, name=preload)
            await settle(20)  # it fails at its pause, in the pool
            assert [e["name"] for e in h.events_of("preload-failed")] == [preload]
        assert preload not in h.books and preload not in h.backend.domains
        await h.stop()

    run(scenario())
