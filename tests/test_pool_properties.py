"""Random interleavings of everything that can happen to a pool, checked after every step.

Hypothesis drives the engine through requests (plain, paused, by tag), uses, foreign
unpauses, deaths, releases, maximum and threshold changes, refreshes, start failures,
guests that never boot or boot slowly, daemon kills and clean restarts. After every
step it checks the promises dispoold makes:

- no disposable is ever handed out twice, and a tainted one never is;
- every domain the hypervisor holds is in the books, in exactly one place;
- once things settle, no template holds more preloads than its maximum;
- no preload is ever created into the memory threshold;
- every request is answered within its timeout;
- no part of the engine dies.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dispoold.errors import NoMemory, NotFound, RequestTimeout, StartFailed
from dispoold.lifecycle import POOL, Stage
from dispoold.views import Handout
from tests.doubles import FakeBackend
from tests.pool_harness import Harness, Wall, make_config
from tests.virtual_time import _ABANDONED, VirtualTimeLoop, _cancel_all

TEMPLATES = ["dvm", "alt"]
TARGETS = ["@dispvm", "@dispvm:alt", "@dispvm:dvm", "@dispvm:@tag:work"]
MEMORY = 400  # every template's


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="dispoold-prop-"))
        self.backend = FakeBackend({"host_mib": 4000, "create_delay": 1, "ready_delay": 4})
        self.backend.on_create = self._on_create
        self.wall = Wall()
        self.config = make_config(
            threshold_mib=400,
            startup_timeout=20,
            request_timeout=30,
            refill_delay=3,
            gap_retry_interval=5,
            failure_backoff=2,
            failure_backoff_max=10,
        )
        self.handed_out: set[str] = set()
        self.tainted: set[str] = set()
        self.requests: list[tuple[asyncio.Task[Handout], float, float]] = []
        self.violations: list[str] = []
        self.loop: VirtualTimeLoop | None = None
        self.h: Harness | None = None
        self.killed: list[VirtualTimeLoop] = []
        #: (loop time, threshold before the change), this lifetime.
        self.threshold_changes: list[tuple[float, int]] = []

    # -- lifetimes ------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        self._new_lifetime()

    def _new_lifetime(self) -> None:
        self.loop = VirtualTimeLoop()
        self.h = Harness(self.tmp, self.config, backend=self.backend, wall=self.wall)
        self._run(self.h.start())
        self.requests = []
        self.threshold_changes = []

    def _run(self, coro: Any) -> Any:
        assert self.loop is not None
        return self.loop.run_until_complete(coro)

    def _advance(self, seconds: float) -> None:
        self._run(asyncio.sleep(seconds))
        self._collect()

    @property
    def harness(self) -> Harness:
        assert self.h is not None
        return self.h

    def _close_loop(self) -> None:
        """End a lifetime that stopped cleanly: nothing of it may linger."""
        assert self.loop is not None
        self._run(_cancel_all())
        self._run(self.loop.shutdown_asyncgens())
        self.loop.close()

    def teardown(self) -> None:
        if self.loop is not None and self.h is not None and not self.loop.is_closed():
            self._run(self.h.stop(drain=60))
            self._collect()
            self._close_loop()
        for loop in self.killed:
            loop.close()  # frees its descriptors; its frozen tasks stay in _ABANDONED
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- what a host does -----------------------------------------------------------

    def _on_create(self, name: str) -> None:
        d = self.harness.books.get(name)
        if d is not None and d.origin == "preload":
            free_after = self.backend.free_mib() - MEMORY
            # The decision was taken when the creation began: judge it by the lowest
            # threshold in force since then (an operator may have raised it meanwhile).
            assert self.loop is not None
            began = self.loop.time() - self.backend.options.create_delay
            threshold = min(
                [self.harness.pool.threshold_mib()]
                + [old for when, old in self.threshold_changes if when >= began]
            )
            if free_after < threshold:
                self.violations.append(
                    f"{name} created with {free_after} MiB left, threshold {threshold}"
                )

    def _collect(self) -> None:
        """Take the answers of finished requests, checking each hand-out."""
        still = []
        for task, started, timeout in self.requests:
            if not task.done():
                still.append((task, started, timeout))
                continue
            if task.cancelled():
                continue  # the daemon stopped under it; its caller saw the connection go
            exc = task.exception()
            if exc is None:
                handout = task.result()
                if handout.name in self.handed_out:
                    self.violations.append(f"{handout.name} handed out twice")
                if handout.name in self.tainted:
                    self.violations.append(f"tainted {handout.name} handed out")
                self.handed_out.add(handout.name)
            elif not isinstance(exc, RequestTimeout | StartFailed | NoMemory):
                self.violations.append(f"request failed with {exc!r}")
        self.requests = still
        for event in self.harness.events:
            if event.name == "tainted":
                self.tainted.add(event.data["name"])

    # -- rules ------------------------------------------------------------------------

    @rule(
        to=st.sampled_from(TARGETS),
        paused=st.booleans(),
        timeout=st.sampled_from([2.0, 10.0, 30.0]),
    )
    def request(self, to: str, paused: bool, timeout: float) -> None:
        assert self.loop is not None
        task = self.loop.create_task(self.harness.pool.request(to, paused=paused, timeout=timeout))
        self.requests.append((task, self.loop.time(), timeout))
        self._advance(0)

    @rule(seconds=st.sampled_from([0.5, 1.0, 3.0, 7.0, 25.0]))
    def wait(self, seconds: float) -> None:
        self._advance(seconds)

    @rule(data=st.data())
    def caller_unpauses_its_paused_disposable(self, data: st.DataObject) -> None:
        names = sorted(
            n
            for n, d in self.harness.books.items()
            if d.stage is Stage.HANDED_PAUSED and self.backend.domains[n].paused
        )
        if names:
            self.backend.external_unpause(data.draw(st.sampled_from(names)))
            self._advance(0.1)

    @rule(data=st.data())
    def someone_unpauses_a_paused_domain(self, data: st.DataObject) -> None:
        names = sorted(n for n, d in self.backend.domains.items() if d.paused)
        if names:
            self.backend.external_unpause(data.draw(st.sampled_from(names)))
            self._advance(0.1)

    @rule(data=st.data())
    def a_domain_dies(self, data: st.DataObject) -> None:
        names = sorted(self.backend.domains)
        if names:
            self.backend.kill(data.draw(st.sampled_from(names)))
            self._advance(0.1)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        names = sorted(self.handed_out & set(self.harness.books))
        if names:
            name = data.draw(st.sampled_from(names))
            try:
                self._run(self.harness.pool.release(name))
            except NotFound:
                # Only if it is no longer handed out (it died, or is being destroyed).
                d = self.harness.books.get(name)
                if d is not None and d.stage in (Stage.USED, Stage.TAINTED):
                    self.violations.append(f"release of handed-out {name} refused")

    @rule(template=st.sampled_from([*TEMPLATES, None]), value=st.none() | st.integers(0, 4))
    def set_max(self, template: str | None, value: int | None) -> None:
        self._run(self.harness.pool.set_max(template, value))
        self._advance(0)

    @rule(mib=st.none() | st.sampled_from([0, 400, 1200, 2400]))
    def set_threshold(self, mib: int | None) -> None:
        assert self.loop is not None
        self.threshold_changes.append((self.loop.time(), self.harness.pool.threshold_mib()))
        self._run(self.harness.pool.set_threshold(mib))
        self._advance(0)

    @rule(template=st.sampled_from(TEMPLATES))
    def refresh(self, template: str) -> None:
        self._run(self.harness.pool.refresh(template))
        self._advance(0)

    @rule(template=st.sampled_from(TEMPLATES))
    def starts_fail(self, template: str) -> None:
        self.backend.options.fail_create ^= {template}

    @rule(template=st.sampled_from(TEMPLATES))
    def guests_never_boot(self, template: str) -> None:
        self.backend.options.never_ready ^= {template}

    @rule(seconds=st.sampled_from([0.0, 4.0, 15.0]))
    def boot_time(self, seconds: float) -> None:
        self.backend.options.ready_delay = seconds

    @rule()
    def daemon_killed(self) -> None:
        self._collect()
        assert self.loop is not None
        # Frozen where it stands, as kill -9 leaves a process: no clean-up runs.
        self.killed.append(self.loop)
        _ABANDONED.append(asyncio.all_tasks(self.loop))
        self._new_lifetime()

    @rule()
    def daemon_restarted(self) -> None:
        self._run(self.harness.stop(drain=60))
        self._collect()
        self._close_loop()
        self._new_lifetime()

    @rule()
    def heal_and_settle(self) -> None:
        """Faults stop; after a while every pool is within its maximum and nothing is
        half-way anywhere."""
        self.backend.options.fail_create = set()
        self.backend.options.never_ready = set()
        self._advance(300)
        for template in TEMPLATES:
            members = [
                d for d in self.harness.books.values() if d.template == template and d.stage in POOL
            ]
            wanted = self.harness.pool.effective_max(template)
            if len(members) > wanted:
                self.violations.append(f"{template}: {len(members)} preloads, max {wanted}")
            if any(d.stage is not Stage.PAUSED for d in members):
                self.violations.append(f"{template}: preloads still not ready after settling")
        if any(d.stage is Stage.DESTROYING for d in self.harness.books.values()):
            self.violations.append("domains still being destroyed after settling")

    # -- invariants -------------------------------------------------------------------

    @invariant()
    def nothing_broke(self) -> None:
        if self.h is None:
            return
        self.harness.check_healthy()
        assert not self.violations, self.violations

    @invariant()
    def every_domain_is_in_the_books_once(self) -> None:
        if self.h is not None:
            self.harness.check_books()

    @invariant()
    def requests_are_answered_within_their_timeout(self) -> None:
        if self.loop is None:
            return
        now = self.loop.time()
        for task, started, timeout in self.requests:
            assert task.done() or now - started <= timeout + 1e-6, (
                f"a request is {now - started:g} s old, timeout {timeout:g} s"
            )

    @precondition(lambda self: self.h is not None)
    @invariant()
    def pool_members_are_disposable_templates_only(self) -> None:
        assert not self.harness.pool_members("appvm")


# The example count comes from the active profile (tests/conftest.py).
PoolMachine.TestCase.settings = settings(stateful_step_count=40)
TestPoolProperties = PoolMachine.TestCase
