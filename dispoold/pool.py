"""The pool engine: one preload queue per disposable template, with Qubes' semantics.

The engine knows nothing of libxl or sockets. It drives a :class:`~dispoold.backend.Backend`
and a :class:`~dispoold.memory.MemoryManager`, keeps its books (:mod:`dispoold.books`),
asks its origins (:mod:`dispoold.origins`) for the disposables requests get, takes its
limits from :mod:`dispoold.limits`, recovers from a restart with
:mod:`dispoold.recovery`, and publishes lifecycle events on an
:class:`~dispoold.events.EventBus`. It answers with typed values
(:mod:`dispoold.views`) and raises only :mod:`dispoold.errors`.

How a disposable is brought up: one task per disposable runs its steps (create, boot,
shrink, pause for a preload; create, boot for a fresh start). Each step returns an
:class:`Outcome`, and between steps a checkpoint looks at what happened meanwhile (it was
discarded, someone unpaused it, its domain died). Whoever wants a disposable gone while
its bring-up runs moves it to ``destroying`` and cuts short only the wait the bring-up is
in (the boot, the shrink), never the creation; the bring-up then destroys it itself. So
a domain that is still being created is never forgotten (Qubes #11129).

A background task that fails unexpectedly sets :attr:`Pool.fatal`: the daemon exits and
the journal brings the next start back to a consistent state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

from dispoold import identity, process, targets
from dispoold.backend import (
    Backend,
    BackendError,
    Disk,
    DomainEventKind,
    DomainInfo,
    Marker,
    NotPaused,
    Provision,
    SaveRestore,
)
from dispoold.books import Books, Build, Disposable
from dispoold.config import Config, TemplateSettings
from dispoold.errors import (
    BadRequest,
    DispidsExhausted,
    DispooldError,
    NoMemory,
    NoSuchTemplate,
    NotADispvmTemplate,
    NotFound,
    RequestTimeout,
    ShuttingDown,
    StartFailed,
)
from dispoold.events import EventBus
from dispoold.journal import Journal
from dispoold.lifecycle import HANDED_OUT, POOL, Event, Stage
from dispoold.limits import Limits, StartSlots
from dispoold.memory import MemoryManager, MemoryManagerError
from dispoold.memory import NoMemory as HostOutOfMemory
from dispoold.origins import Origin
from dispoold.origins.fresh import FreshStart
from dispoold.origins.preload import Preloads
from dispoold.origins.restore import Keeper, Restores
from dispoold.recovery import Fate, plan
from dispoold.savefile import (
    MAX_PRERUN_BYTES,
    Description,
    SavedVolume,
    Savefile,
    SavefileError,
    State,
    Store,
)
from dispoold.storage import Planned, Storage, StorageError
from dispoold.views import (
    Handout,
    OriginName,
    PoolView,
    SavefileView,
    TemplateView,
    VolumeView,
)

T = TypeVar("T")

#: Seconds between attempts to destroy a domain the backend failed to destroy.
DESTROY_RETRY = 5.0
#: How long suspend waits for the preloads to be destroyed.
SUSPEND_TIMEOUT = 60.0
#: Which pool member goes first when the maximum is lowered: the least advanced.
_TRIM_ORDER = {Stage.PRELOAD: 0, Stage.STARTUP: 1, Stage.SHRINKING: 2, Stage.PAUSED: 3}

#: The failures of the engine's ports: what a step of a bring-up may raise.
PORT_ERRORS = (BackendError, MemoryManagerError, StorageError, SavefileError)


class Outcome(Enum):
    """What a step of a bring-up (or a checkpoint between steps) found."""

    #: Carry on with the next step.
    GO = "go"
    #: The engine no longer wants it (it is ``destroying``): destroy it.
    DISCARDED = "discarded"
    #: Someone else unpaused it: it is theirs now, left running and never handed out.
    TAINTED = "tainted"
    #: Not started after all: creating it now would eat into the memory threshold.
    NO_ROOM = "no room"
    #: Its domain died while it was being brought up: a failed start.
    DIED = "died"


@dataclass(eq=False)
class Queue:
    """A disposable template and what the engine knows about filling it."""

    name: str
    settings: TemplateSettings
    #: The fingerprint of the template now; preloads with another one are outdated.
    fingerprint: str
    #: Its files' state when ``fingerprint`` was taken (compared at every request).
    files: tuple[str, ...] = ()
    #: False right after the template's files changed: wait until they stop changing.
    settled: bool = True
    #: Preloads wanted but not started for lack of memory (the availability gap).
    gap: int = 0
    failures: int = 0
    #: Loop time before which no preload starts (back-off after failures).
    retry_at: float = 0.0
    timer: asyncio.TimerHandle | None = None
    #: When the savefile's preparation is due (if the template has one).
    timer_savefile: asyncio.TimerHandle | None = None


Step = Callable[[Disposable, Queue], Awaitable[Outcome]]


class Pool:
    """The preload pools of every configured disposable template.

    Construct it inside the running event loop, then :meth:`start` it.
    """

    def __init__(
        self,
        config: Config,
        *,
        backend: Backend,
        memory: MemoryManager,
        journal: Journal,
        bus: EventBus,
        log: logging.Logger,
        now: Callable[[], float] = time.time,
        storage: Storage | None = None,
    ) -> None:
        self.config = config
        self._backend = backend
        self._memory = memory
        self._journal = journal
        self._storage = storage or Storage({}, config.daemon.instance)
        self.bus = bus
        self._log = log
        self._now = now
        self.books = Books(journal, now)
        self.limits = Limits(config, journal)
        self._queues = {
            name: Queue(
                name,
                settings,
                settings.fingerprint(self._storage.identify),
                settings.file_states(),
            )
            for name, settings in config.templates.items()
        }
        #: MiB used by each volume, as last measured (status shows them per template).
        self._volume_usage: dict[str, float] = {}
        #: What the backend probed at start (``capabilities``), for status.
        self._hypervisor: dict[str, Any] = {}
        #: Asked in this order for every request: the fastest way to a disposable first.
        self.origins: tuple[Origin, ...] = (Preloads(self), Restores(self), FreshStart(self))
        self.keeper = Keeper(
            Store(config.savefile.directory), self._storage, journal, bus, log.getChild("savefile")
        )
        self.keeper.configure(self._savefile_templates(config))
        self._start_slots = StartSlots(config.pool.max_concurrent_starts, self._templates_wanting)
        self._fill_lock = asyncio.Lock()
        self._pending_mib = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._suspended = False
        self._stopping = False
        #: Disposables whose domain died while their bring-up ran: a failed start.
        self._died: set[str] = set()
        self.fatal: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # == life of the engine ============================================================

    async def start(self) -> None:
        """Replay the journal, reconcile it with the backend, start watching, fill."""
        self.limits.load()
        probe = getattr(self._backend, "capabilities", None)
        if probe is not None:
            self._hypervisor = await probe()
        await self.keeper.load({n: q.fingerprint for n, q in self._queues.items()})
        await self._recover()
        self._spawn(self._watch_backend(), "backend events")
        self._spawn(self._watch_templates(), "template files")
        for queue in self._queues.values():
            self._schedule_fill(queue)
            self._want_savefile(queue)

    async def stop(self, drain: float) -> None:
        """Stop filling, destroy half-started preloads (paused ones survive for the next
        start), and end every task within ``drain`` seconds."""
        self._stopping = True
        for queue in self._queues.values():
            self._cancel_timer(queue)
        for d in self.books:
            if d.stage in POOL and d.stage is not Stage.PAUSED:
                self._end(d, Event.DISCARD, "the daemon is stopping")
        work = [
            t
            for d in self.books
            for t in (d.bring_up, d.destroying)
            if t is not None and not t.done()
        ]
        if work:
            _, pending = await asyncio.wait(work, timeout=drain)
            if pending:
                self._log.warning(
                    "%d preload(s) not cleaned up within %g s; the next start will",
                    len(pending),
                    drain,
                )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # == requests =======================================================================

    async def request(
        self,
        target: str = targets.DISPVM,
        source: str | None = None,
        paused: bool = False,
        timeout: float | None = None,
    ) -> Handout:
        """Hand out a disposable for ``target``, from the first origin that has one.
        Answers within ``timeout`` seconds, or raises :class:`RequestTimeout`.

        Raises :class:`BadRequest`, :class:`NoSuchTemplate`, :class:`NotADispvmTemplate`,
        :class:`ShuttingDown`, and when the last origin fails :class:`NoMemory` or
        :class:`StartFailed`.
        """
        if self._stopping:
            raise ShuttingDown("dispoold is stopping")
        limit = self.config.pool.request_timeout if timeout is None else timeout
        if not (0 < limit <= self.config.pool.max_request_timeout):
            raise BadRequest(
                f"timeout must be above 0 and at most {self.config.pool.max_request_timeout:g} s"
            )
        names = targets.resolve(
            target,
            source,
            templates=self.config.templates,
            sources=self.config.sources,
            default_dispvm=self.config.pool.default_dispvm,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(limit):
                d, domid = await self._obtain(names, paused)
        except TimeoutError:
            raise RequestTimeout(f"no disposable for {target} within {limit:g} s") from None
        return Handout(
            name=d.name,
            domid=domid,
            dispid=d.dispid,
            template=d.template,
            origin=d.origin,
            paused=paused,
            waited_ms=(loop.time() - started) * 1000,
        )

    async def release(self, name: str) -> None:
        """Destroy a handed-out disposable and free its name. Raises :class:`NotFound`."""
        d = self.books.get(name)
        if d is None or d.stage not in HANDED_OUT:
            raise NotFound(f"{name} is not a handed-out disposable")
        self._end(d, Event.RELEASE, "released")
        if d.destroying is not None:
            await asyncio.shield(d.destroying)

    async def _obtain(self, names: Sequence[str], paused: bool) -> tuple[Disposable, int]:
        for origin in self.origins:
            while (d := origin.claim(names)) is not None:
                problem = await self._hand_over(d, paused, origin.patience())
                if problem is None and d.domid is not None:
                    return d, d.domid
                if origin.last_resort:
                    raise _request_error(problem)
                self._log.info("%s could not be handed out (%s); trying another", d.name, problem)
                if not origin.repeat:
                    break
        # The last origin always claims; reaching here means the table of origins is wrong.
        raise StartFailed("no origin could make a disposable")

    async def _hand_over(
        self, d: Disposable, paused: bool, patience: float | None
    ) -> BaseException | None:
        """Wait until ``d`` is ready, then hand it over running or paused. Returns None
        when it is the caller's now, else why not (``d`` is then discarded, whatever cut
        the request short, its timeout included)."""
        try:
            if patience is None or d.ready.done():
                await asyncio.shield(d.ready)
            else:
                try:
                    await asyncio.wait_for(asyncio.shield(d.ready), patience)
                except TimeoutError:
                    self._abandon(d)
                    return StartFailed(f"{d.name} was not ready after {patience:g} s")
            if d.stage is not Stage.REQUESTED:
                return StartFailed(f"{d.name} is {d.stage.value}")
            if paused and not d.paused:
                await self._backend.pause(d.name)
                d.paused = True
                self._memory.exclude(d.name)
            elif not paused and d.paused:
                await self._backend.unpause(d.name)
                d.paused = False
        except NotPaused:
            d.paused = False
            if d.stage is Stage.REQUESTED:
                self._taint(d)
            return StartFailed(f"{d.name} was unpaused by someone else")
        except (*PORT_ERRORS, DispooldError) as exc:
            self._abandon(d)
            return exc
        except BaseException:
            self._abandon(d)
            raise
        if not d.at(Stage.REQUESTED):  # something happened during the (un)pause
            return StartFailed(f"{d.name} became {d.stage.value}")
        if paused:
            self.books.move(d, Event.HAND_OUT_PAUSED)
        else:
            self.books.move(d, Event.HAND_OUT)
            self._memory.include(d.name)
            self.bus.publish("used", {"name": d.name, "template": d.template})
        return None

    def _abandon(self, d: Disposable) -> None:
        if d.stage is Stage.REQUESTED:
            self._end(d, Event.DISCARD, "its request was abandoned")

    # == what the origins use ===========================================================

    def fingerprint_of(self, template: str) -> str | None:
        queue = self._queues.get(template)
        return None if queue is None else queue.fingerprint

    def is_current(self, d: Disposable) -> bool:
        """``d`` was made from its template as it is now (not outdated)."""
        queue = self._queues.get(d.template)
        return queue is not None and d.fingerprint == queue.fingerprint

    def take(self, d: Disposable) -> None:
        """A request takes ``d`` from the pool (no await: nobody else can take it)."""
        was = d.stage
        self.books.move(d, Event.REQUEST)
        if was is Stage.SHRINKING and d.waiting is not None:
            d.waiting.cancel()  # the caller wants it now, not smaller
        self._publish_requested(d)
        self._refill_after_use(self._queues[d.template])

    def start_for_request(self, template: str, origin: OriginName) -> Disposable:
        """A new disposable of ``template``, requested before it exists, and its
        bring-up (create and boot, no pause). Raises :class:`DispidsExhausted`."""
        queue = self._queues[template]
        d = self._new_disposable(queue, origin)
        if origin == "restore":
            d.build = Build.RESTORE
        self.books.move(d, Event.REQUEST)
        self._publish_requested(d)
        d.bring_up = self._spawn(
            self._bring_up(d, queue, (self._create, self._boot)), f"{origin} start {d.name}"
        )
        return d

    def _publish_requested(self, d: Disposable) -> None:
        self.bus.publish("requested", {"name": d.name, "template": d.template, "origin": d.origin})

    def _taint(self, d: Disposable) -> None:
        """``d`` was unpaused by someone other than its request: it leaves the pool for
        good, is never handed out, and is left running for whoever is using it."""
        self.books.move(d, Event.UNPAUSE)
        d.paused = False
        self._memory.include(d.name)
        self._log.warning("%s was unpaused without a request: tainted", d.name)
        self.bus.publish("tainted", {"name": d.name, "template": d.template})
        if (queue := self._queues.get(d.template)) is not None:
            self._refill_after_use(queue)

    # == filling ========================================================================

    def effective_max(self, template: str) -> int:
        """How many preloads ``template`` should have (see :meth:`Limits.maximum`)."""
        return self.limits.maximum(template)

    def threshold_mib(self) -> int:
        return self.limits.threshold_mib()

    def _templates_wanting(self) -> int:
        return sum(1 for name in self._queues if self.effective_max(name) > 0)

    def _schedule_fill(self, queue: Queue, delay: float = 0.0) -> None:
        """Fill ``queue`` in ``delay`` seconds, unless a fill is due sooner anyway."""
        if self._stopping:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + max(0.0, delay)
        if queue.timer is not None:
            if queue.timer.when() <= when:
                return
            queue.timer.cancel()
        queue.timer = loop.call_at(when, self._start_fill, queue)

    def _start_fill(self, queue: Queue) -> None:
        queue.timer = None
        self._spawn(self._fill(queue), f"fill {queue.name}")

    def _cancel_timer(self, queue: Queue) -> None:
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None

    def _refill_after_use(self, queue: Queue) -> None:
        delay = self.config.pool.refill_delay
        if delay < 0:
            # Negative delay: no refill while the template still has preloads.
            if self.books.members(queue.name):
                return
            delay = 0.0
        self._schedule_fill(queue, delay)

    async def _fill(self, queue: Queue) -> None:
        """Start or remove preloads until ``queue`` holds as many as it should, within
        the memory the threshold leaves free. Fills are serialized, so the memory the
        ones already decided will take is counted (``_pending_mib``) by the next."""
        async with self._fill_lock:
            if self._stopping or self._queues.get(queue.name) is not queue:
                return
            members = self.books.members(queue.name)
            wanted = 0 if self._suspended else self.effective_max(queue.name)
            if len(members) > wanted:
                members.sort(key=lambda d: (_TRIM_ORDER[d.stage], -d.since))
                for d in members[: len(members) - wanted]:
                    self._end(d, Event.DISCARD, "above the maximum")
                self._set_gap(queue, 0)
                return
            need = wanted - len(members)
            if need == 0 or not queue.settled:
                self._set_gap(queue, 0)
                return
            now = asyncio.get_running_loop().time()
            if queue.retry_at > now:
                self._schedule_fill(queue, queue.retry_at - now)
                return
            threshold = self.threshold_mib()
            try:
                available = await self._memory.available_mib()
            except MemoryManagerError as exc:
                self._log.warning("cannot learn the free memory (%s); retrying", exc)
                self._set_gap(queue, need, None, threshold)
                return
            if self._stopping or self._suspended:
                return
            usable = max(0, available - threshold - self._pending_mib)
            can = min(need, usable // queue.settings.memory)
            self._set_gap(queue, need - can, available, threshold)
            for _ in range(can):
                try:
                    d = self._new_disposable(queue, "preload")
                except DispidsExhausted as exc:
                    self._log.error("%s: %s", queue.name, exc)
                    self._set_gap(queue, queue.gap + 1, available, threshold)
                    continue
                d.reserved_mib = queue.settings.memory
                self._pending_mib += d.reserved_mib
                if queue.settings.savefile.refill and self.keeper.usable(
                    queue.name, queue.fingerprint
                ):
                    d.build = Build.RESTORE
                steps = (self._create, self._boot, self._shrink, self._pause)
                d.bring_up = self._spawn(self._bring_up(d, queue, steps), f"preload {d.name}")

    def _set_gap(
        self, queue: Queue, gap: int, available: int | None = None, threshold: int | None = None
    ) -> None:
        if gap > 0:
            if gap != queue.gap:
                self._log.info(
                    "%s: %d preload(s) short: %s MiB free, %s MiB kept free",
                    queue.name,
                    gap,
                    "?" if available is None else available,
                    threshold,
                )
                self.bus.publish(
                    "gap",
                    {
                        "template": queue.name,
                        "missing": gap,
                        "available_mib": available,
                        "threshold_mib": threshold,
                    },
                )
            self._schedule_fill(queue, self.config.pool.gap_retry_interval)
        queue.gap = gap

    def _new_disposable(self, queue: Queue, origin: OriginName) -> Disposable:
        """A new disposable in the books and the journal, before its domain exists."""
        dispid = self._journal.allocate_dispid(
            self.config.pool.dispid_quarantine_days * 86400, exclude=self.books.dispids()
        )
        return self.books.open(dispid, queue.name, queue.fingerprint, origin)

    # == savefiles ======================================================================

    def _savefile_templates(self, config: Config) -> list[str]:
        if not isinstance(self._backend, SaveRestore):
            return []
        return [n for n, t in config.templates.items() if t.savefile.enabled and t.dispvm_template]

    def _want_savefile(self, queue: Queue, delay: float = 0.0) -> None:
        """Make the template's savefile (in ``delay`` seconds) if it needs one: none,
        or an invalid one, and nobody making it. Never in a request's way."""
        sf = self.keeper.savefiles.get(queue.name)
        if sf is None or self._stopping or sf.state in (State.READY, State.PREPARING):
            return
        if queue.timer_savefile is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(delay, sf.retry_at - loop.time(), 0.0)
        queue.timer_savefile = loop.call_later(delay, self._start_prepare, queue)

    def _start_prepare(self, queue: Queue) -> None:
        queue.timer_savefile = None
        sf = self.keeper.savefiles.get(queue.name)
        if (
            sf is None
            or self._stopping
            or self._suspended
            or self._queues.get(queue.name) is not queue
            or sf.state in (State.READY, State.PREPARING)
        ):
            return
        if not queue.settled:
            return  # the template's files are still changing: the settle retries
        sf.state, sf.started_at = State.PREPARING, self._now()
        self._spawn(self._prepare(queue, sf.description is not None), f"savefile {queue.name}")

    async def _prepare(self, queue: Queue, stale: bool) -> None:
        """Discard what is left of an old savefile, then boot a domain to be saved."""
        sf = self.keeper.savefiles[queue.name]
        if stale:
            try:
                await self.keeper.discard(sf)
            except (StorageError, SavefileError) as exc:
                self.keeper.failed(queue.name, f"the old savefile stays: {exc}", 60.0, _loop_time())
                self._want_savefile(queue, 60.0)
                return
        try:
            d = self._new_disposable(queue, "prepare")
        except DispidsExhausted as exc:
            self.keeper.failed(queue.name, str(exc), self._backoff(sf.failures + 1), _loop_time())
            self._want_savefile(queue)
            return
        d.build = Build.SAVE
        self.bus.publish("savefile-preparing", {"template": queue.name, "name": d.name})
        self._log.info("%s: preparing the savefile of %s", d.name, queue.name)
        steps = (self._create, self._boot, self._shrink, self._save)
        d.bring_up = asyncio.current_task()
        await self._bring_up(d, queue, steps)

    # == bringing a disposable up =======================================================

    async def _bring_up(self, d: Disposable, queue: Queue, steps: Sequence[Step]) -> None:
        """Run ``steps`` with a checkpoint after each, then act on the outcome: ``d`` is
        ready (paused in the pool, or running for the request that took it), or it is
        destroyed, or left to whoever unpaused it."""
        slot = (
            self._start_slots.taken(d.template)
            if d.origin == "preload"
            else contextlib.nullcontext()
        )
        failure: BaseException | None = None
        outcome = Outcome.GO
        try:
            async with slot:
                outcome = self._checkpoint(d)
                for step in steps:
                    if outcome is not Outcome.GO:
                        break
                    outcome = await step(d, queue)
                    if outcome is Outcome.GO:
                        outcome = self._checkpoint(d)
        except PORT_ERRORS as exc:
            failure = exc
        finally:
            self._release_reservation(d)
        if failure is None and outcome is Outcome.DIED:
            failure = StartFailed(f"{d.name}: the domain died while starting")
        await self._conclude(d, queue, outcome, failure)

    def _checkpoint(self, d: Disposable) -> Outcome:
        """What happened to ``d`` while the bring-up waited."""
        if d.name in self._died:
            return Outcome.DIED
        if d.stage is Stage.DESTROYING:
            return Outcome.DISCARDED
        if d.stage is Stage.TAINTED:
            return Outcome.TAINTED
        return Outcome.GO

    async def _conclude(
        self, d: Disposable, queue: Queue, outcome: Outcome, failure: BaseException | None
    ) -> None:
        self._died.discard(d.name)
        if d.origin == "prepare" and failure is None:
            sf = self.keeper.savefiles.get(d.template)
            if sf is not None and sf.state is State.PREPARING:  # cut short before the save
                sf.state = State.ABSENT
                self._want_savefile(queue)
        if failure is not None:
            await self._failed(d, queue, failure)
        elif outcome is Outcome.GO:
            d.settle()
        elif outcome is Outcome.DISCARDED:
            d.settle(StartFailed(f"{d.name} was discarded"))
            await self._destroy(d)
        elif outcome is Outcome.TAINTED:
            d.settle(StartFailed(f"{d.name} was unpaused by someone else"))
        elif outcome is Outcome.NO_ROOM:
            d.settle(StartFailed(f"{d.name}: not started, the memory threshold was reached"))
            self.books.move(d, Event.DISCARD)
            await self._destroy(d)
            self._schedule_fill(queue, self.config.pool.gap_retry_interval)

    async def _create(self, d: Disposable, queue: Queue) -> Outcome:
        """Make the disposable's volumes, then create its domain within a memory
        allocation. A preload is checked against the threshold once more at the last
        moment, inside the allocation (which admits one creation at a time): a fresh start
        may have taken memory since the fill."""
        settings = queue.settings
        instance = self.config.daemon.instance
        marker = Marker(owner=instance, template=d.template, dispid=d.dispid)
        saved: Description | None = None
        if d.build is Build.RESTORE:
            saved = await self.keeper.verified(d.template)
            disks = await self._restore_volumes(d, saved)
        else:
            disks = await self._make_volumes(d, settings)
        if (outcome := self._checkpoint(d)) is not Outcome.GO:
            return outcome
        provision = Provision(
            disks,
            identity.identity(d.name, settings, instance, d.dispid),
            save_request=d.build is Build.SAVE,
            prerun=await self._prerun(settings) if d.build is Build.SAVE else None,
        )
        try:
            async with self._memory.allocation(d.name, settings.memory):
                if d.origin == "preload":
                    available = await self._memory.available_mib()
                    if available - self._pending_mib < self.threshold_mib():
                        self._log.info(
                            "%s: not started: %d MiB free would cross the threshold",
                            d.name,
                            available,
                        )
                        return Outcome.NO_ROOM
                # Not cancellable halfway: a cancelled caller leaves the creation running
                # and the next start finds the domain through the journal.
                if saved is not None:
                    d.domid = await asyncio.shield(
                        self._restore(d, settings, marker, provision, saved)
                    )
                else:
                    create = self._backend.create(d.name, settings, marker, provision)
                    d.domid = await asyncio.shield(create)
        except HostOutOfMemory as exc:
            if d.origin == "preload":
                self._log.info("%s: not started: %s", d.name, exc)
                return Outcome.NO_ROOM
            raise
        finally:
            self._release_reservation(d)
        d.memory_mib = settings.memory
        self.books.save(d)
        return Outcome.GO

    async def _make_volumes(self, d: Disposable, settings: TemplateSettings) -> tuple[Disk, ...]:
        """The disposable's own writable volumes, each recorded before it is made (so
        that recovery finds it whatever happens next). Raises
        :class:`~dispoold.storage.StorageError`: the volumes made so far are the
        destroy's to remove."""
        disks = []
        for planned, volume in self._storage.plan(d.name, settings):
            self._journal.add_volume(d.name, planned)
            d.volumes.append(planned)
            path = await self._storage.make(planned, volume)
            disks.append(Disk(volume.vdev, path, writable=True))
        return tuple(disks)

    async def _restore_volumes(self, d: Disposable, saved: Description) -> tuple[Disk, ...]:
        """Snapshots of the volumes saved with the savefile, recorded before they are
        made. A failure is the savefile's (:class:`SavefileError`)."""
        disks = []
        for kept in saved.volumes:
            planned = Planned(kept.pool, self._storage.name_for(d.name, kept.vdev), kept.vdev)
            self._journal.add_volume(d.name, planned)
            d.volumes.append(planned)
            try:
                path = await self._storage.clone_from(planned, kept.planned())
            except StorageError as exc:
                raise SavefileError(f"the savefile's volume {kept.name}: {exc}") from None
            disks.append(Disk(kept.vdev, path, writable=True))
        return tuple(disks)

    async def _restore(
        self,
        d: Disposable,
        settings: TemplateSettings,
        marker: Marker,
        provision: Provision,
        saved: Description,
    ) -> int:
        if not isinstance(self._backend, SaveRestore):  # pragma: no cover - never claimed
            raise SavefileError("the backend cannot restore")
        try:
            return await self._backend.restore(
                d.name,
                settings,
                marker,
                provision,
                path=self.keeper.store.image(d.template),
                memory_mib=saved.memory_mib,
            )
        except BackendError as exc:
            raise SavefileError(f"restore from the savefile of {d.template}: {exc}") from None

    async def _prerun(self, settings: TemplateSettings) -> str | None:
        path = settings.savefile.prerun
        if path is None:
            return None
        try:
            script = await asyncio.to_thread(path.read_text)
        except (OSError, UnicodeDecodeError) as exc:
            raise SavefileError(f"prerun script {path}: {exc}") from None
        if len(script.encode()) > MAX_PRERUN_BYTES:
            raise SavefileError(
                f"prerun script {path} is over {MAX_PRERUN_BYTES} bytes (a guest reads it"
                " from xenstore, docs/guest.md)"
            )
        return script

    async def _boot(self, d: Disposable, queue: Queue) -> Outcome:
        """Wait until the guest reports readiness (or, booted to be saved, that it is
        prepared for the save)."""
        self.books.move(d, Event.START)
        if d.origin == "preload":
            self.bus.publish("preload-started", {"name": d.name, "template": d.template})
        if (outcome := self._checkpoint(d)) is not Outcome.GO:
            return outcome
        if d.build is Build.SAVE and isinstance(self._backend, SaveRestore):
            wait: Coroutine[Any, Any, object] = self._backend.wait_prepared(
                d.name, self.config.savefile.prepare_timeout
            )
        else:
            wait = self._backend.wait_ready(d.name, self.config.pool.startup_timeout)
        cut, _ = await self._wait_on(d, wait)
        # Looked at even when the wait ended by itself: a discard may have landed in the
        # same turn of the loop as the guest's readiness, too late to cut the wait.
        if (outcome := self._checkpoint(d)) is not Outcome.GO:
            return outcome
        if cut:  # cut short by nobody the engine knows of
            raise BackendError("start", d.name, "the boot wait was interrupted")
        self.books.move(d, Event.READY)
        return Outcome.GO

    async def _shrink(self, d: Disposable, queue: Queue) -> Outcome:
        """Shrink to the preferred size; a failure is noted, and the pause still happens.
        A request arriving meanwhile cuts the shrink short: it gets the preload now."""
        if d.stage is not Stage.SHRINKING:
            return Outcome.GO  # taken during startup: no shrink, no pause
        try:
            cut, result = await self._wait_on(d, self._memory.shrink(d.name))
        except MemoryManagerError as exc:
            if (outcome := self._checkpoint(d)) is not Outcome.GO:
                return outcome
            d.note = f"shrink failed: {exc}"
            self._log.warning("%s: %s; pausing anyway", d.name, d.note)
            return Outcome.GO
        if cut or result is None:
            return self._checkpoint(d)
        d.memory_mib = result.actual_mib
        if not result.converged:
            d.note = f"memory at {result.actual_mib} MiB, target {result.target_mib} MiB"
        return Outcome.GO

    async def _pause(self, d: Disposable, queue: Queue) -> Outcome:
        """Pause the ready preload: it is in the pool now."""
        if d.stage is not Stage.SHRINKING:
            return Outcome.GO  # a request took it during the shrink: it runs on
        await self._backend.pause(d.name)
        d.paused = True
        self._memory.exclude(d.name)
        if (outcome := self._checkpoint(d)) is not Outcome.GO:
            return outcome
        if d.stage is Stage.SHRINKING:
            self.books.move(d, Event.PAUSED)
            queue.failures = 0
            self.bus.publish(
                "preload-ready",
                {"name": d.name, "template": d.template, "memory_mib": d.memory_mib},
            )
        return Outcome.GO

    async def _save(self, d: Disposable, queue: Queue) -> Outcome:
        """Save the prepared, shrunk domain as the template's savefile, keep its volumes
        beside it, and make it usable (image first, description last). The domain,
        shut down by the save, is then destroyed like a discarded preload."""
        if d.stage is not Stage.SHRINKING or not isinstance(self._backend, SaveRestore):
            return Outcome.GO
        store = self.keeper.store
        temporary = store.temporary(d.template)
        await asyncio.to_thread(temporary.unlink, missing_ok=True)
        await self._backend.save(d.name, temporary)
        if (outcome := self._checkpoint(d)) is not Outcome.GO:
            await asyncio.to_thread(temporary.unlink, missing_ok=True)
            return outcome
        digest, size = await store.checksum(temporary)
        sf = self.keeper.savefiles[d.template]
        old = sf.description
        if old is not None:
            await self.keeper.discard(sf)
        kept = await self.keeper.preserve(d.template, d.volumes, self.config.daemon.instance)
        d.volumes.clear()
        described = Description(
            template=d.template,
            fingerprint=d.fingerprint,
            memory_mib=d.memory_mib or queue.settings.memory,
            maxmem_mib=queue.settings.max_memory,
            vcpus=queue.settings.vcpus,
            image=store.image(d.template).name,
            size=size,
            sha256=digest,
            volumes=tuple(SavedVolume(vdev=v.vdev, pool=v.pool, name=v.name) for v in kept),
            made_at=self._now(),
            seconds=self._now() - (sf.started_at or self._now()),
        )
        sf.verified = await store.complete(described)
        sf.description, sf.state, sf.error, sf.failures = described, State.READY, None, 0
        self._log.info(
            "savefile of %s ready: %.1f MiB, saved at %d MiB",
            d.template,
            size / 2**20,
            described.memory_mib,
        )
        self.bus.publish(
            "savefile-ready",
            {
                "template": d.template,
                "size_mib": round(size / 2**20, 1),
                "memory_mib": described.memory_mib,
            },
        )
        self._end(d, Event.DISCARD, "saved as the savefile")
        # Preloads may be made by restoring now.
        self._schedule_fill(queue)
        return self._checkpoint(d)

    async def _wait_on(self, d: Disposable, coro: Coroutine[Any, Any, T]) -> tuple[bool, T | None]:
        """Await ``coro`` as a wait others may cut short (:meth:`_end`, :meth:`take`,
        a death). Returns ``(True, None)`` when they did; the engine's own cancellation
        of the bring-up still propagates as ``CancelledError``."""
        waiting = asyncio.ensure_future(coro)
        d.waiting = waiting
        try:
            return False, await waiting
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if waiting.cancelled() and (current is None or not current.cancelling()):
                return True, None
            raise
        finally:
            d.waiting = None

    async def _failed(self, d: Disposable, queue: Queue, exc: BaseException) -> None:
        """A bring-up failed: nobody waits on ``d`` any longer (Qubes #10928), it is
        destroyed, and a failing template backs off before its next preload."""
        self._log.warning("%s (%s) failed: %s", d.name, d.template, exc)
        d.settle(exc)
        if d.stage in HANDED_OUT:
            return  # someone is using it: never destroyed under them
        if d.stage in POOL:
            self.bus.publish(
                "preload-failed", {"name": d.name, "template": d.template, "error": str(exc)}
            )
        if d.stage is not Stage.DESTROYING:
            self.books.move(d, Event.FAIL)
        now = asyncio.get_running_loop().time()
        if d.origin == "preload":
            queue.failures += 1
            queue.retry_at = now + self._backoff(queue.failures)
        if d.origin == "prepare" and (sf := self.keeper.savefiles.get(d.template)) is not None:
            self.keeper.failed(d.template, str(exc), self._backoff(sf.failures + 1), now)
        elif d.build is Build.RESTORE and not isinstance(exc, HostOutOfMemory):
            # The saved domain did not come back: its savefile is not to be trusted.
            self.keeper.invalidate(d.template, f"a restore failed: {exc}")
        await self._destroy(d, f"failed: {exc}")
        if (
            sf := self.keeper.savefiles.get(d.template)
        ) is not None and sf.state is not State.READY:
            self._want_savefile(queue, max(0.0, sf.retry_at - asyncio.get_running_loop().time()))

    def _backoff(self, failures: int) -> float:
        base = self.config.pool.failure_backoff
        return float(min(base * 2 ** (failures - 1), self.config.pool.failure_backoff_max))

    def _release_reservation(self, d: Disposable) -> None:
        self._pending_mib -= d.reserved_mib
        d.reserved_mib = 0

    # == ending a disposable ============================================================

    def _end(self, d: Disposable, event: Event, reason: str) -> None:
        """Move ``d`` towards destruction (``event`` says why) and make sure it happens."""
        was = d.stage
        self.books.move(d, event)
        if was is Stage.DESTROYING:
            return
        self._log.info("%s (%s): %s", d.name, was.value, reason)
        d.settle(StartFailed(f"{d.name}: {reason}"))
        if d.bring_up is not None and not d.bring_up.done():
            if d.waiting is not None:
                d.waiting.cancel()
            return  # the bring-up destroys it as soon as its current step ends
        self._spawn_destroy(d, reason, refill=was in POOL)

    def _spawn_destroy(self, d: Disposable, reason: str, *, refill: bool) -> None:
        d.destroying = self._spawn(self._destroy(d, reason, refill=refill), f"destroy {d.name}")

    async def _destroy(
        self, d: Disposable, reason: str = "discarded", *, refill: bool = True
    ) -> None:
        """Destroy the domain of ``d`` (now ``destroying``), then drop it from the books.

        ``refill``: ``d`` was a pool member, so its template may be short of one now.
        """
        self._memory.exclude(d.name)  # no memory for a domain on its way out
        while d.domid is not None:  # no domid: its creation failed, and left nothing
            try:
                await self._backend.destroy(d.name)
                break
            except BackendError as exc:
                if self._stopping:
                    self._log.error("%s: %s; the next start retries", d.name, exc)
                    return
                self._log.error("%s: %s; retrying in %g s", d.name, exc, DESTROY_RETRY)
                await asyncio.sleep(DESTROY_RETRY)
        d.domid = None
        while d.volumes:  # only once the domain is gone: it no longer writes to them
            volume = d.volumes[-1]
            try:
                await self._storage.remove(volume)
            except StorageError as exc:
                if self._stopping:
                    self._log.error("%s: %s; the next start retries", d.name, exc)
                    return
                self._log.error("%s: %s; retrying in %g s", d.name, exc, DESTROY_RETRY)
                await asyncio.sleep(DESTROY_RETRY)
                continue
            self._journal.remove_volume(volume)
            d.volumes.pop()
        self._memory.forget(d.name)
        self.books.move(d, Event.DESTROYED)
        self.bus.publish("removed", {"name": d.name, "template": d.template, "reason": reason})
        # Memory came free: templates short of it may fill now.
        for queue in self._queues.values():
            if queue.gap > 0 or (refill and queue.name == d.template):
                self._schedule_fill(queue)

    # == what happens behind the engine's back ==========================================

    async def _watch_backend(self) -> None:
        async for event in self._backend.events():
            d = self.books.get(event.name)
            if d is None:
                continue
            if event.kind is DomainEventKind.DIED:
                self._on_death(d)
            else:
                self._on_unpause(d)
        if not self._stopping:
            raise BackendError("events", None, "the backend's event stream ended")

    def _on_death(self, d: Disposable) -> None:
        if d.stage is Stage.DESTROYING:
            return
        if d.bring_up is not None and not d.bring_up.done():
            # Dying while being brought up is a failed start (the template backs off),
            # not a discard: the bring-up learns it at its next checkpoint.
            self._log.warning("%s died while starting", d.name)
            self._died.add(d.name)
            if d.waiting is not None:
                d.waiting.cancel()
            return
        if d.stage in POOL:
            self._log.warning("preload %s died", d.name)
        self._end(d, Event.DIE, "the domain died")

    def _on_unpause(self, d: Disposable) -> None:
        if d.stage in (Stage.PAUSED, Stage.SHRINKING, Stage.REQUESTED):
            # In the pool, or taken by a request that has not handed it over yet (that
            # request moves on to another).
            self._taint(d)
        elif d.stage is Stage.HANDED_PAUSED:
            # Handed out paused; the caller's unpause is the use.
            self.books.move(d, Event.UNPAUSE)
            d.paused = False
            self._memory.include(d.name)
            self.bus.publish("used", {"name": d.name, "template": d.template})
            if (queue := self._queues.get(d.template)) is not None:
                self._refill_after_use(queue)
        else:
            self.books.move(d, Event.UNPAUSE)

    async def _watch_templates(self) -> None:
        """Notice template files changing on disk: outdated preloads are discarded at
        once; new ones start once the files have stopped changing for one interval."""
        while True:
            await asyncio.sleep(self.config.pool.refresh_check_interval)
            for queue in list(self._queues.values()):
                files = await asyncio.to_thread(queue.settings.file_states)
                fingerprint = await asyncio.to_thread(
                    queue.settings.fingerprint, self._storage.identify
                )
                self._fingerprint_seen(queue, fingerprint, files)
            await self._measure_volumes()

    async def _measure_volumes(self) -> None:
        volumes = [v for d in self.books for v in d.volumes]
        if volumes:
            self._volume_usage = await self._storage.usage(volumes)

    def notice_changes(self, templates: Sequence[str]) -> None:
        """Before a request takes a preload: have the templates' files changed since the
        last look? (Qubes checks at request time; the full fingerprint, volumes
        included, is taken every ``refresh_check_interval``.) A stat per file."""
        for name in templates:
            queue = self._queues.get(name)
            if queue is not None and queue.settings.file_states() != queue.files:
                self._fingerprint_seen(queue, "changed since the last look", queue.files)

    def _fingerprint_seen(self, queue: Queue, fingerprint: str, files: tuple[str, ...]) -> None:
        if self._queues.get(queue.name) is not queue:
            return
        queue.files = files
        if fingerprint != queue.fingerprint:
            queue.fingerprint = fingerprint
            queue.settled = False
            self._refresh(queue, "the template's files changed")
        elif not queue.settled:
            queue.settled = True
            self._schedule_fill(queue)
            self._want_savefile(queue)

    # == operator's controls ============================================================

    async def set_max(self, template: str | None, value: int | None) -> None:
        """Set (or, with None, drop) the run-time override of a template's maximum, or of
        the global one (``template`` None). The configuration's value applies without one."""
        if template is None:
            affected = self.config.pool.default_dispvm
        elif not self._queue(template).settings.dispvm_template:
            raise NotADispvmTemplate(f"{template} is not a disposable template")
        else:
            affected = template
        self.limits.set_max(template, value)
        if affected is not None and (queue := self._queues.get(affected)) is not None:
            self._schedule_fill(queue)
        await self._start_slots.wake()  # how many templates want preloads may have changed

    async def set_threshold(self, mib: int | None) -> None:
        """Set (or drop) the run-time override of the free-memory threshold."""
        self.limits.set_threshold(mib)
        for queue in self._queues.values():
            self._schedule_fill(queue)

    async def refresh(self, template: str) -> None:
        """Discard the template's preloads and make new ones (it was updated)."""
        self._refresh(self._queue(template), "refresh requested")

    def _refresh(self, queue: Queue, reason: str) -> None:
        members = self.books.members(queue.name)
        for d in members:
            self._end(d, Event.DISCARD, reason)
        for d in self.books.in_stage(*POOL):
            if d.template == queue.name and d.origin == "prepare":
                self._end(d, Event.DISCARD, reason)  # it would save the old template
        self.keeper.invalidate(queue.name, reason)
        self.bus.publish(
            "refreshed", {"template": queue.name, "reason": reason, "discarded": len(members)}
        )
        self._schedule_fill(queue)

    async def suspend(self) -> None:
        """Before host suspend: destroy every preload and stop refilling."""
        self._suspended = True
        for queue in self._queues.values():
            self._cancel_timer(queue)
        for d in self.books.in_stage(*POOL):
            self._end(d, Event.DISCARD, "host suspend")
        work = [
            t
            for d in self.books.in_stage(Stage.DESTROYING)
            for t in (d.bring_up, d.destroying)
            if t is not None and not t.done()
        ]
        if work:
            _, pending = await asyncio.wait(work, timeout=SUSPEND_TIMEOUT)
            if pending:
                self._log.warning("%d preload(s) still being destroyed at suspend", len(pending))

    async def resume(self) -> None:
        """After host resume: refill."""
        self._suspended = False
        for queue in self._queues.values():
            self._schedule_fill(queue)
            self._want_savefile(queue)

    async def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration: new templates fill, removed ones lose their
        preloads, changed definitions are refreshed, changed limits apply."""
        old = self.config
        self.config = config
        self.limits.reconfigure(config)
        if config.pool.max_concurrent_starts != old.pool.max_concurrent_starts:
            self._start_slots = StartSlots(
                config.pool.max_concurrent_starts, self._templates_wanting
            )
        for name in old.templates.keys() - config.templates.keys():
            queue = self._queues.pop(name)
            self._cancel_timer(queue)
            for d in self.books.members(name):
                self._end(d, Event.DISCARD, "template removed from the configuration")
        for name, settings in config.templates.items():
            fingerprint = await asyncio.to_thread(settings.fingerprint, self._storage.identify)
            files = await asyncio.to_thread(settings.file_states)
            current = self._queues.get(name)
            if current is None:
                self._queues[name] = Queue(name, settings, fingerprint, files)
            elif settings != current.settings or fingerprint != current.fingerprint:
                current.settings = settings
                current.fingerprint = fingerprint
                current.files = files
                self._refresh(current, "template definition changed")
        for gone in self.keeper.configure(self._savefile_templates(config)):
            self._spawn(self._drop_savefile(gone.template), f"drop savefile {gone.template}")
        for queue in self._queues.values():
            self._schedule_fill(queue)
            self._want_savefile(queue)

    async def _drop_savefile(self, template: str) -> None:
        sf = Savefile(template, description=await self.keeper.store.load(template))
        try:
            await self.keeper.discard(sf)
        except (StorageError, SavefileError) as exc:
            self._log.warning("savefile of %s (no longer enabled) stays: %s", template, exc)

    def _queue(self, template: str) -> Queue:
        queue = self._queues.get(template)
        if queue is None:
            raise NoSuchTemplate(f"no template named {template!r}")
        return queue

    # == status =========================================================================

    def status(self, template: str | None = None) -> PoolView:
        """Every template's pool (or one template's), and the memory figures."""
        if template is not None:
            self._queue(template)
            names = [template]
        else:
            names = sorted(self._queues.keys() | self.books.templates())
        members: dict[str, list[Disposable]] = {name: [] for name in names}
        for d in self.books:
            if d.template in members:
                members[d.template].append(d)
        return PoolView(
            templates=[
                TemplateView(
                    name=name,
                    max=self.effective_max(name),
                    threshold_gap=queue.gap if (queue := self._queues.get(name)) else 0,
                    disposables=[d.view() for d in sorted(members[name], key=lambda d: d.since)],
                    volumes=self._volume_views(queue, members[name]),
                    savefile=sf.view(self._now())
                    if (sf := self.keeper.savefiles.get(name)) is not None
                    else SavefileView(state="absent"),
                )
                for name in names
            ],
            memory={**self._memory.status(), "threshold_mib": self.threshold_mib()},
            process=process.figures(),
            hypervisor=self._hypervisor,
        )

    def _volume_views(self, queue: Queue | None, members: list[Disposable]) -> list[VolumeView]:
        if queue is None:
            return []
        views = []
        for volume in queue.settings.volumes:
            pool = queue.settings.pool_of(volume)
            used = [
                self._volume_usage[v.name]
                for d in members
                for v in d.volumes
                if v.vdev == volume.vdev and v.name in self._volume_usage
            ]
            views.append(
                VolumeView(
                    vdev=volume.vdev,
                    role=volume.role,
                    pool=pool,
                    driver=None if pool is None else self._storage.driver_name(pool),
                    used_mib=round(sum(used), 1) if used else None,
                )
            )
        return views

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        preloaded = len(self.books.in_stage(Stage.PAUSED))
        starting = len(self.books.in_stage(*POOL)) - preloaded
        handed_out = len(self.books.in_stage(Stage.REQUESTED, *HANDED_OUT))
        wanted = sum(self.effective_max(name) for name in self._queues)
        gap = sum(queue.gap for queue in self._queues.values())
        line = f"{preloaded}/{wanted} preloaded, {starting} starting, {handed_out} handed out"
        if gap:
            line += f", {gap} short of memory"
        if self._suspended:
            line += ", suspended"
        return line

    # == tasks ==========================================================================

    def _spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._log.critical("engine task %r failed", task.get_name(), exc_info=exc)
            if not self.fatal.done():
                self.fatal.set_exception(exc)

    # == restart recovery ===============================================================

    async def _recover(self) -> None:
        """Carry out :func:`dispoold.recovery.plan` for the journal's records and the
        domains carrying this daemon's marker."""
        found = await self._backend.list_owned(self.config.daemon.instance)
        fingerprints = {
            name: queue.fingerprint
            for name, queue in self._queues.items()
            if queue.settings.dispvm_template
        }
        decisions, strays = plan(self._journal.records(), found, fingerprints)
        volumes = self._journal.volumes()
        for decision in decisions:
            record, info = decision.record, decision.domain
            d = Disposable(
                name=record.name,
                dispid=record.dispid,
                template=record.template,
                fingerprint=record.fingerprint,
                origin=_origin(record.origin),
                stage=record.stage,
                since=record.since,
                domid=record.domid,
            )
            self.books.adopt(d)
            if info is None:
                # Its volumes, if it had any, are left to the sweep (Qubes #11086).
                self._log.info("%s: %s", d.name, decision.reason)
                self.books.forget(d)
                continue
            d.volumes = volumes.pop(record.name, [])
            d.domid, d.paused, d.memory_mib = info.domid, info.paused, info.memory_mib
            self._apply(d, decision.fate, decision.reason)
        for stray in strays:
            await self._adopt_stray(stray.domain, stray.track)
        await self._sweep_volumes(volumes)

    async def _sweep_volumes(self, unowned: dict[str, list[Planned]]) -> None:
        """Remove this daemon's volumes that belong to no disposable in the books: the
        journal's records of volumes whose disposable is gone, and volumes no record
        names (the journal was lost, or a crash fell between a removal and its record)."""
        known = {d.name for d in self.books} | self.keeper.known_owners()
        leftovers = [v for o, vs in unowned.items() if o not in known for v in vs]
        try:
            found = await self._storage.leftovers(known)
        except StorageError as exc:
            self._log.warning("cannot look for left-over volumes: %s", exc)
            found = []
        seen = {(v.pool, v.name) for v in leftovers}
        leftovers += [v for v in found if (v.pool, v.name) not in seen]
        for volume in leftovers:
            try:
                await self._storage.remove(volume)
            except StorageError as exc:
                self._log.warning("left-over volume %s stays: %s", volume.name, exc)
                continue
            self._journal.remove_volume(volume)
            self._log.info("left-over volume %s (%s) removed", volume.name, volume.pool)

    def _apply(self, d: Disposable, fate: Fate, reason: str) -> None:
        match fate:
            case Fate.READOPT:
                self._memory.exclude(d.name)
                d.settle()
                self._log.info("%s: %s (%s)", d.name, reason, d.template)
            case Fate.TAINT:
                self._taint(d)
            case Fate.DISCARD:
                self._end(d, Event.DISCARD, reason)
            case Fate.DESTROY:
                self._log.info("%s (%s): %s", d.name, d.stage.value, reason)
                if d.stage is not Stage.DESTROYING:
                    self.books.move(d, Event.DIE)
                self._spawn_destroy(d, reason, refill=True)
            case Fate.USED:
                self.books.move(d, Event.UNPAUSE)
                self._memory.include(d.name)
            case Fate.KEEP:
                self._log.info("%s: %s", d.name, reason)
                if d.stage is not Stage.HANDED_PAUSED:
                    self._memory.include(d.name)  # running: it takes part in balancing
            case Fate.DROP:  # pragma: no cover - handled before, without a domain
                self.books.forget(d)

    async def _adopt_stray(self, info: DomainInfo, track: bool) -> None:
        marker = info.marker
        if not track or marker is None:
            self._log.warning("%s: marked as ours but not in the journal; destroying", info.name)
            await self._backend.destroy(info.name)
            return
        d = Disposable(
            name=info.name,
            dispid=marker.dispid,
            template=marker.template,
            fingerprint="",
            origin="preload",
            stage=Stage.USED,
            since=self._now(),
            domid=info.domid,
            memory_mib=info.memory_mib,
        )
        try:
            d.volumes = await self._storage.owned_by(d.name)
        except StorageError as exc:
            self._log.warning("%s: cannot find its volumes: %s", d.name, exc)
        self.books.adopt(d)
        for volume in d.volumes:
            self._journal.add_volume(d.name, volume)
        self._memory.include(d.name)
        self._log.warning(
            "%s: running, marked as ours but not in the journal; tracked as handed out", d.name
        )


def _origin(recorded: str) -> OriginName:
    for known in ("preload", "restore", "fresh", "prepare"):
        if recorded == known:
            return known
    return "preload"


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


def _request_error(problem: BaseException | None) -> DispooldError:
    """The error a request ends with when its last origin failed, from the engine's own
    family whatever the port raised."""
    match problem:
        case DispooldError():
            return problem
        case HostOutOfMemory():
            return NoMemory(str(problem))
        case None:
            return StartFailed("the disposable was lost before its hand-over")
    return StartFailed(str(problem))
