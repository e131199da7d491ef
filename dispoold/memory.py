"""Memory negotiation: how much the host can spare, and shrinking preloads before pause.

The pool engine talks to a :class:`MemoryManager`. Two implementations ship, chosen by
``[memory] manager``: the qmemman client (Qubes, where qmemman balances memory) and the
daemon's own balancer (plain Xen). ``auto`` picks qmemman when its socket exists.

Both follow qmemman's rules (see ``shared/ANCHORS.md``):

- preferred size = used x ``preferred_factor``, at least ``preferred_floor_mib``, at most
  maxmem;
- a shrinking domain is polled every 0.1 s; it has converged when actual / target <=
  ``convergence_ratio``; after ``check_period`` seconds it is given up on when the last
  second moved less than ``check_mib_s`` MiB/s;
- a paused domain is never handed memory (Qubes #11121), and the memory balancer sees one
  request at a time (Qubes #9917).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Final, Protocol, runtime_checkable

from dispoold.backend import (
    Backend,
    BackendError,
    MemoryInfo,
    NoSuchDomain,
    import_from_string,
)
from dispoold.config import MemorySettings

log = logging.getLogger(__name__)

#: The managers that ship, by configuration name. Each is called as
#: ``cls(settings, backend)``; so is an out-of-tree ``package.module:Class``.
MANAGERS = {
    "qmemman": "dispoold.memory:QmemmanClient",
    "balancer": "dispoold.memory:Balancer",
}

MIB: Final = 1024 * 1024
#: What Xen itself needs per domain on top of the guest's memory. Qubes asks qmemman for
#: 4 MiB plus 1.5 MiB per vCPU (OpenStack's measured overhead); the engine passes the
#: guest's size only, so one vCPU's worth is added, rounded up.
DOMAIN_OVERHEAD_MIB: Final = 6
#: How many recent shrinks :meth:`MemoryManager.status` reports.
SHRINK_HISTORY: Final = 16
#: qmemman's longest answer is ``INVALID_ARG\n``; a longer line is not qmemman talking.
MAX_ANSWER_BYTES: Final = 64
#: qmemman's available-memory file holds one decimal number of bytes.
MAX_AVAIL_FILE_BYTES: Final = 64


class MemoryManagerError(Exception):
    """A memory operation failed; the message says what and why."""


class NoMemory(MemoryManagerError):
    """The host cannot free enough memory for a new domain."""


class _Vanished(MemoryManagerError):
    """The domain a memory operation was about is gone (destroyed, or shut down)."""


@dataclass(frozen=True, slots=True)
class ShrinkResult:
    target_mib: int
    actual_mib: int
    #: actual / target reached the convergence ratio before the manager gave up.
    converged: bool
    seconds: float


@runtime_checkable
class MemoryManager(Protocol):
    """What the pool engine needs from memory management.

    Domains are named as the backend names them. Methods never block the event loop and
    raise only :class:`MemoryManagerError` subclasses (and ``CancelledError``).
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def available_mib(self) -> int:
        """Memory new domains could get now, before the preload threshold is taken off."""

    def allocation(self, name: str, mib: int) -> AbstractAsyncContextManager[None]:
        """Make ``mib`` MiB free for the domain ``name`` that is about to be created.

        The engine creates the domain inside the ``async with`` block: the memory stays
        reserved for it (with qmemman: its global lock is held) until the block exits.
        Allocations are serialized: one block at a time for the whole daemon, so keep
        the block short (create, nothing else). Raises :class:`NoMemory` on entry when the
        memory cannot be freed, :class:`MemoryManagerError` when the manager itself
        failed (qmemman missing, dead or silent). Cancelling a waiting entry is safe.
        """

    async def shrink(self, name: str) -> ShrinkResult:
        """Bring a ready preload down to its preferred size and follow it until it
        converges or stops moving.

        A domain that stopped moving is not an error: the result says ``converged=False``
        with the figures reached. Raises :class:`MemoryManagerError`, naming the domain,
        when the shrink could not be done at all. Cancellable at any await (a request
        arriving meanwhile cancels it); a cancelled shrink leaves nothing locked, and a
        later :meth:`include` gives the domain its memory back."""

    def exclude(self, name: str) -> None:
        """The domain is paused (Qubes #11121) or being destroyed: never hand it memory
        until :meth:`include`."""

    def include(self, name: str) -> None:
        """The domain has been handed out: it takes part in balancing again, and gets
        back what it needs to run."""

    def forget(self, name: str) -> None:
        """The domain is gone."""

    def status(self) -> dict[str, Any]:
        """Figures for the ``memory`` part of the status reply (msgpack-able)."""


def create_manager(settings: MemorySettings, backend: Backend) -> MemoryManager:
    """The manager ``settings.manager`` names; ``auto`` means qmemman when its socket
    exists, else the daemon's own balancer. Raises :class:`MemoryManagerError`."""
    name = settings.manager
    if name == "auto":
        name = "qmemman" if settings.qmemman_socket.exists() else "balancer"
    try:
        cls = import_from_string(MANAGERS.get(name, name))
    except ImportError as exc:
        raise MemoryManagerError(f"memory manager {exc}") from None
    manager = cls(settings, backend)
    if not isinstance(manager, MemoryManager):
        raise MemoryManagerError(f"memory manager {name!r} does not implement MemoryManager")
    return manager


# -- shared rules ---------------------------------------------------------------------


def preferred_mib(used_mib: int, maxmem_mib: int, settings: MemorySettings) -> int:
    """qmemman's preferred size: ``used x factor``, at least the floor, at most maxmem.

    (qmemman lets the floor win over maxmem; a target above maxmem cannot be set, so
    here maxmem wins.)"""
    wanted = max(math.ceil(used_mib * settings.preferred_factor), settings.preferred_floor_mib)
    return max(1, min(wanted, maxmem_mib))


class Progress:
    """qmemman's give-up rule for something that should keep going down (a domain's
    actual size while it shrinks, the shortfall of free memory while domains give some
    back): after ``check_period`` seconds, give up when the last ``check_window`` seconds
    moved less than ``check_mib_s`` MiB per second."""

    def __init__(self, settings: MemorySettings, started: float) -> None:
        self._check_period = settings.check_period
        self._min_rate = settings.check_mib_s
        self._window = settings.check_window
        self._started = started
        self._samples: collections.deque[tuple[float, float]] = collections.deque()

    def stalled(self, now: float, level: float) -> bool:
        """Record ``level`` (MiB, lower is better) at ``now``; True when it is time to
        give up."""
        self._samples.append((now, level))
        # Keep the newest sample that is at least a window old: it is the baseline.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self._window:
            self._samples.popleft()
        if now - self._started < self._check_period:
            return False
        then, baseline = self._samples[0]
        if now - then < self._window * 0.999:
            return False  # not a whole window of history yet
        moved = baseline - level
        return moved <= 0 or moved < self._min_rate * self._window


@dataclass(frozen=True, slots=True)
class ShrinkRecord:
    """One shrink, as the status reply shows it."""

    name: str
    outcome: str  # converged, gave up, failed, cancelled
    target_mib: int | None = None
    actual_mib: int | None = None
    seconds: float | None = None
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "outcome": self.outcome,
            "target_mib": self.target_mib,
            "actual_mib": self.actual_mib,
            "seconds": None if self.seconds is None else round(self.seconds, 3),
            "error": self.error,
        }


class _DomainState(Enum):
    STARTING = "starting"  # created, booting or shrinking, not yet paused
    EXCLUDED = "excluded"  # paused in the pool: never hand it memory
    INCLUDED = "included"  # handed out: balanced like any running domain


@dataclass
class _Domain:
    state: _DomainState
    #: What the domain was created with: what a handed-out disposable gets back.
    initial_mib: int | None = None


class _ManagerBase:
    """What both managers share: settings, the backend, per-domain bookkeeping, the
    convergence follower and the status figures."""

    manager_name = "base"

    def __init__(self, settings: MemorySettings, backend: Backend) -> None:
        self.settings = settings
        self.backend = backend
        self._domains: dict[str, _Domain] = {}
        self._shrinks: collections.deque[ShrinkRecord] = collections.deque(maxlen=SHRINK_HISTORY)
        self._last_available_mib: int | None = None
        self._last_error: str | None = None

    # -- bookkeeping (the engine's calls are synchronous) -------------------------

    def exclude(self, name: str) -> None:
        self._domain(name).state = _DomainState.EXCLUDED

    def include(self, name: str) -> None:
        self._domain(name).state = _DomainState.INCLUDED

    def forget(self, name: str) -> None:
        self._domains.pop(name, None)

    def _domain(self, name: str) -> _Domain:
        domain = self._domains.get(name)
        if domain is None:
            domain = self._domains[name] = _Domain(_DomainState.STARTING)
        return domain

    # -- helpers ------------------------------------------------------------------

    async def _memory(self, name: str, what: str) -> MemoryInfo:
        try:
            info = await self.backend.memory(name)
        except NoSuchDomain as exc:
            raise _Vanished(f"{what} {name}: {exc}") from None
        except BackendError as exc:
            raise MemoryManagerError(f"{what} {name}: {exc}") from None
        return info

    async def _follow(self, name: str, target_mib: int) -> tuple[int, bool]:
        """Poll the domain's actual size until actual / target <= ratio (True) or the
        progress rule gives up (False). Returns the last actual size."""
        loop = asyncio.get_running_loop()
        progress = Progress(self.settings, loop.time())
        limit = max(target_mib, 1) * self.settings.convergence_ratio
        while True:
            info = await self._memory(name, "shrink")
            if info.actual_mib <= limit:
                return info.actual_mib, True
            if progress.stalled(loop.time(), info.actual_mib):
                return info.actual_mib, False
            await asyncio.sleep(self.settings.poll_interval)

    def _record(self, record: ShrinkRecord) -> None:
        self._shrinks.append(record)
        if record.error is not None:
            self._last_error = record.error

    def _result(
        self, name: str, start: float, target: int, actual: int, converged: bool
    ) -> ShrinkResult:
        seconds = asyncio.get_running_loop().time() - start
        self._record(
            ShrinkRecord(name, "converged" if converged else "gave up", target, actual, seconds)
        )
        if not converged:
            log.warning(
                "shrink %s: gave up at %d MiB for a target of %d MiB after %.1f s",
                name,
                actual,
                target,
                seconds,
            )
        return ShrinkResult(target, actual, converged, seconds)

    @contextlib.contextmanager
    def _recording_failures(self, name: str) -> Iterator[None]:
        try:
            yield
        except MemoryManagerError as exc:
            self._record(ShrinkRecord(name, "failed", error=str(exc)))
            raise
        except asyncio.CancelledError:
            self._record(ShrinkRecord(name, "cancelled"))
            raise

    def status(self) -> dict[str, Any]:
        counts = collections.Counter(d.state.value for d in self._domains.values())
        return {
            "manager": self.manager_name,
            "available_mib": self._last_available_mib,
            "domains": {state.value: counts.get(state.value, 0) for state in _DomainState},
            "shrinks": [record.to_dict() for record in self._shrinks],
            "last_error": self._last_error,
        }


# -- qmemman client -------------------------------------------------------------------


class _Answer(Enum):
    OK = "OK"
    FAIL = "FAIL"
    INVALID_ARG = "INVALID_ARG"


def _parse_answer(untrusted_line: bytes) -> _Answer | None:
    untrusted_text = untrusted_line.strip().decode("ascii", errors="replace")
    for answer in _Answer:
        if untrusted_text == answer.value:
            return answer
    return None


def _read_avail_file(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(MAX_AVAIL_FILE_BYTES + 1)


class QmemmanClient(_ManagerBase):
    """The memory manager on Qubes: qmemman balances memory, this asks it.

    The protocol (qmemman's client socket): one request per connection, an ASCII line:

    - ``<bytes>\\n``: free that much hypervisor memory for a domain about to be created.
      qmemman takes its global lock, balloons other domains down, answers, and keeps the
      lock (no balancing at all) until the client closes the connection; so
      :meth:`allocation` keeps it open until the domain exists.
    - ``<domid>:<bytes> ...\\n``: set those domains' memory, 0 meaning "preferred".
      qmemman keeps setting the target and polling until actual / target <= 1.1, or fails
      after 3 s when the last second moved less than 100 MiB. It can only shrink this
      way: a domain already under the target counts as done at once.

    Answers: ``OK``, ``FAIL``, ``INVALID_ARG``. qmemman serves one connection at a time
    and a request it chokes on (an unknown domid) ends the connection with no answer.
    All requests of this daemon go through one lock, so it never has more than one
    connection open to qmemman (five or more at once locked it up: Qubes #9917).
    """

    manager_name = "qmemman"

    def __init__(self, settings: MemorySettings, backend: Backend) -> None:
        super().__init__(settings, backend)
        self._request_lock = asyncio.Lock()
        self._reachable: bool | None = None

    async def open(self) -> None:
        if not self.settings.qmemman_socket.exists():
            log.warning(
                "qmemman's socket %s does not exist: allocations will fail and preloads "
                "will not be shrunk until qmemman runs",
                self.settings.qmemman_socket,
            )

    async def close(self) -> None:
        pass

    async def available_mib(self) -> int:
        """qmemman's published figure: free memory plus what running domains hold above
        their preferred size, less what the others need to reach theirs. It can be
        negative (memory is short); that is 0 here."""
        path = self.settings.qmemman_avail_file
        try:
            untrusted_raw = await asyncio.to_thread(_read_avail_file, path)
        except FileNotFoundError:
            raise self._failure(
                f"available memory: {path} does not exist (is qmemman running?)"
            ) from None
        except OSError as exc:
            raise self._failure(f"available memory: cannot read {path}: {exc.strerror}") from None
        untrusted_text = untrusted_raw.decode("ascii", errors="replace").strip()
        if len(untrusted_raw) > MAX_AVAIL_FILE_BYTES or not untrusted_text.lstrip("-").isdigit():
            raise self._failure(
                f"available memory: {path} holds {untrusted_text[:32]!r}, not a number of bytes"
            )
        available_bytes = int(untrusted_text)
        mib = max(0, available_bytes // MIB)
        self._last_available_mib = mib
        return mib

    def allocation(self, name: str, mib: int) -> AbstractAsyncContextManager[None]:
        return self._allocation(name, mib)

    @asynccontextmanager
    async def _allocation(self, name: str, mib: int) -> AsyncIterator[None]:
        what = f"allocate {mib} MiB for {name}"
        request = f"{(mib + DOMAIN_OVERHEAD_MIB) * MIB}\n"
        async with self._request_lock:
            writer, answer = await self._ask(request, what)
            try:
                if answer is _Answer.FAIL:
                    raise NoMemory(f"{what}: qmemman could not free that much (FAIL)")
                if answer is _Answer.INVALID_ARG:
                    raise self._failure(
                        f"{what}: qmemman rejected {request.strip()!r} (INVALID_ARG)"
                    )
                # qmemman holds its global lock until this connection closes: the memory
                # stays free until the domain exists.
                yield
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def shrink(self, name: str) -> ShrinkResult:
        start = asyncio.get_running_loop().time()
        with self._recording_failures(name):
            try:
                info = await self.backend.domain_info(name)
            except BackendError as exc:
                raise MemoryManagerError(f"shrink {name}: {exc}") from None
            if info is None:
                raise MemoryManagerError(f"shrink {name}: no such domain")
            what = f"shrink {name}"
            request = f"{info.domid}:0\n"
            async with self._request_lock:
                writer, answer = await self._ask(request, what)
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            if answer is _Answer.INVALID_ARG:
                raise self._failure(f"{what}: qmemman rejected {request.strip()!r} (INVALID_ARG)")
            if answer is _Answer.FAIL:
                # qmemman already gave up by its own rule (too slow): say where it stopped.
                now = await self._memory(name, "shrink")
                return self._result(name, start, now.target_mib, now.actual_mib, False)
            # OK: qmemman saw it converge (or skipped a guest that reports no use yet);
            # check with the hypervisor so the result tells the truth.
            now = await self._memory(name, "shrink")
            actual, converged = await self._follow(name, now.target_mib)
            return self._result(name, start, now.target_mib, actual, converged)

    def include(self, name: str) -> None:
        # qmemman gives running domains memory itself, from what they report using; it
        # skips paused ones itself too (since the fix of Qubes #11121). Nothing to ask.
        super().include(name)

    def status(self) -> dict[str, Any]:
        figures = super().status()
        figures["qmemman_reachable"] = self._reachable
        figures["socket"] = str(self.settings.qmemman_socket)
        return figures

    # -- the wire -----------------------------------------------------------------

    async def _ask(self, request: str, what: str) -> tuple[asyncio.StreamWriter, _Answer]:
        """One request on a new connection, with the request lock held by the caller.
        Returns the open connection and the answer; the caller closes it. On any failure
        the connection is closed before the error propagates."""
        path = self.settings.qmemman_socket
        connect_timeout = self.settings.qmemman_connect_timeout
        try:
            async with asyncio.timeout(connect_timeout):
                reader, writer = await asyncio.open_unix_connection(path, limit=MAX_ANSWER_BYTES)
        except FileNotFoundError:
            raise self._unreachable(
                f"{what}: qmemman is not running ({path} does not exist)"
            ) from None
        except ConnectionRefusedError:
            raise self._unreachable(f"{what}: nothing listens on {path} (qmemman died?)") from None
        except TimeoutError:
            raise self._unreachable(
                f"{what}: qmemman did not accept a connection within {connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise self._unreachable(f"{what}: cannot connect to {path}: {exc.strerror}") from None
        answer_timeout = self.settings.qmemman_answer_timeout
        done = False
        try:
            writer.write(request.encode("ascii"))
            async with asyncio.timeout(answer_timeout):
                await writer.drain()
                untrusted_line = await reader.readuntil(b"\n")
            answer = _parse_answer(untrusted_line)
            if answer is None:
                text = untrusted_line.strip().decode("ascii", errors="replace")[:32]
                raise self._failure(f"{what}: qmemman answered {text!r}, not OK/FAIL/INVALID_ARG")
            done = True
        except TimeoutError:
            raise self._unreachable(
                f"{what}: qmemman did not answer within {answer_timeout:g} s"
            ) from None
        except asyncio.IncompleteReadError:
            raise self._failure(
                f"{what}: qmemman closed the connection without answering (see its log)"
            ) from None
        except asyncio.LimitOverrunError:
            raise self._failure(f"{what}: qmemman's answer is too long") from None
        except OSError as exc:
            raise self._unreachable(f"{what}: connection to qmemman failed: {exc}") from None
        finally:
            if not done:
                writer.close()
        self._reachable = True
        return writer, answer

    def _unreachable(self, message: str) -> MemoryManagerError:
        self._reachable = False
        return self._failure(message)

    def _failure(self, message: str) -> MemoryManagerError:
        self._last_error = message
        return MemoryManagerError(message)


# -- the daemon's own balancer (plain Xen) --------------------------------------------


class Balancer(_ManagerBase):
    """The memory manager on plain Xen, where nobody else balances memory.

    - Available memory is the hypervisor's free memory less ``host_reserve_mib``.
    - :meth:`allocation` runs one creation at a time. When free memory is short it takes
      memory back from handed-out (running) disposables down to their preferred size, as
      qmemman's ``do_balloon`` does, and follows free memory with the same give-up rule;
      paused preloads cannot give anything (their balloon drivers do not run).
    - :meth:`shrink` sets the preload's target to its preferred size and follows it.
    - Memory is only ever handed to included (handed-out) domains: on :meth:`include`, a
      disposable gets back what it was created with, and squeezed ones get theirs back
      when a domain is forgotten and memory frees up. Never to a paused one (#11121).
    """

    manager_name = "balancer"

    def __init__(self, settings: MemorySettings, backend: Backend) -> None:
        super().__init__(settings, backend)
        #: Held by an allocation until its domain exists, and while memory is handed out.
        self._lock = asyncio.Lock()
        #: The last target request per domain, still in flight or done. A cancelled
        #: shrink cannot stop a backend call already in a worker thread; whatever sets a
        #: target next waits for it, so targets land in the order they were decided.
        self._setting: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._give_back_wanted: set[str] = set()
        self._give_back_task: asyncio.Task[None] | None = None
        self._last_free_mib: int | None = None

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        pending = [f for f in self._setting.values() if not f.done()]
        await asyncio.gather(*pending, return_exceptions=True)

    async def available_mib(self) -> int:
        return await self._free_mib()

    def allocation(self, name: str, mib: int) -> AbstractAsyncContextManager[None]:
        return self._allocation(name, mib)

    @asynccontextmanager
    async def _allocation(self, name: str, mib: int) -> AsyncIterator[None]:
        need = mib + DOMAIN_OVERHEAD_MIB
        async with self._lock:
            free = await self._free_mib()
            if free < need:
                await self._reclaim(name, need, free)
            yield
            # The domain exists now (or creation failed and the engine forgets it).
            self._domain(name).initial_mib = mib

    async def shrink(self, name: str) -> ShrinkResult:
        start = asyncio.get_running_loop().time()
        with self._recording_failures(name):
            info = await self._memory(name, "shrink")
            domain = self._domain(name)
            if domain.initial_mib is None:
                # Not allocated here (found at a restart): before its first shrink, a
                # domain still has what it was created with.
                domain.initial_mib = max(info.target_mib, info.actual_mib)
            if info.used_mib is None:
                raise MemoryManagerError(
                    f"shrink {name}: the guest reports no memory use, so its preferred "
                    "size is unknown"
                )
            target = preferred_mib(info.used_mib, info.maxmem_mib, self.settings)
            if target < info.target_mib:
                await self._set_target(name, target)
            else:
                # Never grow a preload: it is about to be paused.
                target = min(target, info.target_mib)
            actual, converged = await self._follow(name, target)
            return self._result(name, start, target, actual, converged)

    def exclude(self, name: str) -> None:
        super().exclude(name)
        self._give_back_wanted.discard(name)

    def include(self, name: str) -> None:
        super().include(name)
        self._want_give_back([name])

    def forget(self, name: str) -> None:
        super().forget(name)
        self._give_back_wanted.discard(name)
        # Memory frees up: the handed-out disposables that were squeezed get it back.
        self._want_give_back(
            n for n, d in self._domains.items() if d.state is _DomainState.INCLUDED
        )

    def status(self) -> dict[str, Any]:
        figures = super().status()
        figures["free_mib"] = self._last_free_mib
        figures["host_reserve_mib"] = self.settings.host_reserve_mib
        return figures

    # -- internals ----------------------------------------------------------------

    async def _free_mib(self) -> int:
        try:
            free = await self.backend.free_memory_mib()
        except BackendError as exc:
            raise MemoryManagerError(f"free memory: {exc}") from None
        self._last_free_mib = free
        available = max(0, free - self.settings.host_reserve_mib)
        self._last_available_mib = available
        return available

    async def _set_target(self, name: str, mib: int) -> None:
        await self._settled(name)
        future = asyncio.ensure_future(self.backend.set_memory_target(name, mib))
        self._setting[name] = future
        future.add_done_callback(_consume_exception)
        try:
            await asyncio.shield(future)
        except NoSuchDomain as exc:
            raise _Vanished(f"set memory of {name} to {mib} MiB: {exc}") from None
        except BackendError as exc:
            raise MemoryManagerError(f"set memory of {name} to {mib} MiB: {exc}") from None

    async def _settled(self, name: str) -> None:
        previous = self._setting.get(name)
        if previous is not None and not previous.done():
            await asyncio.wait({previous})

    async def _reclaim(self, name: str, need: int, free: int) -> None:
        """Take memory back from handed-out disposables until ``need`` MiB are free, as
        qmemman's do_balloon does: each donor gives in proportion to what it holds above
        its preferred size, never below it. Raises :class:`NoMemory`."""
        what = f"allocate {need - DOMAIN_OVERHEAD_MIB} MiB for {name}"
        donors: list[tuple[str, MemoryInfo, int]] = []
        spare_total = 0
        for donor, domain in list(self._domains.items()):
            if domain.state is not _DomainState.INCLUDED:
                continue  # starting ones are about to shrink; paused ones cannot give
            try:
                info = await self._memory(donor, "reclaim from")
            except _Vanished:
                continue  # gone meanwhile: what it held is free now, or soon
            if info.used_mib is None:
                continue
            spare = info.actual_mib - preferred_mib(info.used_mib, info.maxmem_mib, self.settings)
            if spare > 0:
                donors.append((donor, info, spare))
                spare_total += spare
        shortfall = need - free
        if spare_total < shortfall:
            raise NoMemory(
                f"{what}: {free} MiB free and {spare_total} MiB reclaimable from running "
                f"disposables, {need} MiB needed"
            )
        # qmemman asks 5% more than the shortfall, so rounding cannot leave it stuck.
        scale = min(1.0, shortfall * 1.05 / spare_total)
        for donor, info, spare in donors:
            target = info.actual_mib - math.ceil(spare * scale)
            log.info("%s: taking %d MiB back from %s", what, info.actual_mib - target, donor)
            try:
                await self._set_target(donor, target)
            except _Vanished:
                log.debug("%s: %s is gone; its memory comes free anyway", what, donor)
        loop = asyncio.get_running_loop()
        progress = Progress(self.settings, loop.time())
        while (free := await self._free_mib()) < need:
            if progress.stalled(loop.time(), need - free):
                raise NoMemory(
                    f"{what}: running disposables gave memory back too slowly ({free} MiB "
                    f"free, {need} MiB needed)"
                )
            await asyncio.sleep(self.settings.poll_interval)

    def _want_give_back(self, names: Iterable[str]) -> None:
        self._give_back_wanted.update(names)
        if self._give_back_wanted and (self._give_back_task is None or self._give_back_task.done()):
            task = asyncio.get_running_loop().create_task(self._give_back())
            self._give_back_task = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _give_back(self) -> None:
        """Hand included domains what they were created with, as far as free memory
        allows, under the allocation lock (a creation's memory is never handed out).
        One domain that cannot take it does not keep the others from getting theirs."""
        async with self._lock:
            while self._give_back_wanted:
                name = self._give_back_wanted.pop()
                try:
                    await self._give_back_one(name)
                except _Vanished:
                    log.debug("giving memory back: %s is gone", name)
                except MemoryManagerError as exc:
                    log.warning("giving memory back: %s", exc)

    async def _give_back_one(self, name: str) -> None:
        domain = self._domains.get(name)
        if domain is None or domain.state is not _DomainState.INCLUDED:
            return
        if domain.initial_mib is None:
            # Found at a restart, already handed out: what it was created with is not
            # known (maxmem may be far more), so it keeps what it has.
            return
        # A cancelled shrink's target may still be on its way: let it land first.
        await self._settled(name)
        info = await self._memory(name, "give memory back to")
        wanted = min(domain.initial_mib, info.maxmem_mib)
        grow = wanted - info.target_mib
        if grow <= 0:
            return
        grant = min(grow, await self._free_mib())
        # Checked again after the awaits: only ever to a domain that is still included.
        if grant <= 0 or not self._included(name, domain):
            return
        log.info("giving %s %d MiB back (target %d MiB)", name, grant, info.target_mib + grant)
        await self._set_target(name, info.target_mib + grant)

    def _included(self, name: str, domain: _Domain) -> bool:
        return self._domains.get(name) is domain and domain.state is _DomainState.INCLUDED


def _consume_exception(future: asyncio.Future[None]) -> None:
    # A target request nobody waits for any more (its shrink was cancelled) must not
    # leave an "exception was never retrieved" behind.
    if not future.cancelled():
        future.exception()
