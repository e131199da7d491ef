"""A stand-in for Qubes' qmemman: its client protocol, its balancing and its known faults.

It behaves like qmemman as it really runs (Qubes core-admin, ``qubes/tools/qmemmand.py``,
``qubes/qmemman/systemstate.py`` and ``algo.py``, as issue 14 measured it against the
lab), in each point a client can see:

- **Protocol.** A Unix socket; one request per connection, an ASCII line.
  ``<bytes>``: free that much memory for a domain about to be created (ballooning the
  others down). ``<domid>:<bytes> ...``: set those domains' memory, 0 meaning
  "preferred", and wait until each has converged (actual / target <= 1.1) or stopped
  moving (after 3 s, the last second moved less than 100 MiB): ``OK``, else ``FAIL``.
  A line it cannot parse is ``INVALID_ARG``; an unknown domid ends the connection
  without an answer (qmemman dies in the handler). A second line on the same
  connection ends it too ("Second request over qmemman.sock?").
- **One client at a time.** qmemman's socket server handles one connection at a time:
  a second client connects (the kernel queues it) but is not read until the first has
  hung up. The handler takes the global lock before answering and keeps it until the
  client hangs up; then qmemman balances again.
- **The watcher waits on the same lock.** A change of a domain's ``memory/meminfo`` (the
  guest reports its used memory there, in KiB) is recorded only under the global lock,
  and each change is followed by a balance. While a client holds the lock, a fresh
  domain's report waits; a shrink request for it that gets the lock first finds no
  report and answers ``OK`` without ballooning ("meminfo was not reported back").
  (Python's lock is not fair: a handler waiting on ``acquire`` gets it before the
  watcher, which retries.)
- **Preferred size** = max(min(used x cache-margin-factor, static max), vm-min-mem),
  from ``qmemman.conf`` (``[global]``), where sizes are parsed as Qubes'
  ``parse_size`` does: ``200M`` is decimal (200,000,000 bytes = 190.7 MiB); without the
  file the defaults are 1.3 and 200 MiB.
- **Targets.** qmemman's ``mem_set(val)`` sets Xen's maxmem to val + 1 MiB and writes
  ``memory/target`` = val - 16 MiB ("VM sees about 16MB memory less"); when it starts,
  it takes a domain's last target from ``memory/target`` as it is.
- **Qubes #11121** (``fixed_11121=False``, the default, as in current qmemman): paused
  domains take part in balancing like any other, so with memory to spare each balance,
  and each restart, raises their targets (up to their maxmem) although a paused
  balloon cannot take it. ``fixed_11121=True`` leaves paused domains out.
- **Available memory** is published after each balance in ``qmemman-avail-mem``
  (written to a temporary file and renamed): free memory less what the domains need to
  reach their preferred size; it can be negative. A stopped stand-in leaves it behind.

dom0 is left out (the lab's dom0 has a fixed size). Two hypervisors are supported:
:class:`BalloonHypervisor` over the host tests' balloon double, and :class:`XenHypervisor`
over real Xen (the lab), where the stand-in runs as a process::

    python -m tests.qmemman_standin --socket S --avail-file F [--config C] [--fixed-11121]

Timing constants are qmemman's by default and can be scaled down for host tests.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger("qmemman-standin")

MIB = 1024 * 1024
KIB = 1024
#: qmemman keeps this much of Xen's memory free when balancing, and at least this much
#: when ballooning for a request (systemstate.py).
XEN_FREE_MEM_LEFT = 50 * MIB
XEN_FREE_MEM_MIN = 25 * MIB
#: What ``mem_set`` writes to ``memory/target`` below the value it sets, and what it adds
#: to Xen's maxmem above it.
TARGET_OFFSET = 16 * MIB
MAXMEM_SLACK = 1 * MIB
#: A balance is not worth doing for less than this in total (is_balance_req_significant).
MIN_TOTAL_MEMORY_TRANSFER = 150 * MIB
MIN_MEM_CHANGE_WHEN_UNDER_PREF = 15 * MIB

#: No report read yet (not even "there is no memory/meminfo").
_UNSEEN = object()

#: What the server does instead of answering (tests of the protocol's failure modes).
NO_ANSWER = "<no answer>"  # keep the connection open, say nothing
HANG_UP = "<hang up>"  # close the connection without an answer (qmemman on an exception)


def parse_size(text: str) -> int:
    """A size as Qubes' ``qubes.utils.parse_size`` reads it: digits are bytes; K, M, G
    (and KB, MB, GB) are powers of 1000; Ki, Mi, Gi (KiB, MiB, GiB) powers of 1024."""
    units = [
        ("K", 1000),
        ("KB", 1000),
        ("M", 1000**2),
        ("MB", 1000**2),
        ("G", 1000**3),
        ("GB", 1000**3),
        ("Ki", 1024),
        ("KiB", 1024),
        ("Mi", 1024**2),
        ("MiB", 1024**2),
        ("Gi", 1024**3),
        ("GiB", 1024**3),
    ]
    size = text.strip().upper()
    if size.isdigit():
        return int(size)
    for unit, multiplier in units:
        if size.endswith(unit.upper()):
            number = size[: -len(unit)].strip()
            if number.isdigit():
                return int(number) * multiplier
    raise ValueError(f"invalid size: {text!r}")


@dataclass(frozen=True)
class Rules:
    """qmemman's preferred-size settings (``qmemman.conf``, section ``[global]``)."""

    min_prefmem: int = 200 * MIB
    cache_factor: float = 1.3

    @classmethod
    def parse(cls, text: str) -> Rules:
        parser = configparser.ConfigParser()
        parser.read_string(text)
        if not parser.has_section("global"):
            return cls()
        section = parser["global"]
        return cls(
            min_prefmem=parse_size(section.get("vm-min-mem", str(200 * MIB))),
            cache_factor=float(section.get("cache-margin-factor", "1.3")),
        )


@dataclass(frozen=True)
class Timing:
    """qmemman's clock: the poll interval and the give-up rule (CHECK_PERIOD_S, CHECK_MB_S)."""

    poll: float = 0.1
    check_period: float = 3.0
    check_mb_s: float = 100.0
    window: float = 1.0
    #: How often the watcher looks for meminfo changes (qmemman gets xenstore watch
    #: events; polling stands in for them).
    watch: float = 0.1


@dataclass
class Seen:
    """A domain as the hypervisor shows it."""

    domid: int
    current: int  # bytes
    maxmem: int  # bytes (memory/static-max)
    paused: bool


class Hypervisor(Protocol):
    """What the stand-in needs from the host: the calls qmemman makes to Xen."""

    async def domains(self) -> list[Seen]:
        """Every domain but dom0."""

    async def free(self) -> int:
        """Xen's free memory, bytes."""

    async def meminfo(self, domid: int) -> str | None:
        """``/local/domain/<domid>/memory/meminfo``, or None when it does not exist."""

    async def xenstore_target(self, domid: int) -> int | None:
        """``memory/target`` in bytes, or None."""

    async def mem_set(self, domid: int, value: int) -> None:
        """qmemman's mem_set: Xen maxmem = value + 1 MiB, ``memory/target`` = value - 16 MiB."""


@dataclass
class DomainState:
    domid: int
    current: int = 0
    maxmem: int = 0
    paused: bool = False
    last_target: int = 0
    #: Used memory from memory/meminfo (bytes), None until the guest reported it.
    mem_used: int | None = None
    no_progress: bool = False

    @property
    def actual(self) -> int:
        return max(self.current, self.last_target)


@dataclass
class Request:
    line: str
    answer: str = ""
    #: Seconds between the answer and the client closing the connection.
    held: float | None = None
    #: The client had hung up before qmemman was done with the request.
    gone_before_answer: bool = False
    answered_at: float | None = None
    closed_at: float | None = None


@dataclass
class QmemmanStandIn:
    path: Path
    hypervisor: Hypervisor
    avail_file: Path | None = None
    rules: Rules = field(default_factory=Rules)
    timing: Timing = field(default_factory=Timing)
    fixed_11121: bool = False
    #: Answers forced by request kind ("free", "set", "invalid"): OK, FAIL, INVALID_ARG,
    #: NO_ANSWER, HANG_UP or anything else (sent as it is). Without one, the stand-in
    #: does what qmemman does.
    answers: dict[str, str] = field(default_factory=dict)
    #: Extra seconds a request takes before it is answered (ballooning elsewhere).
    delay: float = 0.0

    def __post_init__(self) -> None:
        #: The global lock: held by a client from its request until it hangs up, and by
        #: the watcher while it records a report and balances.
        self.lock = asyncio.Lock()
        #: The socket server handles one connection at a time.
        self._serving = asyncio.Lock()
        self.domains: dict[int, DomainState] = {}
        self.requests: list[Request] = []
        #: Notable things qmemman would log, for assertions.
        self.events: list[str] = []
        self.open_now = 0
        self.max_open = 0
        self.second_lines = 0
        self.balances = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._meminfo_seen: dict[int, object] = {}

    # -- life -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start (or restart) qmemman: learn the domains, balance, serve."""
        self.domains.clear()
        self._meminfo_seen.clear()
        async with self.lock:
            await self._refresh()
            for domain in self.domains.values():
                # Read once at start, as the watcher's first event does.
                await self._record_meminfo(domain)
            await self._balance()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        self._spawn(self._watch())

    async def stop(self) -> None:
        """Stop qmemman (its available-memory file stays behind, as qmemman's does)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def __aenter__(self) -> QmemmanStandIn:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def tasks(self) -> set[asyncio.Task[Any]]:
        return set(self._tasks)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- the rules --------------------------------------------------------------------

    def pref(self, domain: DomainState) -> int:
        """algo.pref_mem: the floor wins over maxmem."""
        used = domain.mem_used or 0
        return int(max(min(used * self.rules.cache_factor, domain.maxmem), self.rules.min_prefmem))

    def _participants(self) -> list[DomainState]:
        return [
            d
            for d in self.domains.values()
            if d.mem_used is not None
            and not d.no_progress
            and not (self.fixed_11121 and d.paused)  # the fix of Qubes #11121
        ]

    async def _refresh(self) -> None:
        seen = {s.domid: s for s in await self.hypervisor.domains()}
        for domid in list(self.domains):
            if domid not in seen:
                del self.domains[domid]
                self._meminfo_seen.pop(domid, None)
        for domid, s in seen.items():
            domain = self.domains.get(domid)
            if domain is None:
                domain = self.domains[domid] = DomainState(domid)
                # add_domain: the last target is memory/target as it is (no offset).
                domain.last_target = await self.hypervisor.xenstore_target(domid) or 0
            domain.current, domain.maxmem, domain.paused = s.current, s.maxmem, s.paused

    async def _free(self) -> int:
        assigned_but_unused = sum(max(0, d.last_target - d.current) for d in self.domains.values())
        return await self.hypervisor.free() - assigned_but_unused

    async def _mem_set(self, domain: DomainState, value: int) -> None:
        value = max(0, min(value, domain.maxmem))
        domain.last_target = value
        self.events.append(f"mem-set domain {domain.domid} to {value}")
        await self.hypervisor.mem_set(domain.domid, value)

    async def _record_meminfo(self, domain: DomainState) -> bool:
        """Read the domain's report; True when it changed."""
        untrusted = await self.hypervisor.meminfo(domain.domid)
        if self._meminfo_seen.get(domain.domid) == untrusted:
            return False
        self._meminfo_seen[domain.domid] = untrusted
        if untrusted is None or not untrusted.strip():
            return False
        untrusted = untrusted.strip()
        domain.mem_used = int(untrusted) * KIB if untrusted.isdigit() else None
        return True

    async def _balance(self) -> None:
        """systemstate.do_balance, with the lock held."""
        self.balances += 1
        await self._refresh()
        for d in self.domains.values():  # clear_outdated_error_markers, simplified
            if d.mem_used is not None and d.actual <= d.last_target + XEN_FREE_MEM_LEFT // 2:
                d.no_progress = False
        xenfree = await self._free()
        participants = self._participants()
        needed = sum(self.pref(d) - d.actual for d in participants)
        available = xenfree - XEN_FREE_MEM_LEFT - needed
        targets: dict[int, int] = {}
        if available > 0:
            total_pref = sum(self.pref(d) for d in participants) or 1
            for d in participants:
                share = self.pref(d) / total_pref * available
                targets[d.domid] = min(int(0.999 * (self.pref(d) + share)), d.maxmem)
        else:
            for d in participants:
                if d.actual - self.pref(d) >= 10 * MIB:
                    targets[d.domid] = self.pref(d)
        moving = sum(abs(t - self.domains[i].last_target) for i, t in targets.items())
        below_pref = any(
            0 < self.domains[i].last_target < self.pref(self.domains[i])
            and t - self.domains[i].last_target > MIN_MEM_CHANGE_WHEN_UNDER_PREF
            for i, t in targets.items()
        )
        if (
            XEN_FREE_MEM_LEFT - xenfree <= MIN_MEM_CHANGE_WHEN_UNDER_PREF
            and not below_pref
            and moving + abs(xenfree - XEN_FREE_MEM_LEFT) <= MIN_TOTAL_MEMORY_TRANSFER
        ):
            targets = {}

        # Donors first, then those that get memory.
        def gain(item: tuple[int, int]) -> int:
            return item[1] - self.domains[item[0]].actual

        for domid, target in sorted(targets.items(), key=gain):
            await self._mem_set(self.domains[domid], target)
        await self._publish(xenfree - XEN_FREE_MEM_LEFT - needed)

    async def _publish(self, available: int) -> None:
        if self.avail_file is None:
            return
        tmp = self.avail_file.with_suffix(".tmp")
        await asyncio.to_thread(tmp.write_text, str(int(available)), "ascii")
        os.replace(tmp, self.avail_file)

    # -- the watcher -------------------------------------------------------------------

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.timing.watch)
            domains = {s.domid for s in await self.hypervisor.domains()}
            changed = [
                domid
                for domid in domains
                if await self.hypervisor.meminfo(domid) != self._meminfo_seen.get(domid, _UNSEEN)
            ]
            listed = domains != set(self.domains)
            if not changed and not listed:
                continue
            await self._acquire_unfairly()
            try:
                await self._refresh()
                for domid in changed:
                    domain = self.domains.get(domid)
                    if domain is not None:
                        await self._record_meminfo(domain)
                await self._balance()
            finally:
                self.lock.release()

    async def _acquire_unfairly(self) -> None:
        """threading.Lock is not fair: whoever asks while it is free gets it. A handler
        waits in acquire() and is served first; the watcher and the balance that follows
        a client's hang-up try again a little later (polling on purpose)."""
        while self.lock.locked():  # noqa: ASYNC110
            await asyncio.sleep(self.timing.poll / 2)
        await self.lock.acquire()

    # -- the socket ----------------------------------------------------------------------

    @staticmethod
    def kind(line: str) -> str:
        words = line.split()
        if line.isdigit():
            return "free"
        if words and all(_is_pair(word) for word in words):
            return "set"
        return "invalid"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        loop = asyncio.get_running_loop()
        got_lock = False
        try:
            async with self._serving:  # one connection at a time
                data = (await reader.read(1024)).strip().decode("ascii", "replace")
                if not data:
                    return  # "client disconnected"
                request = Request(data)
                self.requests.append(request)
                await self.lock.acquire()
                got_lock = True
                answer = await self._execute(request)
                request.gone_before_answer = reader.at_eof()
                request.answer = answer
                if answer == HANG_UP:
                    return
                if answer == NO_ANSWER:
                    await reader.read()
                    return
                writer.write(f"{answer}\n".encode("ascii"))
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                request.answered_at = loop.time()
                # qmemman keeps the lock until the client hangs up.
                if await reader.read(1024):
                    self.second_lines += 1
                    self.events.append("Second request over qmemman.sock?")
                request.closed_at = loop.time()
                request.held = request.closed_at - request.answered_at
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_now -= 1
            writer.close()
            if task is not None:
                self._tasks.discard(task)
            if got_lock:
                self.lock.release()
                # "resuming membalance": a balance once the client has gone.
                self._spawn(self._balance_when_free())

    async def _balance_when_free(self) -> None:
        await self._acquire_unfairly()
        try:
            await self._balance()
        finally:
            self.lock.release()

    async def _execute(self, request: Request) -> str:
        kind = self.kind(request.line)
        if self.delay:
            await asyncio.sleep(self.delay)
        forced = self.answers.get(kind)
        if forced is not None:
            return forced
        if kind == "invalid":
            return "INVALID_ARG"
        if kind == "free":
            return "OK" if await self._balloon(int(request.line)) else "FAIL"
        result = await self._set(request.line)
        return "OK" if result else ("FAIL" if result is False else HANG_UP)

    async def _balloon(self, memsize: int) -> bool:
        """systemstate.do_balloon: make ``memsize`` bytes free, taking memory from
        domains above their preferred size; fail when it stops coming."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        history: list[tuple[float, int]] = []
        previous: dict[int, int] = {}
        for d in self.domains.values():
            d.no_progress = False
        while True:
            await self._refresh()
            xenfree = await self._free()
            if xenfree >= memsize + XEN_FREE_MEM_MIN:
                return True
            now = loop.time()
            history.append((now, xenfree))
            if _stalled(history, now, started, self.timing, rising=True):
                return False
            for domid, actual in previous.items():
                domain = self.domains.get(domid)
                if domain is not None and domain.actual == actual:
                    domain.no_progress = True
            donors = [
                (d, d.actual - self.pref(d))
                for d in self._participants()
                if d.actual > self.pref(d)
            ]
            spare = sum(amount for _, amount in donors)
            wanted = memsize + XEN_FREE_MEM_LEFT - xenfree
            if spare < wanted or not donors:
                return False
            previous = {}
            for domain, amount in donors:
                borrowed = amount * wanted / spare * 1.05
                await self._mem_set(domain, int(domain.actual - borrowed))
                previous[domain.domid] = domain.actual
            await asyncio.sleep(self.timing.poll)

    async def _set(self, line: str) -> bool | None:
        """The set request: each domain to its value (0: preferred), then wait until
        each converged (True), or one stopped moving (False). None: an unknown domid
        (qmemman dies in the handler)."""
        loop = asyncio.get_running_loop()
        await self._refresh()
        wanted: dict[int, int] = {}
        for word in line.split():
            domid_text, _, value_text = word.partition(":")
            domain = self.domains.get(int(domid_text))
            if domain is None:
                self.events.append(f"set for unknown domain {domid_text}")
                return None
            value = int(value_text)
            if value == 0:
                if domain.mem_used is None:
                    self.events.append(
                        f"dom {domain.domid}: meminfo was not reported back, skipping"
                    )
                    continue
                value = self.pref(domain)
            wanted[domain.domid] = min(value, domain.maxmem)
        started = loop.time()
        histories: dict[int, list[tuple[float, int]]] = {d: [] for d in wanted}
        while wanted:
            await self._refresh()
            now = loop.time()
            for domid in list(wanted):
                domain = self.domains.get(domid)
                if domain is None:
                    del wanted[domid]
                    continue
                if domain.current / max(wanted[domid], 1) <= 1.1:
                    del wanted[domid]
                    continue
                histories[domid].append((now, domain.current))
                if _stalled(histories[domid], now, started, self.timing, rising=False):
                    self.events.append(f"dom {domid} stuck at {domain.current}")
                    return False
                await self._mem_set(domain, wanted[domid])
            if wanted:
                await asyncio.sleep(self.timing.poll)
        return True


def _is_pair(word: str) -> bool:
    domid, sep, value = word.partition(":")
    return bool(sep) and domid.isdigit() and value.isdigit()


def _stalled(
    history: list[tuple[float, int]], now: float, started: float, timing: Timing, *, rising: bool
) -> bool:
    """qmemman's give-up rule: after the check period, give up when the last window
    (a second) moved less than CHECK_MB_S per second (free memory rising while
    ballooning for a request, a domain's size falling in a set request)."""
    if now - started < timing.check_period:
        return False
    baseline = None
    for sample in history:  # the newest sample at least a window old
        if sample[0] <= now - timing.window:
            baseline = sample
    if baseline is None:
        return False
    latest = history[-1][1]
    moved = latest - baseline[1] if rising else baseline[1] - latest
    return moved < timing.check_mb_s * MIB * (now - baseline[0])


# -- hypervisors ------------------------------------------------------------------------


class BalloonHypervisor:
    """The host tests' hypervisor: :class:`tests.memory_doubles.BalloonBackend`."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def _by_domid(self, domid: int) -> Any:
        for domain in self.backend.domains.values():
            if domain.domid == domid:
                return domain
        return None

    async def domains(self) -> list[Seen]:
        self.backend.advance()
        return [
            Seen(d.domid, d.memory_mib * MIB, d.maxmem_mib * MIB, d.paused)
            for d in self.backend.domains.values()
        ]

    async def free(self) -> int:
        self.backend.advance()
        return int(self.backend.free_mib() * MIB)

    async def meminfo(self, domid: int) -> str | None:
        domain = self._by_domid(domid)
        return None if domain is None else self.backend.xenstore_read(domain.name, "memory/meminfo")

    async def xenstore_target(self, domid: int) -> int | None:
        domain = self._by_domid(domid)
        return None if domain is None else domain.target_mib * MIB

    async def mem_set(self, domid: int, value: int) -> None:
        domain = self._by_domid(domid)
        if domain is not None:
            self.backend.qmemman_set(domain.name, value)


class XenHypervisor:
    """Real Xen, through dispoold's own bindings (the stand-in as a process in dom0)."""

    def __init__(self) -> None:
        from dispoold.xen import bindings
        from dispoold.xen.libxl import Libxl
        from dispoold.xen.xenstore import XenStore

        ffi, lib = bindings.load()
        self.xl = Libxl(ffi, lib)
        self.xl.open("error")
        self.xs = XenStore(ffi, lib)
        self.xs.open()

    def _domains(self) -> list[Seen]:
        seen = []
        for info in self.xl.list_domains():
            if info.domid == 0 or info.dying or info.shutdown:
                continue
            static = self.xs.read(f"/local/domain/{info.domid}/memory/static-max")
            maxmem = int(static) * KIB if static and static.isdigit() else info.max_memkb * KIB
            seen.append(Seen(info.domid, info.current_memkb * KIB, maxmem, info.paused))
        return seen

    async def domains(self) -> list[Seen]:
        return await asyncio.to_thread(self._domains)

    async def free(self) -> int:
        return await asyncio.to_thread(self.xl.free_memory_kib) * KIB

    async def meminfo(self, domid: int) -> str | None:
        return await asyncio.to_thread(self.xs.read, f"/local/domain/{domid}/memory/meminfo")

    async def xenstore_target(self, domid: int) -> int | None:
        value = await asyncio.to_thread(self.xs.read, f"/local/domain/{domid}/memory/target")
        return int(value) * KIB if value and value.isdigit() else None

    def _mem_set(self, domid: int, value: int) -> None:
        # libxl sets Xen's maxmem to the target + 1 MiB, as qmemman's xc call does; then
        # the balloon target goes 16 MiB lower, as qmemman writes it.
        self.xl.set_memory_target(domid, value // KIB)
        self.xs.write(
            f"/local/domain/{domid}/memory/target", str(max(0, value - TARGET_OFFSET) // KIB)
        )

    async def mem_set(self, domid: int, value: int) -> None:
        with contextlib.suppress(Exception):  # the domain may be on its way out
            await asyncio.to_thread(self._mem_set, domid, value)


# -- as a process (the lab) -----------------------------------------------------------------


@dataclass(frozen=True)
class Running:
    """A stand-in process: where it listens and publishes, and its settings file."""

    socket: Path
    avail_file: Path
    config: Path


@contextlib.asynccontextmanager
async def process_over_xen(
    config_text: str, *, fixed_11121: bool = False, logs: Path | None = None
) -> AsyncIterator[Running]:
    """Run the stand-in as a process over real Xen (in dom0) until the block ends."""
    rundir = Path(tempfile.mkdtemp(prefix="qm", dir="/run"))
    running = Running(rundir / "qmemman.sock", rundir / "qmemman-avail-mem", rundir / "q.conf")
    running.config.write_text(config_text)
    logs = logs or rundir
    tag = "fixed" if fixed_11121 else "current"
    argv = [
        sys.executable,
        "-m",
        "tests.qmemman_standin",
        "--socket",
        str(running.socket),
        "--avail-file",
        str(running.avail_file),
        "--config",
        str(running.config),
        "--log",
        str(logs / f"qmemman-standin-{tag}-events.log"),
        *(["--fixed-11121"] if fixed_11121 else []),
    ]
    with (logs / f"qmemman-standin-{tag}.log").open("ab") as output:
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=output, stderr=asyncio.subprocess.STDOUT
        )
    try:
        for _ in range(600):  # it publishes its figure once it serves
            if running.avail_file.exists() or process.returncode is not None:
                break
            await asyncio.sleep(0.1)
        if process.returncode is not None or not running.socket.exists():
            raise RuntimeError(f"the qmemman stand-in did not start (see {logs})")
        yield running
    finally:
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()
        shutil.rmtree(rundir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="qmemman stand-in over real Xen")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--avail-file", type=Path, required=True)
    parser.add_argument("--config", type=Path, help="qmemman.conf ([global] vm-min-mem, ...)")
    parser.add_argument("--fixed-11121", action="store_true", help="leave paused domains out")
    parser.add_argument("--log", type=Path, help="append notable events here")
    parser.add_argument("--watch-interval", type=float, default=Timing.watch)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="qmemman-standin: %(message)s")
    rules = Rules.parse(args.config.read_text()) if args.config else Rules()

    async def serve() -> None:
        standin = QmemmanStandIn(
            args.socket,
            XenHypervisor(),
            args.avail_file,
            rules,
            Timing(watch=args.watch_interval),
            fixed_11121=args.fixed_11121,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await standin.start()
        log.info("serving on %s (%s)", args.socket, rules)
        reported = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await stop.wait()
            if args.log is not None and len(standin.events) > reported:
                with args.log.open("a") as f:
                    f.writelines(e + "\n" for e in standin.events[reported:])
                reported = len(standin.events)
        await standin.stop()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
