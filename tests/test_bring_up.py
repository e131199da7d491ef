"""The bring-up's checkpoints: what happens between its steps is always looked at.

Each test makes something happen at the one moment that matters: after a step's wait
has ended by itself, but before the bring-up has resumed to act on it. A wait that is
already over cannot be cut short, so only a checkpoint after the wait sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from dispoold.lifecycle import Stage
from tests.doubles import FakeBackend
from tests.pool_harness import Harness, make_config, settle
from tests.virtual_time import run


class LastMomentBackend(FakeBackend):
    """Runs ``last_moment`` as the guest reports readiness, in the same turn of the loop,
    so that it lands between the end of the boot wait and the bring-up's next step."""

    last_moment: Callable[[], object] | None = None

    async def wait_ready(self, name: str, timeout: float) -> None:
        await super().wait_ready(name, timeout)
        if self.last_moment is not None:
            asyncio.get_running_loop().call_soon(self.last_moment)
            self.last_moment = None


def at_once(coro: Coroutine[Any, Any, None]) -> None:
    """Run an engine call that never awaits to its end now, not in a later turn."""
    try:
        coro.send(None)
    except StopIteration:
        return
    raise AssertionError("the call awaited")


def one_booting_preload(tmp_path: Path) -> tuple[Harness, LastMomentBackend]:
    backend = LastMomentBackend({"ready_delay": 5})
    return Harness(tmp_path, make_config(max=1, refill_delay=0), backend=backend), backend


def test_a_discard_in_the_same_turn_as_readiness_is_not_taken_for_ready(tmp_path: Path) -> None:
    h, backend = one_booting_preload(tmp_path)

    async def scenario() -> None:
        await h.start()
        await settle(1)
        [booting] = h.pool_members("dvm")
        backend.last_moment = lambda: at_once(h.pool.refresh("dvm"))
        await settle()
        h.check_healthy()  # the bring-up did not move a destroyed preload to "ready"
        assert booting not in h.books and booting not in backend.domains
        assert h.names(Stage.PAUSED, template="dvm") != []  # its replacement
        h.check_books()
        await h.stop()

    run(scenario())


def test_a_death_in_the_same_turn_as_readiness_is_a_failed_start(tmp_path: Path) -> None:
    h, backend = one_booting_preload(tmp_path)

    async def scenario() -> None:
        await h.start()
        await settle(1)
        [booting] = h.pool_members("dvm")
        backend.last_moment = lambda: backend.kill(booting)
        await settle(10)
        h.check_healthy()
        assert booting not in h.books and booting not in backend.domains
        [failed] = h.events_of("preload-failed")
        assert failed["name"] == booting and "died" in failed["error"]
        await h.stop()

    run(scenario())


def test_a_preload_that_dies_while_booting_backs_its_template_off(tmp_path: Path) -> None:
    # Found on real Xen: a template whose guest died during boot (a broken init) was
    # retried in a tight loop (20 domains in 6.5 minutes) with no preload-failed event,
    # because the death was taken for a discard.
    backend = FakeBackend({"ready_delay": 30})
    h = Harness(tmp_path, make_config(max=1, refill_delay=0, failure_backoff=5.0), backend=backend)

    async def scenario() -> None:
        await h.start()
        for _ in range(4):
            await settle(2)
            for name in h.pool_members("dvm"):
                if name in backend.domains:
                    backend.kill(name)
            await settle(0.1)
        # 8.4 s of dying guests: the back-off (5 s, then 10 s) allows two or three
        # attempts, where a tight loop would have made one every couple of seconds.
        failures = h.events_of("preload-failed")
        assert 1 <= len(failures) <= 3, failures
        starts = [e for e in h.events_of("preload-started") if e["template"] == "dvm"]
        assert len(starts) == len(failures) + len(h.pool_members("dvm"))
        h.check_books()
        await h.stop()

    run(scenario())
