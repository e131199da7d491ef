"""Random interleavings of everything that can happen to a pool, checked after every step.

Hypothesis drives the engine through requests (plain, paused, by tag, several at once),
uses, foreign unpauses, deaths, releases, maximum and threshold changes, refreshes, start
failures, guests that never boot or boot slowly, a failure at any one step of any
backend or memory operation, daemon kills (between operations, and inside one: at any
step a double yields at) and clean restarts. Every operation of the doubles takes a
time Hypothesis chooses and yields in an order a seeded jitter varies, so concurrent
operations interleave at every await. After every step it checks the promises dispoold
makes:

- no disposable is ever handed out twice, and a tainted one never is;
- nothing is held as handed out that no request received;
- every domain the hypervisor holds is in the books, in exactly one place, and on disk
  (the journal) at every moment the daemon can be killed;
- a clean stop leaves no half-started preload behind;
- no preload is ever created into the memory threshold;
- once things settle, each template holds what the Qubes rule says, worked out here from
  the settings this test made, not asked of the engine: the maximum (the global one on
  the default template whenever it is set, else the template's own), or as many as the
  memory above the threshold allows, ``min((free - threshold) // memory, wanted)``;
- every request is answered within its timeout;
- no part of the engine dies.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from dispoold.backend import BackendError
from dispoold.errors import NoMemory, NotFound, RequestTimeout, StartFailed
from dispoold.journal import Record
from dispoold.lifecycle import POOL, Stage
from dispoold.views import Handout
from tests.doubles import FakeBackend
from tests.pool_harness import Harness, Wall, make_config
from tests.virtual_time import _ABANDONED, VirtualTimeLoop, _cancel_all

TEMPLATES = ["dvm", "alt"]
TARGETS = ["@dispvm", "@dispvm:alt", "@dispvm:dvm", "@dispvm:@tag:work"]
MEMORY = 400  # every template's
#: What make_config says: dvm is the default disposable template; no global maximum.
DEFAULT_TEMPLATE = "dvm"
CONFIGURED_MAX = {"dvm": 2, "alt": 1}
CONFIGURED_THRESHOLD = 400
#: Steps a one-off failure can be injected at (tests/doubles.py names them).
FAULT_STEPS = [
    "create",
    "create.build",
    "create.start",
    "wait_ready",
    "pause",
    "unpause",
    "memory",
    "set_memory_target",
    "destroy",
    "list_owned",
    "free_memory",
    "memory.available",
    "memory.allocation",
    "memory.shrink",
]
#: Steps whose duration Hypothesis chooses (the rest yield once and take no time).
TIMED_STEPS = [
    "create",
    "create.start",
    "pause",
    "unpause",
    "destroy",
    "domain_info",
    "list_owned",
    "free_memory",
    "memory",
    "memory.available",
    "memory.allocation",
    "memory.shrink",
]
#: A balloon that hardly moves makes a shrink outlast a clean stop's drain (60 s here).
LONGER = {"memory.shrink": (90.0, 90.0)}
HALF_STARTED = (Stage.PRELOAD, Stage.STARTUP, Stage.SHRINKING)


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="dispoold-prop-"))
        self.backend = FakeBackend({"host_mib": 4000, "create_delay": 1, "ready_delay": 4})
        self.backend.on_create = self._on_create
        self.wall = Wall()
        self.config = make_config(
            threshold_mib=CONFIGURED_THRESHOLD,
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
        #: The run-time settings this test made (they outlive restarts, as the journal
        #: keeps them): maxima by template, None for the global one; the threshold.
        self.maxima: dict[str | None, int] = {}
        self.threshold: int | None = None
        #: (loop time, threshold before the change), this lifetime.
        self.threshold_changes: list[tuple[float, int]] = []

    # -- the Qubes rule, written out ------------------------------------------------

    def wanted(self, template: str) -> int:
        """The global maximum applies to the default disposable template only, and wins
        there whenever it is set, even to 0; otherwise the template's own maximum."""
        if template == DEFAULT_TEMPLATE and None in self.maxima:
            return self.maxima[None]
        return self.maxima.get(template, CONFIGURED_MAX[template])

    def threshold_mib(self) -> int:
        return CONFIGURED_THRESHOLD if self.threshold is None else self.threshold

    # -- lifetimes ------------------------------------------------------------------

    @initialize(
        timings=st.fixed_dictionaries(
            {
                step: st.sampled_from([0.0, 0.0, 0.05, 0.5, *LONGER.get(step, ())])
                for step in TIMED_STEPS
            }
        ),
        jitter=st.integers(0, 2**32 - 1),
    )
    def start(self, timings: dict[str, float], jitter: int) -> None:
        self.backend.steps.delays.update(timings)
        # A Random of its own, seeded by Hypothesis: the same scenario replays the same
        # interleavings (and the doubles may use it in teardown, after the draw is over).
        self.backend.steps.jitter = random.Random(jitter)
        self._new_lifetime()

    def _new_lifetime(self) -> None:
        for _ in range(3):
            self.loop = VirtualTimeLoop()
            self.h = Harness(self.tmp, self.config, backend=self.backend, wall=self.wall)
            self.requests = []
            self.threshold_changes = []
            try:
                self._run(self.h.start())
                return
            except BackendError:
                # The host could not be listed (an injected failure): the daemon exits,
                # and its service manager starts it again.
                self._close_loop()
                self.h.close_journal()
        raise AssertionError("the daemon could not start three times in a row")

    def harness_records(self) -> list[Record]:
        if self.h is None:
            return []
        return self.h.records_on_disk()

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
        self._run(_cancel_all())
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
        """A domain is about to take its memory: a preload must leave the threshold free."""
        d = self.harness.books.get(name)
        if d is None or d.origin != "preload":
            return
        free_after = self.backend.free_mib() - MEMORY
        # The engine last checked when its allocation began; an operator may have raised
        # the threshold since, too late for this creation: judge it by the lowest
        # threshold in force since then. (Both times are readings of one clock, so they
        # compare exactly: no arithmetic on them.)
        began = self.harness.memory.allocated_at.get(name)
        in_force = [self.threshold_mib()]
        if began is not None:
            in_force += [old for when, old in self.threshold_changes if when >= began]
        else:
            self.violations.append(f"{name} created outside a memory allocation")
        if free_after < min(in_force):
            self.violations.append(
                f"{name} created with {free_after} MiB left, threshold {min(in_force)}"
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

    def _kill(self) -> None:
        """kill -9: the lifetime freezes where it stands; the next one starts from what
        is on disk and on the host."""
        self._collect()
        assert self.loop is not None
        recorded = {record.name for record in self.harness.records_on_disk()}
        unrecorded = set(self.backend.domains) - recorded
        if unrecorded:
            self.violations.append(f"killed with domains not in the journal: {sorted(unrecorded)}")
        self.killed.append(self.loop)
        _ABANDONED.append(asyncio.all_tasks(self.loop))
        self._new_lifetime()

    # -- rules ------------------------------------------------------------------------

    @rule(
        to=st.sampled_from(TARGETS),
        paused=st.booleans(),
        timeout=st.sampled_from([2.0, 10.0, 30.0]),
    )
    def request(self, to: str, paused: bool, timeout: float) -> None:
        self._request(to, paused, timeout)
        self._advance(0)

    @rule(
        to=st.lists(st.sampled_from(TARGETS), min_size=2, max_size=4),
        timeout=st.sampled_from([10.0, 30.0]),
    )
    def requests_at_once(self, to: list[str], timeout: float) -> None:
        for target in to:
            self._request(target, False, timeout)
        self._advance(0)

    def _request(self, to: str, paused: bool, timeout: float) -> None:
        assert self.loop is not None
        task = self.loop.create_task(self.harness.pool.request(to, paused=paused, timeout=timeout))
        self.requests.append((task, self.loop.time(), timeout))

    @rule(seconds=st.sampled_from([0.05, 0.5, 1.0, 3.0, 7.0, 25.0]))
    def wait(self, seconds: float) -> None:
        self._advance(seconds)

    @rule(data=st.data())
    def caller_unpauses_its_paused_disposable(self, data: st.DataObject) -> None:
        names = sorted(
            n
            for n, d in self.harness.books.items()
            if d.stage is Stage.HANDED_PAUSED
            and n in self.backend.domains
            and self.backend.domains[n].paused
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
            self._collect()

    @rule(template=st.sampled_from([*TEMPLATES, None]), value=st.none() | st.integers(0, 4))
    def set_max(self, template: str | None, value: int | None) -> None:
        self._run(self.harness.pool.set_max(template, value))
        if value is None:
            self.maxima.pop(template, None)
        else:
            self.maxima[template] = value
        self._advance(0)

    @rule(mib=st.none() | st.sampled_from([0, 400, 1200, 2400]))
    def set_threshold(self, mib: int | None) -> None:
        assert self.loop is not None
        self.threshold_changes.append((self.loop.time(), self.threshold_mib()))
        self._run(self.harness.pool.set_threshold(mib))
        self.threshold = mib
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

    @rule(seconds=st.sampled_from([0.0, 0.5, 90.0]))
    def balloons_take(self, seconds: float) -> None:
        """How long a shrink takes from now on (90 s: longer than a clean stop's drain)."""
        self.backend.steps.delays["memory.shrink"] = seconds

    @rule(step=st.sampled_from(FAULT_STEPS))
    def a_step_fails_once(self, step: str) -> None:
        self.backend.steps.fail(step)

    @rule()
    def daemon_killed(self) -> None:
        self._kill()

    @rule(steps=st.integers(1, 40))
    def daemon_killed_inside_an_operation(self, steps: int) -> None:
        """Run until the doubles have reached ``steps`` more steps, and kill the daemon
        there: in the middle of whatever operations are under way."""
        assert self.loop is not None
        loop, doubles = self.loop, self.backend.steps
        target = doubles.count + steps

        def stop_there(step: str, name: str | None) -> None:
            if doubles.count >= target:
                loop.stop()  # after this iteration: the operation stays at its step

        doubles.observers.append(stop_there)
        guard = loop.call_later(120, loop.stop)
        try:
            loop.run_forever()
        finally:
            doubles.observers.remove(stop_there)
            guard.cancel()
        self._kill()

    @rule()
    def daemon_restarted(self) -> None:
        self._run(self.harness.stop(drain=60))
        self._collect()
        for record in self.harness.records_on_disk():
            if record.stage in HALF_STARTED and record.name in self.backend.domains:
                self.violations.append(
                    f"a clean stop left {record.name} behind in {record.stage.value}"
                )
        self._close_loop()
        self._new_lifetime()

    @rule()
    def heal_and_settle(self) -> None:
        """Faults stop; after a while each pool holds what the Qubes rule says and nothing
        is half-way anywhere."""
        self.backend.options.fail_create = set()
        self.backend.options.never_ready = set()
        self.backend.steps.clear()
        self.backend.steps.delays["memory.shrink"] = 0.5  # balloons move again
        self._advance(300)
        room = max(0, self.backend.free_mib() - self.threshold_mib()) // MEMORY
        status = {t["name"]: t for t in self.harness.status()["templates"]}
        for template in TEMPLATES:
            members = [
                d for d in self.harness.books.values() if d.template == template and d.stage in POOL
            ]
            wanted = self.wanted(template)
            if len(members) > wanted:
                self.violations.append(f"{template}: {len(members)} preloads, max {wanted}")
            elif len(members) < wanted and room > 0:
                self.violations.append(
                    f"{template}: {len(members)} preloads of {wanted}, with room for {room} more"
                )
            elif status[template]["threshold_gap"] != wanted - len(members):
                self.violations.append(
                    f"{template}: {wanted - len(members)} short, "
                    f"status says {status[template]['threshold_gap']}"
                )
            if any(d.stage is not Stage.PAUSED for d in members):
                self.violations.append(f"{template}: preloads still not ready after settling")
        destroying = {n for n, d in self.harness.books.items() if d.stage is Stage.DESTROYING}
        if stuck := sorted(destroying):
            self.violations.append(f"still being destroyed after settling: {stuck}")

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
    def nothing_is_held_as_handed_out_that_no_request_received(self) -> None:
        if self.h is None:
            return
        self._collect()
        for d in self.harness.books.values():
            given = d.stage in (Stage.USED, Stage.HANDED_PAUSED)
            if given and d.name not in self.handed_out:
                raise AssertionError(f"{d.name} is {d.stage.value} but no request received it")

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
