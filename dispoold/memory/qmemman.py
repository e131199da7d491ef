"""The qmemman client: the memory manager on Qubes, where qmemman balances memory.

qmemman as it really behaves (Qubes core-admin ``qubes/tools/qmemmand.py``,
``qubes/qmemman/``; measured against the lab in issue 14), and what this client does
about each point:

- **The protocol.** One request per connection, an ASCII line. ``<bytes>``: free that
  much hypervisor memory for a domain about to be created; qmemman balloons other
  domains down, answers, and keeps its global lock (no balancing at all) until the client
  hangs up. ``<domid>:<bytes> ...``: set those domains' memory, 0 meaning "preferred",
  and wait until each converged (actual / target <= 1.1) or stopped moving (after 3 s,
  the last second moved less than 100 MiB). Answers: ``OK``, ``FAIL``, ``INVALID_ARG``;
  a request it chokes on (an unknown domid) ends the connection with no answer.
- **One client at a time.** qmemman serves one connection at a time, and its balance
  watcher waits on the same lock. All requests of this daemon go through one lock, so
  it never has more than one connection open to qmemman (five or more at once locked it
  up: Qubes #9917); an allocation ends as soon as the domain exists, before its unpause
  (as qubesd's does), so that qmemman is not kept from balancing during the boot.
- **meminfo.** qmemman learns what a guest uses from ``memory/meminfo``, which libxl
  leaves read-only for the guest: inside the allocation, the backend creates it (and
  ``memory/swapinfo``) empty and owned by the domain, as the Qubes toolstack does
  (:class:`dispoold.memory.port.BuildObserver`). Without a report qmemman answers
  ``OK`` to ``<domid>:0`` and does nothing.
- **OK is not "shrunk".** After a shrink the client compares what moved: qmemman's
  target must have changed, or be the preferred size qmemman's own settings give
  (``qmemman.conf``: ``vm-min-mem``, ``cache-margin-factor``; ``200M`` there is decimal).
  A skipped request is tried again a little later (qmemman's watcher may not have
  recorded the guest's report yet), then reported as skipped, never as converged.
- **Held until the pause.** After a shrink that moved memory the connection stays open,
  so qmemman balances nothing, until the engine says the pause has returned
  (:meth:`exclude`; at most ``qmemman_hold_timeout``): hanging up at once let qmemman's
  next balance regrow the preload before its pause.
- **Busy is not dead.** A qmemman that accepts the connection but does not answer in
  ``qmemman_answer_timeout`` is busy: an allocation is a shortage for now
  (:class:`MemoryBusy`, never a failed preload), a shrink is skipped. A sent request
  cannot be withdrawn, so its connection is kept until qmemman answers (then closed; at
  most ``qmemman_busy_limit``, after which qmemman is taken for hung), and no second one
  is opened meanwhile. A domain whose stage changed is never sent a request.
- **Qubes #11121.** Current qmemman still balances paused domains: with memory to spare
  it raises a paused preload's target (to its maxmem), which the preload takes the moment
  it is handed out. The client checks paused preloads' targets and reports a raise in
  status and the log; a qmemman with the fix is recommended.
- **Stale figures.** qmemman-avail-mem stays behind when qmemman stops: it is only
  trusted while qmemman answers. Preloads paused unshrunk while qmemman was away are
  named by :meth:`shrink_wanted` once it is back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Final

from dispoold.backend import Backend, BackendError, MemoryInfo
from dispoold.config import MemorySettings, TemplateSettings
from dispoold.memory.base import Domain, DomainState, ManagerBase, StageChanged
from dispoold.memory.port import (
    BuildObserver,
    MemoryBusy,
    MemoryManagerError,
    NoMemory,
    ShrinkResult,
)
from dispoold.memory.rules import MIB, QmemmanRules, start_request_bytes

log = logging.getLogger("dispoold.memory")

#: qmemman's longest answer is ``INVALID_ARG\n``; a longer line is not qmemman talking.
MAX_ANSWER_BYTES: Final = 64
#: qmemman's available-memory file holds one decimal number of bytes.
MAX_AVAIL_FILE_BYTES: Final = 64
#: Created owned by each domain inside its allocation: where the guest reports to qmemman
#: (Qubes' meminfo-writer writes its used memory, in KiB, to the first).
GUEST_KEYS: Final = ("memory/meminfo", "memory/swapinfo")
#: Within this many MiB (or 5%) of what qmemman's settings give, a target is qmemman's.
TARGET_TOLERANCE_MIB: Final = 2


class QmemmanState(Enum):
    UNKNOWN = "unknown"  # not asked yet
    OK = "ok"  # answers
    BUSY = "busy"  # accepts, but another client holds it (or it is ballooning)
    DEAD = "dead"  # not running, or nothing listens, or hung past the busy limit


class _Answer(Enum):
    OK = "OK"
    FAIL = "FAIL"
    INVALID_ARG = "INVALID_ARG"


class _Busy(Exception):
    """qmemman did not answer in time (it may have our request)."""


def _parse_answer(untrusted_line: bytes) -> _Answer | None:
    untrusted_text = untrusted_line.strip().decode("ascii", errors="replace")
    for answer in _Answer:
        if untrusted_text == answer.value:
            return answer
    return None


def _read_avail_file(path: Path) -> bytes:
    with path.open("rb") as f:
        return f.read(MAX_AVAIL_FILE_BYTES + 1)


@dataclass(eq=False)
class _Connection:
    """One connection to qmemman. It holds the client's request lock (one connection at
    a time) until :meth:`release`, which also hangs up (qmemman then releases its own)."""

    lock: asyncio.Lock
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    #: The request line it carries.
    request: str
    #: The domain a shrink request was about, if it was one.
    name: str | None = None
    released: bool = field(default=False)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.writer.close()
        self.lock.release()


@dataclass(eq=False)
class _Hold:
    name: str
    connection: _Connection
    timer: asyncio.TimerHandle


class QmemmanClient(ManagerBase):
    """The memory manager on Qubes: qmemman balances memory, this asks it (see the
    module docstring)."""

    manager_name = "qmemman"

    def __init__(self, settings: MemorySettings, backend: Backend) -> None:
        super().__init__(settings, backend)
        #: One creation at a time for the whole daemon (the port's promise).
        self._allocation_lock = asyncio.Lock()
        #: One connection to qmemman at a time (Qubes #9917).
        self._request_lock = asyncio.Lock()
        self._state = QmemmanState.UNKNOWN
        self._state_why: str | None = None
        self._last_contact: float | None = None
        self._rules = QmemmanRules()
        self._observing = False
        #: Allocations whose domain is being built: the build's hook ends them.
        self._building: dict[str, _Connection] = {}
        self._built: dict[str, int] = {}
        self._hold: _Hold | None = None
        self._draining: _Connection | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._watcher: asyncio.Task[None] | None = None
        #: Paused preloads whose target qmemman raised (Qubes #11121): name -> (from, to).
        self._raised: dict[str, tuple[int, int]] = {}
        self._raises_seen = 0

    # -- life -------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self._rules = await asyncio.to_thread(QmemmanRules.read, self.settings.qmemman_config)
        except ValueError as exc:
            raise MemoryManagerError(f"qmemman's settings: {exc}") from None
        log.info("qmemman's preferred sizes: %s", self._rules.describe())
        if not self._observing:
            if isinstance(self.backend, BuildObserver):
                self.backend.observe_builds(self._on_built, GUEST_KEYS)
                self._observing = True
            else:
                log.warning(
                    "the backend cannot create %s owned by each domain: qmemman will not "
                    "learn what dispoold's domains use, nor shrink or balance them",
                    " and ".join(GUEST_KEYS),
                )
        if not self.settings.qmemman_socket.exists():
            log.warning(
                "qmemman's socket %s does not exist: allocations will fail and preloads "
                "will not be shrunk until qmemman runs",
                self.settings.qmemman_socket,
            )
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def close(self) -> None:
        if self._hold is not None:
            self._release_hold(self._hold.name)
        tasks = [t for t in (self._watcher, *self._tasks) if t is not None]
        self._watcher = None
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- available memory ---------------------------------------------------------------

    async def available_mib(self) -> int:
        """qmemman's published figure: free memory plus what running domains hold above
        their preferred size, less what the others need to reach theirs. It can be
        negative (memory is short); that is 0 here. Only trusted while qmemman runs:
        a stopped qmemman leaves its last figure behind."""
        path = self.settings.qmemman_avail_file
        socket = self.settings.qmemman_socket
        if not socket.exists():
            self._set_state(QmemmanState.DEAD, f"{socket} does not exist")
            raise self._failure(
                f"available memory: qmemman is not running ({socket} does not exist), so "
                f"{path} is stale"
            )
        if self._contact_is_old() and not self._request_lock.locked():
            await self._probe()
        if self._state is QmemmanState.DEAD:
            raise self._failure(
                f"available memory: qmemman is not running ({self._state_why}), so {path} is stale"
            )
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

    # -- allocation ------------------------------------------------------------------

    def allocation(
        self, name: str, mib: int, template: TemplateSettings | None = None
    ) -> AbstractAsyncContextManager[None]:
        return self._allocation(name, mib, template)

    @asynccontextmanager
    async def _allocation(
        self, name: str, mib: int, template: TemplateSettings | None
    ) -> AsyncIterator[None]:
        what = f"allocate {mib} MiB for {name}"
        request = f"{start_request_bytes(mib, template)}\n"
        loop = asyncio.get_running_loop()
        async with self._allocation_lock:
            deadline = loop.time() + self.settings.qmemman_answer_timeout
            try:
                connection, answer = await self._request(what, request, deadline)
            except _Busy as exc:
                raise MemoryBusy(str(exc)) from None
            if answer is not _Answer.OK:
                connection.release()
                if answer is _Answer.FAIL:
                    raise NoMemory(f"{what}: qmemman could not free that much (FAIL)")
                raise self._failure(f"{what}: qmemman rejected {request.strip()!r} (INVALID_ARG)")
            # qmemman holds its lock until this connection closes: the memory stays free
            # until the domain exists. The build's hook closes it then; this is for a
            # backend that has no hook, and for a failed creation.
            self._building[name] = connection
            try:
                yield
            except BaseException:
                self._built.pop(name, None)
                raise
            finally:
                self._building.pop(name, None)
                connection.release()
            domain = self._domain(name)
            domain.initial_mib = mib
            domain.domid = self._built.pop(name, domain.domid)

    async def _on_built(self, name: str, domid: int) -> None:
        """The backend's word: ``name`` exists now (paused), before its unpause."""
        self._built[name] = domid
        connection = self._building.pop(name, None)
        if connection is not None:
            connection.release()  # qmemman may balance again, while the domain boots

    # -- shrink ----------------------------------------------------------------------

    async def shrink(self, name: str) -> ShrinkResult:
        loop = asyncio.get_running_loop()
        start = loop.time()
        what = f"shrink {name}"
        with self._recording_failures(name):
            domain = self._begin_shrink(name)
            epoch = domain.epoch
            attempts = 1 + self.settings.qmemman_retries
            attempt = 0
            while True:
                if attempt:
                    # qmemman's watcher may not have recorded the guest's report yet.
                    await asyncio.sleep(self.settings.qmemman_retry_delay)
                self._check_stage(name, domain, epoch)
                domid = await self._domid(name, domain)
                before = await self._memory(name, "shrink")
                self._check_stage(name, domain, epoch)
                deadline = loop.time() + self.settings.qmemman_answer_timeout
                try:
                    connection, answer = await self._request(
                        what, f"{domid}:0\n", deadline, name=name
                    )
                except _Busy as exc:
                    return self._not_done(name, start, "busy", before, str(exc))
                except MemoryManagerError as exc:
                    if self._state is QmemmanState.DEAD:
                        self._unshrunk(name, str(exc))
                    raise
                held = False
                try:
                    if answer is _Answer.INVALID_ARG:
                        raise self._failure(f"{what}: qmemman rejected '{domid}:0' (INVALID_ARG)")
                    after = await self._memory(name, "shrink")
                    if answer is _Answer.FAIL:
                        # qmemman gave up by its own rule (too slow): say where it stopped.
                        result = self._result(
                            name, start, after.target_mib, after.actual_mib, False
                        )
                    elif not self._acted(before, after):
                        attempt += 1
                        if attempt < attempts:
                            continue
                        return self._not_done(name, start, "skipped", after, self._why(after))
                    else:
                        actual, converged = await self._follow(name, after.target_mib)
                        result = self._result(name, start, after.target_mib, actual, converged)
                    self._hold_until_paused(name, connection)
                    held = True
                    return result
                finally:
                    if not held:
                        connection.release()

    async def _domid(self, name: str, domain: Domain) -> int:
        try:
            info = await self.backend.domain_info(name)
        except BackendError as exc:
            raise MemoryManagerError(f"shrink {name}: {exc}") from None
        if info is None:
            raise MemoryManagerError(f"shrink {name}: no such domain")
        if domain.domid is not None and info.domid != domain.domid:
            raise StageChanged(
                f"shrink {name}: domain {domain.domid} was replaced by domain {info.domid}"
            )
        return info.domid

    def _expected_mib(self, used_mib: int | None, maxmem_mib: int) -> int | None:
        """The target qmemman's settings give a domain using ``used_mib``."""
        if used_mib is None:
            return None
        return min(self._rules.preferred_mib(used_mib, maxmem_mib), maxmem_mib)

    def _acted(self, before: MemoryInfo, after: MemoryInfo) -> bool:
        """Whether qmemman set the domain's memory: its target moved, or it is what
        qmemman's settings give (a domain already there)."""
        if after.target_mib != before.target_mib:
            return True
        expected = self._expected_mib(after.used_mib, after.maxmem_mib)
        if expected is None:
            return False
        tolerance = max(TARGET_TOLERANCE_MIB, expected // 20)
        return abs(after.target_mib - expected) <= tolerance

    @staticmethod
    def _why(after: MemoryInfo) -> str:
        if after.used_mib is None:
            return (
                "qmemman answered OK without setting its memory: the guest reports no "
                "memory use (memory/meminfo)"
            )
        return (
            "qmemman answered OK without setting its memory (its watcher had not "
            "recorded the guest's report)"
        )

    # -- the hold after a shrink ------------------------------------------------------

    def _hold_until_paused(self, name: str, connection: _Connection) -> None:
        loop = asyncio.get_running_loop()
        timer = loop.call_later(
            self.settings.qmemman_hold_timeout, self._hold_expired, name, connection
        )
        self._hold = _Hold(name, connection, timer)

    def _hold_expired(self, name: str, connection: _Connection) -> None:
        if self._hold is not None and self._hold.connection is connection:
            log.warning(
                "shrink %s: released qmemman after %g s without a word that its pause returned",
                name,
                self.settings.qmemman_hold_timeout,
            )
            self._release_hold(name)

    def _release_hold(self, name: str) -> None:
        hold = self._hold
        if hold is None or hold.name != name:
            return
        self._hold = None
        hold.timer.cancel()
        hold.connection.release()

    # -- bookkeeping -------------------------------------------------------------------

    def exclude(self, name: str) -> None:
        super().exclude(name)
        self._release_hold(name)

    def include(self, name: str) -> None:
        # Handed out: qmemman gives a running domain memory itself, from what it reports
        # using. Current qmemman also gives memory to paused domains (Qubes #11121), so a
        # preload whose target it raised while paused takes that memory now.
        super().include(name)
        self._release_hold(name)
        self._raised.pop(name, None)

    def forget(self, name: str) -> None:
        super().forget(name)
        self._release_hold(name)
        self._raised.pop(name, None)
        self._built.pop(name, None)

    def _can_shrink_now(self) -> bool:
        return self._state is QmemmanState.OK

    def status(self) -> dict[str, Any]:
        figures = super().status()
        figures["qmemman_reachable"] = {
            QmemmanState.UNKNOWN: None,
            QmemmanState.OK: True,
            QmemmanState.BUSY: True,
            QmemmanState.DEAD: False,
        }[self._state]
        figures["qmemman_state"] = self._state.value
        figures["socket"] = str(self.settings.qmemman_socket)
        figures["qmemman_rules"] = self._rules.describe()
        figures["qubes_11121"] = self._describe_raises()
        return figures

    def _describe_raises(self) -> str | None:
        if not self._raises_seen:
            return None
        now = ", ".join(f"{name} {a} -> {b} MiB" for name, (a, b) in sorted(self._raised.items()))
        return (
            f"qmemman raised the target of a paused preload {self._raises_seen} time(s)"
            f"{f' (now: {now})' if now else ''}: Qubes #11121; a qmemman with its fix is "
            "recommended"
        )

    # -- watching: paused targets, and a qmemman coming back -------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.qmemman_check_interval)
            try:
                if (
                    self._state is not QmemmanState.OK
                    and any(d.unshrunk for d in self._domains.values())
                    and not self._request_lock.locked()
                ):
                    await self._probe()
                await self._check_paused_targets()
            except MemoryManagerError as exc:
                log.debug("memory watch: %s", exc)
            except Exception:
                # A watcher that died would stop seeing #11121 and qmemman's return.
                log.exception("memory watch failed; it goes on")
            if self.shrink_wanted():
                self._wanted_changed.set()

    async def _check_paused_targets(self) -> None:
        for name, domain in list(self._domains.items()):
            if domain.state is not DomainState.EXCLUDED:
                continue
            try:
                info = await self.backend.memory(name)
            except BackendError:
                continue  # gone: the engine hears of it from the backend
            if self._domains.get(name) is not domain or domain.state is not DomainState.EXCLUDED:
                continue
            if domain.paused_target_mib is None:
                domain.paused_target_mib = info.target_mib  # re-adopted: this is its baseline
                continue
            if info.target_mib > domain.paused_target_mib + 1 and name not in self._raised:
                self._raised[name] = (domain.paused_target_mib, info.target_mib)
                self._raises_seen += 1
                log.warning(
                    "qmemman raised the target of paused preload %s from %d to %d MiB: this "
                    "qmemman still has Qubes #11121 (it balances paused domains). The "
                    "preload cannot take the memory while paused, but takes it the moment "
                    "it is handed out; a qmemman with the fix is recommended",
                    name,
                    domain.paused_target_mib,
                    info.target_mib,
                )

    # -- the wire -----------------------------------------------------------------

    async def _request(
        self, what: str, request: str, deadline: float, name: str | None = None
    ) -> tuple[_Connection, _Answer]:
        """One request on a new connection, taking the request lock first; all by
        ``deadline``. Returns the open connection (holding the lock) and the answer; the
        caller releases it. Raises :class:`_Busy` when qmemman did not answer in time
        (then a request that went out keeps its connection until qmemman answers it),
        :class:`MemoryManagerError` for anything else, with the connection closed."""
        try:
            async with asyncio.timeout_at(deadline):
                await self._request_lock.acquire()
        except TimeoutError:
            reason = self._why_busy()
            self._set_state(QmemmanState.BUSY, reason)
            raise _Busy(f"{what}: qmemman is busy ({reason})") from None
        try:
            reader, writer = await self._connect(what)
        except BaseException:
            self._request_lock.release()
            raise
        connection = _Connection(self._request_lock, reader, writer, request.strip(), name)
        timeout = self.settings.qmemman_answer_timeout
        try:
            writer.write(request.encode("ascii"))
            async with asyncio.timeout_at(deadline):
                await writer.drain()
                untrusted_line = await reader.readuntil(b"\n")
        except TimeoutError:
            self._set_state(QmemmanState.BUSY, f"{request.strip()!r} unanswered")
            self._drain(connection)
            raise _Busy(
                f"{what}: qmemman is busy: it did not answer within {timeout:g} s (another "
                "client holds it); the request stands and is answered later"
            ) from None
        except asyncio.CancelledError:
            self._drain(connection)  # sent: qmemman executes it anyway
            raise
        except asyncio.IncompleteReadError:
            connection.release()
            raise self._failure(
                f"{what}: qmemman closed the connection without answering (see its log)"
            ) from None
        except asyncio.LimitOverrunError:
            connection.release()
            raise self._failure(f"{what}: qmemman's answer is too long") from None
        except OSError as exc:
            connection.release()
            raise self._dead(f"{what}: connection to qmemman failed: {exc}") from None
        answer = _parse_answer(untrusted_line)
        if answer is None:
            connection.release()
            text = untrusted_line.strip().decode("ascii", errors="replace")[:32]
            raise self._failure(f"{what}: qmemman answered {text!r}, not OK/FAIL/INVALID_ARG")
        self._contact()
        return connection, answer

    async def _connect(self, what: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        path = self.settings.qmemman_socket
        connect_timeout = self.settings.qmemman_connect_timeout
        try:
            async with asyncio.timeout(connect_timeout):
                return await asyncio.open_unix_connection(path, limit=MAX_ANSWER_BYTES)
        except FileNotFoundError:
            raise self._dead(f"{what}: qmemman is not running ({path} does not exist)") from None
        except ConnectionRefusedError:
            raise self._dead(f"{what}: nothing listens on {path} (qmemman died?)") from None
        except TimeoutError:
            # A Unix socket refuses nothing while its queue has room: a full one means a
            # qmemman that is alive and far behind.
            self._set_state(QmemmanState.BUSY, "its connection queue is full")
            raise _Busy(
                f"{what}: qmemman did not accept a connection within {connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise self._dead(f"{what}: cannot connect to {path}: {exc.strerror}") from None

    async def _probe(self) -> None:
        """Is qmemman there? A connection opened and closed at once (qmemman reads an
        empty request and goes on), under the request lock like any other."""
        async with self._request_lock:
            try:
                _, writer = await self._connect("check")
            except (MemoryManagerError, _Busy):
                return
            writer.close()
            self._contact()

    def _drain(self, connection: _Connection) -> None:
        """Keep a request qmemman has not answered yet until it does: it cannot be
        withdrawn, and no second connection may be opened meanwhile."""
        self._draining = connection
        task = asyncio.get_running_loop().create_task(self._drain_one(connection))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_one(self, connection: _Connection) -> None:
        loop = asyncio.get_running_loop()
        began = loop.time()
        limit = self.settings.qmemman_busy_limit
        try:
            async with asyncio.timeout(limit):
                untrusted_line = await connection.reader.readuntil(b"\n")
            answer = _parse_answer(untrusted_line)
            log.info(
                "qmemman answered %s to the earlier %r after %.1f s",
                answer.value if answer else "garbage",
                connection.request,
                loop.time() - began,
            )
            self._contact()
            name = connection.name
            domain = None if name is None else self._domains.get(name)
            if domain is not None and domain.state is DomainState.INCLUDED:
                log.info(
                    "%s: qmemman set it to its preferred size after it was handed out (a "
                    "sent request cannot be withdrawn); qmemman gives it memory again "
                    "from what it reports using",
                    name,
                )
        except TimeoutError:
            self._set_state(
                QmemmanState.DEAD, f"{connection.request!r} unanswered for {limit:g} s: hung"
            )
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            self._set_state(QmemmanState.DEAD, f"it hung up on {connection.request!r}")
        finally:
            if self._draining is connection:
                self._draining = None
            connection.release()

    def _why_busy(self) -> str:
        loop = asyncio.get_running_loop()
        if self._draining is not None:
            return f"our earlier request {self._draining.request!r} is not answered yet"
        if self._hold is not None:
            return f"held for the pause of {self._hold.name}"
        if self._last_contact is not None:
            return f"no answer for {loop.time() - self._last_contact:.0f} s"
        return "no answer"

    # -- state ------------------------------------------------------------------------

    def _contact(self) -> None:
        self._last_contact = asyncio.get_running_loop().time()
        self._set_state(QmemmanState.OK, None)

    def _contact_is_old(self) -> bool:
        if self._state is not QmemmanState.OK or self._last_contact is None:
            return True
        age = asyncio.get_running_loop().time() - self._last_contact
        return age > self.settings.qmemman_check_interval

    def _set_state(self, state: QmemmanState, why: str | None) -> None:
        previous = self._state
        self._state, self._state_why = state, why
        if state is previous:
            return
        if state is QmemmanState.OK:
            if previous is not QmemmanState.UNKNOWN:
                log.info("qmemman answers again (it was %s)", previous.value)
            self._wanted_changed.set()
        else:
            log.warning("qmemman is %s: %s", state.value, why)

    def _dead(self, message: str) -> MemoryManagerError:
        self._set_state(QmemmanState.DEAD, message)
        return self._failure(message)

    def _failure(self, message: str) -> MemoryManagerError:
        self._last_error = message
        return MemoryManagerError(message)
