"""The pool engine: one preload queue per disposable template, with Qubes' semantics.

The engine knows nothing of libxl or sockets. It drives a :class:`~dispoold.backend.Backend`
and a :class:`~dispoold.memory.MemoryManager`, keeps its books in memory and in the
:class:`~dispoold.journal.Journal`, and publishes lifecycle events on an
:class:`~dispoold.events.EventBus`.

How the books are kept:

- Every disposable the engine may have created is in ``_books`` under its name, from
  before its domain is created until after it is destroyed, and its journal record
  follows every stage change (:meth:`Pool._transition` is the only place that changes a
  stage). Where a disposable is (pool, handed out, being destroyed) follows from its
  stage alone, so it can't be in two places.
- Choosing a disposable for a request and marking it ``requested`` happen without an
  ``await`` in between, so two requests never get the same one.
- One task brings each disposable up (create, boot, shrink, pause). Whoever wants a
  disposable gone while that task runs cancels only the step it is waiting on (boot or
  shrink, never the creation) and lets the task destroy the domain itself; otherwise a
  destroy task is spawned. So a domain that is still being created is never forgotten
  (Qubes #11129).
- A background task that fails unexpectedly sets :attr:`Pool.fatal`: the daemon exits
  and the journal brings the next start back to a consistent state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from dispoold import targets
from dispoold.backend import Backend, BackendError, DomainEventKind, DomainInfo, Marker, NotPaused
from dispoold.config import Config, TemplateSettings
from dispoold.errors import (
    BadRequest,
    DispidsExhausted,
    NoSuchTemplate,
    NotADispvmTemplate,
    NotFound,
    RequestTimeout,
    ShuttingDown,
)
from dispoold.events import EventBus
from dispoold.journal import Journal, Record
from dispoold.lifecycle import HANDED_OUT, POOL, Event, Stage, next_stage
from dispoold.memory import MemoryManager, MemoryManagerError, NoMemory

T = TypeVar("T")
Origin = Literal["preload", "fresh"]

GLOBAL_MAX = "max"
THRESHOLD = "threshold"
TEMPLATE_MAX_PREFIX = "max:"
MAX_PRELOAD = 1000

#: A request waits this many startup timeouts, at most, for a preload it took while it
#: was still booting; then it gives up on it and starts a fresh one (as Qubes does).
PRELOAD_WAIT_FACTOR = 1.2
#: Seconds between attempts to destroy a domain the backend failed to destroy.
DESTROY_RETRY = 5.0
#: How long suspend waits for the preloads to be destroyed.
SUSPEND_TIMEOUT = 60.0

#: Which pool member a request takes first: ready ones, then the furthest along.
_TAKE_ORDER = {Stage.PAUSED: 0, Stage.SHRINKING: 1, Stage.STARTUP: 2}
#: Which pool member goes first when the maximum is lowered: the least advanced.
_TRIM_ORDER = {Stage.PRELOAD: 0, Stage.STARTUP: 1, Stage.SHRINKING: 2, Stage.PAUSED: 3}


class _Lost(Exception):
    """The disposable a request took cannot be handed out; the request tries another."""


class _Discarded(Exception):
    """The engine no longer wants the disposable being brought up."""


class _StepCancelled(Exception):
    """The step a bring-up was waiting on was cancelled by someone else (see _step)."""


@dataclass(frozen=True, slots=True)
class Handout:
    """The answer to a request: a disposable that is now its caller's."""

    name: str
    domid: int
    dispid: int
    template: str
    origin: Origin
    paused: bool
    waited_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class Disposable:
    name: str
    dispid: int
    template: str
    fingerprint: str
    origin: Origin
    stage: Stage
    since: float
    domid: int | None = None
    #: The request that took it has answered its caller.
    delivered: bool = False
    #: Paused by the engine and not unpaused since.
    paused: bool = False
    memory_mib: int | None = None
    #: Something an operator should know (a failed shrink), shown in status.
    note: str | None = None
    #: MiB counted in the engine's pending total until the domain exists.
    reserved_mib: int = 0
    #: Settled when the bring-up is over: ready (paused in the pool, or running for the
    #: request that took it) or failed with the reason.
    ready: asyncio.Future[None] = field(default_factory=lambda: _loop().create_future())
    bring_up: asyncio.Task[None] | None = None
    #: The cancellable step the bring-up is waiting on (boot, shrink).
    step: asyncio.Future[Any] | None = None
    destroying: asyncio.Task[None] | None = None

    def record(self) -> Record:
        return Record(
            name=self.name,
            dispid=self.dispid,
            template=self.template,
            stage=self.stage,
            since=self.since,
            domid=self.domid,
            origin=self.origin,
            fingerprint=self.fingerprint,
            delivered=self.delivered,
        )


@dataclass(eq=False)
class _Queue:
    """A disposable template and what the engine knows about filling it."""

    name: str
    settings: TemplateSettings
    #: The fingerprint of the template now; preloads with another one are outdated.
    fingerprint: str
    #: False right after the template's files changed: wait until they stop changing.
    settled: bool = True
    #: Preloads wanted but not started for lack of memory (the availability gap).
    gap: int = 0
    failures: int = 0
    #: Loop time before which no preload starts (back-off after failures).
    retry_at: float = 0.0
    timer: asyncio.TimerHandle | None = None


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
    ) -> None:
        self._config = config
        self._backend = backend
        self._memory = memory
        self._journal = journal
        self.bus = bus
        self._log = log
        self._now = now
        self._books: dict[str, Disposable] = {}
        self._queues = {
            name: _Queue(name, settings, settings.fingerprint())
            for name, settings in config.templates.items()
        }
        self._overrides: dict[str, int] = {}
        self._start_slots = asyncio.Semaphore(config.pool.max_concurrent_starts)
        self._fill_lock = asyncio.Lock()
        self._pending_mib = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._suspended = False
        self._stopping = False
        self.fatal: asyncio.Future[None] = _loop().create_future()

    # == life of the engine ============================================================

    async def start(self) -> None:
        """Replay the journal, reconcile it with the backend, start watching, fill."""
        self._overrides = {
            key: value
            for key in self._setting_keys()
            if (value := self._journal.get_setting(key)) is not None
        }
        await self._recover()
        self._spawn(self._watch_backend(), "backend events")
        self._spawn(self._watch_templates(), "template files")
        for queue in self._queues.values():
            self._schedule_fill(queue)

    async def stop(self, drain: float) -> None:
        """Stop filling, destroy half-started preloads (paused ones survive for the next
        start), and end every task within ``drain`` seconds."""
        self._stopping = True
        for queue in self._queues.values():
            self._cancel_timer(queue)
        for d in list(self._books.values()):
            if d.stage in POOL and d.stage is not Stage.PAUSED:
                self._end(d, Event.DISCARD, "the daemon is stopping")
        work = [
            t
            for d in self._books.values()
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
        """Hand out a disposable for ``target``: a preload when one is usable, else a
        fresh one. Answers within ``timeout`` seconds, or raises :class:`RequestTimeout`.

        Raises :class:`BadRequest`, :class:`NoSuchTemplate`, :class:`NotADispvmTemplate`,
        :class:`ShuttingDown`, and for a fresh start :class:`~dispoold.memory.NoMemory`
        or :class:`~dispoold.backend.BackendError`.
        """
        if self._stopping:
            raise ShuttingDown("dispoold is stopping")
        limit = self._config.pool.request_timeout if timeout is None else timeout
        if not (0 < limit <= self._config.pool.max_request_timeout):
            raise BadRequest(
                f"timeout must be above 0 and at most {self._config.pool.max_request_timeout:g} s"
            )
        names = targets.resolve(
            target,
            source,
            templates=self._config.templates,
            sources=self._config.sources,
            default_dispvm=self._config.pool.default_dispvm,
        )
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(limit):
                d = await self._obtain(names, paused)
        except TimeoutError:
            raise RequestTimeout(f"no disposable for {target} within {limit:g} s") from None
        if d.domid is None:  # pragma: no cover - a delivered disposable exists
            raise BackendError("request", d.name, "handed out without a domid")
        return Handout(
            name=d.name,
            domid=d.domid,
            dispid=d.dispid,
            template=d.template,
            origin=d.origin,
            paused=paused,
            waited_ms=(loop.time() - started) * 1000,
        )

    async def release(self, name: str) -> None:
        """Destroy a handed-out disposable and free its name. Raises :class:`NotFound`."""
        d = self._books.get(name)
        if d is None or d.stage not in HANDED_OUT or not (d.delivered or d.stage is Stage.TAINTED):
            raise NotFound(f"{name} is not a handed-out disposable")
        self._end(d, Event.RELEASE, "released")
        if d.destroying is not None:
            await asyncio.shield(d.destroying)

    async def _obtain(self, names: list[str], paused: bool) -> Disposable:
        while (d := self._take(names)) is not None:
            try:
                return await self._deliver(d, paused)
            except _Lost as exc:
                self._log.info("%s could not be handed out (%s); trying another", d.name, exc)
        queue = self._queues[names[0]]
        d = self._new_disposable(queue, "fresh")
        self._transition(d, Event.REQUEST)
        self._publish_requested(d)
        d.bring_up = self._spawn(self._bring_up(d, queue), f"fresh start {d.name}")
        return await self._deliver(d, paused)

    def _take(self, names: list[str]) -> Disposable | None:
        """Take the best usable pool member of ``names`` for a request (no await here:
        nobody else can take it meanwhile)."""
        best: Disposable | None = None
        for d in self._books.values():
            if d.template not in names or d.stage not in _TAKE_ORDER:
                continue
            queue = self._queues.get(d.template)
            if queue is None or d.fingerprint != queue.fingerprint:
                continue  # outdated: the refresh replaces it
            if best is None or (_TAKE_ORDER[d.stage], d.since) < (
                _TAKE_ORDER[best.stage],
                best.since,
            ):
                best = d
        if best is None:
            return None
        was = best.stage
        self._transition(best, Event.REQUEST)
        if was is Stage.SHRINKING and best.step is not None:
            best.step.cancel()  # the caller wants it now, not smaller
        self._publish_requested(best)
        self._refill_after_use(self._queues[best.template])
        return best

    async def _deliver(self, d: Disposable, paused: bool) -> Disposable:
        """Wait until ``d`` is ready, then hand it over running or paused.

        Raises :class:`_Lost` when it can't be handed out (the caller tries another), or,
        for a fresh start, the reason it failed. A disposable not handed over is
        discarded, whatever cut the request short (including its timeout).
        """
        try:
            if not d.ready.done() and d.origin == "preload":
                wait = PRELOAD_WAIT_FACTOR * self._config.pool.startup_timeout
                try:
                    await asyncio.wait_for(asyncio.shield(d.ready), wait)
                except TimeoutError:
                    raise _Lost(f"not ready after {wait:g} s") from None
            else:
                await asyncio.shield(d.ready)
            if d.stage is not Stage.REQUESTED:
                raise _Lost(f"it is {d.stage.value}")
            try:
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
                raise _Lost("someone else unpaused it") from None
            if d.stage is not Stage.REQUESTED:
                raise _Lost(f"it became {d.stage.value}")
            d.delivered = True
            if paused:
                self._journal.put(d.record())
            else:
                self._transition(d, Event.HAND_OUT)
                self._memory.include(d.name)
                self.bus.publish("used", {"name": d.name, "template": d.template})
            return d
        except (_Lost, _Discarded) as exc:
            self._abandon(d)
            if d.origin == "fresh":
                raise BackendError("start", d.name, str(exc)) from None
            raise _Lost(str(exc)) from None
        except (BackendError, MemoryManagerError) as exc:
            self._abandon(d)
            if d.origin == "fresh":
                raise
            raise _Lost(str(exc)) from None
        except BaseException:
            self._abandon(d)
            raise

    def _abandon(self, d: Disposable) -> None:
        if d.stage is Stage.REQUESTED and not d.delivered:
            self._end(d, Event.DISCARD, "its request was abandoned")

    def _publish_requested(self, d: Disposable) -> None:
        self.bus.publish("requested", {"name": d.name, "template": d.template, "origin": d.origin})

    def _taint(self, d: Disposable) -> None:
        """``d`` was unpaused by someone other than its request: it leaves the pool for
        good, is never handed out, and is left running for whoever is using it."""
        self._transition(d, Event.TAINT if d.stage is Stage.REQUESTED else Event.UNPAUSE)
        d.paused = False
        self._memory.include(d.name)
        self._log.warning("%s was unpaused without a request: tainted", d.name)
        self.bus.publish("tainted", {"name": d.name, "template": d.template})
        if (queue := self._queues.get(d.template)) is not None:
            self._refill_after_use(queue)

    # == filling ========================================================================

    def effective_max(self, template: str) -> int:
        """How many preloads ``template`` should have (its own maximum, or the global
        one for the default disposable template)."""
        queue = self._queues.get(template)
        if queue is None or not queue.settings.dispvm_template:
            return 0
        if template == self._config.pool.default_dispvm:
            global_max = self._overrides.get(GLOBAL_MAX, self._config.pool.max)
            if global_max is not None:
                return global_max
        return self._overrides.get(TEMPLATE_MAX_PREFIX + template, queue.settings.preload_max)

    def threshold_mib(self) -> int:
        return self._overrides.get(THRESHOLD, self._config.pool.threshold_mib or 0)

    def _members(self, template: str) -> list[Disposable]:
        return [d for d in self._books.values() if d.template == template and d.stage in POOL]

    def _schedule_fill(self, queue: _Queue, delay: float = 0.0) -> None:
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

    def _start_fill(self, queue: _Queue) -> None:
        queue.timer = None
        self._spawn(self._fill(queue), f"fill {queue.name}")

    def _cancel_timer(self, queue: _Queue) -> None:
        if queue.timer is not None:
            queue.timer.cancel()
            queue.timer = None

    def _refill_after_use(self, queue: _Queue) -> None:
        delay = self._config.pool.refill_delay
        if delay < 0:
            # Negative delay: no refill while the template still has preloads.
            if self._members(queue.name):
                return
            delay = 0.0
        self._schedule_fill(queue, delay)

    async def _fill(self, queue: _Queue) -> None:
        """Start or remove preloads until ``queue`` holds as many as it should, within
        the memory the threshold leaves free. Fills are serialized, so the memory the
        ones already decided will take is counted (``_pending_mib``) by the next."""
        async with self._fill_lock:
            if self._stopping or self._queues.get(queue.name) is not queue:
                return
            members = self._members(queue.name)
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
                d.bring_up = self._spawn(self._bring_up(d, queue), f"preload {d.name}")

    def _set_gap(
        self, queue: _Queue, gap: int, available: int | None = None, threshold: int | None = None
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
            self._schedule_fill(queue, self._config.pool.gap_retry_interval)
        queue.gap = gap

    def _new_disposable(self, queue: _Queue, origin: Origin) -> Disposable:
        """A new disposable in the books and the journal, before its domain exists."""
        dispid = self._journal.allocate_dispid(
            self._config.pool.dispid_quarantine_days * 86400,
            exclude=frozenset(d.dispid for d in self._books.values()),
        )
        d = Disposable(
            name=f"disp{dispid}",
            dispid=dispid,
            template=queue.name,
            fingerprint=queue.fingerprint,
            origin=origin,
            stage=Stage.PRELOAD,
            since=self._now(),
        )
        self._books[d.name] = d
        self._journal.put(d.record())
        return d

    # == bringing a disposable up =======================================================

    async def _bring_up(self, d: Disposable, queue: _Queue) -> None:
        """Create, boot, shrink and pause ``d`` (a preload), or create and boot it for the
        request that is waiting (a fresh start or a preload taken during startup)."""
        settings = queue.settings
        slot = self._start_slots if d.origin == "preload" else contextlib.nullcontext()
        try:
            async with slot:
                self._check_wanted(d)
                await self._create(d, settings)
                self._check_wanted(d)  # discarded while the domain was being created
                self._transition(d, Event.START)
                if d.origin == "preload":
                    self.bus.publish("preload-started", {"name": d.name, "template": d.template})
                self._check_wanted(d)
                await self._step(
                    d, self._backend.wait_ready(d.name, self._config.pool.startup_timeout)
                )
                self._check_wanted(d)
                self._transition(d, Event.READY)
                if d.stage is Stage.SHRINKING:
                    await self._shrink(d)
                    self._check_wanted(d)
                if d.stage is Stage.SHRINKING:
                    await self._backend.pause(d.name)
                    d.paused = True
                    self._memory.exclude(d.name)
                    self._check_wanted(d)
                if d.stage is Stage.SHRINKING:
                    self._transition(d, Event.PAUSED)
                    queue.failures = 0
                    self.bus.publish(
                        "preload-ready",
                        {"name": d.name, "template": d.template, "memory_mib": d.memory_mib},
                    )
            d.ready.set_result(None)
        except (_Discarded, _StepCancelled) as exc:
            if d.stage is Stage.DESTROYING:
                self._settle(d, _Discarded(f"{d.name} was discarded"))
                await self._destroy(d)
            elif d.stage is Stage.TAINTED:
                self._settle(d, _Lost("tainted"))
            else:  # a step cancelled by nobody the engine knows of
                await self._failed(
                    d, queue, BackendError("start", d.name, f"interrupted ({exc!r})")
                )
        except _NoRoom as exc:
            self._log.info("%s: not started: %s", d.name, exc)
            self._settle(d, _Discarded(str(exc)))
            self._transition(d, Event.DISCARD)
            await self._destroy(d)
            self._schedule_fill(queue, self._config.pool.gap_retry_interval)
        except (BackendError, MemoryManagerError) as exc:
            await self._failed(d, queue, exc)
        finally:
            self._release_reservation(d)

    async def _create(self, d: Disposable, settings: TemplateSettings) -> None:
        marker = Marker(owner=self._config.daemon.instance, template=d.template, dispid=d.dispid)
        try:
            async with self._memory.allocation(d.name, settings.memory):
                if d.origin == "preload":
                    # Re-checked at the last moment, inside the allocation (which admits one
                    # creation at a time): a fresh start may have taken memory since the fill.
                    available = await self._memory.available_mib()
                    if available - self._pending_mib < self.threshold_mib():
                        raise _NoRoom(f"{available} MiB free would cross the threshold")
                # Not cancellable halfway: a cancelled caller leaves the creation running
                # and the next start finds the domain through the journal.
                d.domid = await asyncio.shield(self._backend.create(d.name, settings, marker))
        except NoMemory as exc:
            if d.origin == "preload":
                raise _NoRoom(str(exc)) from None
            raise
        finally:
            self._release_reservation(d)
        d.memory_mib = settings.memory
        self._journal.put(d.record())

    async def _shrink(self, d: Disposable) -> None:
        """Shrink to the preferred size; a failure is noted, and the pause still happens."""
        try:
            result = await self._step(d, self._memory.shrink(d.name))
        except _StepCancelled:
            if d.stage is Stage.DESTROYING:
                raise
            return  # a request took it: it gets it now, unshrunk
        except MemoryManagerError as exc:
            d.note = f"shrink failed: {exc}"
            self._log.warning("%s: %s; pausing anyway", d.name, d.note)
            return
        d.memory_mib = result.actual_mib
        if not result.converged:
            d.note = f"memory at {result.actual_mib} MiB, target {result.target_mib} MiB"

    async def _step(self, d: Disposable, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` as a step others may cancel (:meth:`_end`, :meth:`_take`).

        Raises :class:`_StepCancelled` when they did; the engine's own cancellation of
        the bring-up still propagates as ``CancelledError``.
        """
        step = asyncio.ensure_future(coro)
        d.step = step
        try:
            return await step
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if step.cancelled() and (current is None or not current.cancelling()):
                raise _StepCancelled from None
            raise
        finally:
            d.step = None

    def _check_wanted(self, d: Disposable) -> None:
        if d.stage is Stage.DESTROYING:
            raise _Discarded
        if d.stage is Stage.TAINTED:
            self._settle(d, _Lost("tainted"))
            raise _Tainted

    async def _failed(self, d: Disposable, queue: _Queue, exc: Exception) -> None:
        """A bring-up failed: nobody waits on ``d`` any longer (Qubes #10928), it is
        destroyed, and its template backs off before the next attempt."""
        self._log.warning("%s (%s) failed: %s", d.name, d.template, exc)
        self._settle(d, exc)
        if d.stage in (Stage.USED, Stage.TAINTED):
            return  # someone is using it: never destroyed under them
        if d.stage in POOL:
            self.bus.publish(
                "preload-failed", {"name": d.name, "template": d.template, "error": str(exc)}
            )
        if d.stage is not Stage.DESTROYING:
            self._transition(d, Event.FAIL)
        if d.origin == "preload":
            queue.failures += 1
            backoff = min(
                self._config.pool.failure_backoff * 2 ** (queue.failures - 1),
                self._config.pool.failure_backoff_max,
            )
            queue.retry_at = asyncio.get_running_loop().time() + backoff
        await self._destroy(d)

    def _settle(self, d: Disposable, exc: BaseException) -> None:
        if not d.ready.done():
            d.ready.set_exception(exc)
            # Mark it retrieved: nobody may be waiting, and that is fine.
            d.ready.exception()

    def _release_reservation(self, d: Disposable) -> None:
        self._pending_mib -= d.reserved_mib
        d.reserved_mib = 0

    # == ending a disposable ============================================================

    def _end(self, d: Disposable, event: Event, reason: str) -> None:
        """Move ``d`` towards destruction (``event`` says why) and make sure it happens."""
        was = d.stage
        self._transition(d, event)
        if was is Stage.DESTROYING:
            return
        self._log.info("%s (%s): %s", d.name, was.value, reason)
        self._settle(d, _Discarded(reason))
        if d.bring_up is not None and not d.bring_up.done():
            if d.step is not None:
                d.step.cancel()
            return  # the bring-up destroys it as soon as its current step ends
        d.destroying = self._spawn(
            self._destroy(d, reason, refill=was in POOL), f"destroy {d.name}"
        )

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
        self._memory.forget(d.name)
        self._transition(d, Event.DESTROYED)
        self.bus.publish("removed", {"name": d.name, "template": d.template, "reason": reason})
        # Memory came free: templates short of it may fill now.
        for queue in self._queues.values():
            if queue.gap > 0 or (refill and queue.name == d.template):
                self._schedule_fill(queue)

    # == what happens behind the engine's back ==========================================

    async def _watch_backend(self) -> None:
        async for event in self._backend.events():
            d = self._books.get(event.name)
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
        if d.stage in POOL:
            self._log.warning("preload %s died", d.name)
        self._end(d, Event.DIE, "the domain died")

    def _on_unpause(self, d: Disposable) -> None:
        if d.stage in (Stage.PAUSED, Stage.SHRINKING):
            self._taint(d)
        elif d.stage is Stage.REQUESTED and d.delivered:
            # Handed out paused; the caller's unpause is the use.
            self._transition(d, Event.UNPAUSE)
            d.paused = False
            self._memory.include(d.name)
            self.bus.publish("used", {"name": d.name, "template": d.template})
            if (queue := self._queues.get(d.template)) is not None:
                self._refill_after_use(queue)
        elif d.stage is Stage.REQUESTED:
            self._taint(d)  # its request has not handed it over yet: that one moves on
        else:
            self._transition(d, Event.UNPAUSE)

    async def _watch_templates(self) -> None:
        """Notice template files changing on disk: outdated preloads are discarded at
        once; new ones start once the files have stopped changing for one interval."""
        while True:
            await asyncio.sleep(self._config.pool.refresh_check_interval)
            for queue in list(self._queues.values()):
                fingerprint = await asyncio.to_thread(queue.settings.fingerprint)
                self._fingerprint_seen(queue, fingerprint)

    def _fingerprint_seen(self, queue: _Queue, fingerprint: str) -> None:
        if self._queues.get(queue.name) is not queue:
            return
        if fingerprint != queue.fingerprint:
            queue.fingerprint = fingerprint
            queue.settled = False
            self._refresh(queue, "the template's files changed")
        elif not queue.settled:
            queue.settled = True
            self._schedule_fill(queue)

    # == operator's controls ============================================================

    async def set_max(self, template: str | None, value: int | None) -> None:
        """Set (or, with None, drop) the run-time override of a template's maximum, or of
        the global one (``template`` None). The configuration's value applies without one."""
        if value is not None and not (0 <= value <= MAX_PRELOAD):
            raise BadRequest(f"max must be between 0 and {MAX_PRELOAD}")
        if template is None:
            key = GLOBAL_MAX
            affected = [self._config.pool.default_dispvm]
        else:
            queue = self._queue(template)
            if not queue.settings.dispvm_template:
                raise NotADispvmTemplate(f"{template} is not a disposable template")
            key = TEMPLATE_MAX_PREFIX + template
            affected = [template]
        self._set_override(key, value)
        for name in affected:
            if name is not None and (target := self._queues.get(name)) is not None:
                self._schedule_fill(target)

    async def set_threshold(self, mib: int | None) -> None:
        """Set (or drop) the run-time override of the free-memory threshold."""
        if mib is not None and mib < 0:
            raise BadRequest("the threshold must not be negative")
        self._set_override(THRESHOLD, mib)
        for queue in self._queues.values():
            self._schedule_fill(queue)

    async def refresh(self, template: str) -> None:
        """Discard the template's preloads and make new ones (it was updated)."""
        self._refresh(self._queue(template), "refresh requested")

    def _refresh(self, queue: _Queue, reason: str) -> None:
        discarded = 0
        for d in self._members(queue.name):
            self._end(d, Event.DISCARD, reason)
            discarded += 1
        self.bus.publish(
            "refreshed", {"template": queue.name, "reason": reason, "discarded": discarded}
        )
        self._schedule_fill(queue)

    async def suspend(self) -> None:
        """Before host suspend: destroy every preload and stop refilling."""
        self._suspended = True
        for queue in self._queues.values():
            self._cancel_timer(queue)
        for d in list(self._books.values()):
            if d.stage in POOL:
                self._end(d, Event.DISCARD, "host suspend")
        work = [
            t
            for d in self._books.values()
            if d.stage is Stage.DESTROYING
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

    async def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration: new templates fill, removed ones lose their
        preloads, changed definitions are refreshed, changed limits apply."""
        old = self._config
        self._config = config
        if config.pool.max_concurrent_starts != old.pool.max_concurrent_starts:
            self._start_slots = asyncio.Semaphore(config.pool.max_concurrent_starts)
        for name in old.templates.keys() - config.templates.keys():
            queue = self._queues.pop(name)
            self._cancel_timer(queue)
            for d in self._members(name):
                self._end(d, Event.DISCARD, "template removed from the configuration")
        for name, settings in config.templates.items():
            fingerprint = await asyncio.to_thread(settings.fingerprint)
            current = self._queues.get(name)
            if current is None:
                self._queues[name] = _Queue(name, settings, fingerprint)
            elif settings != current.settings or fingerprint != current.fingerprint:
                current.settings = settings
                current.fingerprint = fingerprint
                self._refresh(current, "template definition changed")
        for queue in self._queues.values():
            self._schedule_fill(queue)

    def _set_override(self, key: str, value: int | None) -> None:
        self._journal.set_setting(key, value)
        if value is None:
            self._overrides.pop(key, None)
        else:
            self._overrides[key] = value

    def _setting_keys(self) -> Iterable[str]:
        yield GLOBAL_MAX
        yield THRESHOLD
        for name in self._queues:
            yield TEMPLATE_MAX_PREFIX + name

    def _queue(self, template: str) -> _Queue:
        queue = self._queues.get(template)
        if queue is None:
            raise NoSuchTemplate(f"no template named {template!r}")
        return queue

    # == status =========================================================================

    def status(self, template: str | None = None) -> dict[str, Any]:
        """The pools as the protocol's ``status`` op reports them."""
        if template is not None:
            self._queue(template)
            names = [template]
        else:
            names = sorted(self._queues.keys() | {d.template for d in self._books.values()})
        by_template: dict[str, list[Disposable]] = {name: [] for name in names}
        for d in self._books.values():
            if d.template in by_template:
                by_template[d.template].append(d)
        return {
            "templates": [
                {
                    "name": name,
                    "max": self.effective_max(name),
                    "threshold_gap": queue.gap if (queue := self._queues.get(name)) else 0,
                    "disposables": [
                        _describe(d) for d in sorted(by_template[name], key=lambda d: d.since)
                    ],
                }
                for name in names
            ],
            "memory": {**self._memory.status(), "threshold_mib": self.threshold_mib()},
        }

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        preloaded = sum(1 for d in self._books.values() if d.stage is Stage.PAUSED)
        starting = sum(1 for d in self._books.values() if d.stage in POOL) - preloaded
        handed_out = sum(1 for d in self._books.values() if d.stage in HANDED_OUT)
        wanted = sum(self.effective_max(name) for name in self._queues)
        gap = sum(queue.gap for queue in self._queues.values())
        line = f"{preloaded}/{wanted} preloaded, {starting} starting, {handed_out} handed out"
        if gap:
            line += f", {gap} short of memory"
        if self._suspended:
            line += ", suspended"
        return line

    # == bookkeeping ====================================================================

    def _transition(self, d: Disposable, event: Event) -> None:
        """The one place a stage changes: books and journal together."""
        stage = next_stage(d.name, d.stage, event)
        if stage is None:
            del self._books[d.name]
            self._journal.remove(d.name)
            return
        if stage is not d.stage:
            d.stage = stage
            d.since = self._now()
        self._journal.put(d.record())

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
        """Bring the journal and the backend's domains into agreement (see the journal's
        docstring for what each recorded stage means after a crash)."""
        owner = self._config.daemon.instance
        found = {info.name: info for info in await self._backend.list_owned(owner)}
        for record in self._journal.records():
            info = found.pop(record.name, None)
            d = Disposable(
                name=record.name,
                dispid=record.dispid,
                template=record.template,
                fingerprint=record.fingerprint,
                origin="fresh" if record.origin == "fresh" else "preload",
                stage=record.stage,
                since=record.since,
                domid=record.domid,
                delivered=record.delivered,
            )
            self._books[d.name] = d
            if info is None:
                self._log.info("%s (%s) no longer exists", d.name, d.stage.value)
                del self._books[d.name]
                self._journal.remove(d.name)
                continue
            d.domid, d.paused, d.memory_mib = info.domid, info.paused, info.memory_mib
            if info.shutdown:
                self._end(d, Event.DIE, "found dead at start-up")
            elif d.stage is Stage.PAUSED:
                self._readopt(d)
            elif d.stage in POOL:
                self._end(d, Event.DISCARD, "half-started when the daemon stopped")
            elif d.stage is Stage.REQUESTED and not d.delivered:
                self._end(d, Event.DISCARD, "its request was cut short by a restart")
            elif d.stage is Stage.REQUESTED and not d.paused:
                self._transition(d, Event.UNPAUSE)  # its caller unpaused it meanwhile
                self._memory.include(d.name)
            elif d.stage is Stage.DESTROYING:
                d.destroying = self._spawn(self._destroy(d, "destroyed at start-up"), d.name)
            else:
                self._log.info("%s: still %s", d.name, d.stage.value)
        for info in found.values():
            await self._reconcile(info)

    def _readopt(self, d: Disposable) -> None:
        queue = self._queues.get(d.template)
        if not d.paused:
            self._taint(d)
        elif queue is None or not queue.settings.dispvm_template:
            self._end(d, Event.DISCARD, "its template is no longer configured")
        elif d.fingerprint != queue.fingerprint:
            self._end(d, Event.DISCARD, "outdated")
        else:
            self._memory.exclude(d.name)
            d.ready.set_result(None)
            self._log.info("%s: paused preload of %s re-adopted", d.name, d.template)

    async def _reconcile(self, info: DomainInfo) -> None:
        """A domain carrying our marker that the journal does not know (the state
        directory was lost or damaged). A running one may be someone's: it is tracked as
        handed out until released or dead. A paused or dead one is destroyed."""
        marker = info.marker
        taken = {d.dispid for d in self._books.values()}
        if info.paused or info.shutdown or marker is None or marker.dispid in taken:
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
            delivered=True,
            memory_mib=info.memory_mib,
        )
        self._books[d.name] = d
        self._journal.put(d.record())
        self._memory.include(d.name)
        self._log.warning(
            "%s: running, marked as ours but not in the journal; tracked as handed out", d.name
        )


class _NoRoom(Exception):
    """Starting this preload now would eat into the memory threshold."""


class _Tainted(_Discarded):
    """Unpaused by someone else while being brought up: it is left alone."""


def _describe(d: Disposable) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": d.name,
        "domid": d.domid,
        "stage": d.stage.value,
        "since": d.since,
        "memory_mib": d.memory_mib,
    }
    if d.note is not None:
        entry["note"] = d.note
    return entry


def _loop() -> asyncio.AbstractEventLoop:
    return asyncio.get_running_loop()
