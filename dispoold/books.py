"""The engine's books: every disposable it may have made, in memory and in the journal.

A disposable is in the books from before its domain is created until after it is
destroyed. :meth:`Books.move` is the only place a stage changes, and it writes the
journal in the same step, so the books in memory and on disk never disagree. Where a
disposable is (pool, taken by a request, handed out, being destroyed) follows from its
stage alone, so it can never be in two places.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from dispoold.journal import Journal, Record
from dispoold.lifecycle import POOL, Event, Stage, next_stage
from dispoold.storage import Planned
from dispoold.views import DisposableView, OriginName


class Build(StrEnum):
    """How the disposable's domain is made."""

    #: Booted from the template's kernel.
    BOOT = "boot"
    #: Restored from the template's savefile.
    RESTORE = "restore"
    #: Booted to be saved: it becomes the template's savefile, never a disposable.
    SAVE = "save"


@dataclass(eq=False)
class Disposable:
    name: str
    dispid: int
    template: str
    #: The template's fingerprint when this was made; another one now means outdated.
    fingerprint: str
    origin: OriginName
    stage: Stage
    since: float
    domid: int | None = None
    #: Paused by the engine and not unpaused since (a fact about the domain, whatever
    #: the stage: a preload taken while paused is still paused until its hand-over).
    paused: bool = False
    memory_mib: int | None = None
    #: Something an operator should know (a failed shrink), shown in status.
    note: str | None = None
    #: MiB counted in the engine's pending total until the domain exists.
    reserved_mib: int = 0
    #: Settled when the bring-up is over: ready (paused in the pool, or running for the
    #: request that took it) or failed with the reason.
    ready: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    bring_up: asyncio.Task[None] | None = None
    #: What the bring-up is waiting on right now (the boot, the shrink), so that whoever
    #: ends the disposable or takes it can cut that wait short (never the creation).
    waiting: asyncio.Future[Any] | None = None
    destroying: asyncio.Task[None] | None = None
    #: Its own volumes, in the order they were made (removed in reverse).
    volumes: list[Planned] = field(default_factory=list)
    build: Build = Build.BOOT

    def at(self, *stages: Stage) -> bool:
        """In one of ``stages`` now (a call, so that a check after an await is not
        taken for the same as one before it)."""
        return self.stage in stages

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
        )

    def view(self) -> DisposableView:
        return DisposableView(
            name=self.name,
            domid=self.domid,
            stage=self.stage.wire,
            since=self.since,
            memory_mib=self.memory_mib,
            origin=self.origin,
            note=self.note,
        )

    def settle(self, exc: BaseException | None = None) -> None:
        """End the bring-up's promise: ready (``exc`` None) or failed with ``exc``."""
        if self.ready.done():
            return
        if exc is None:
            self.ready.set_result(None)
        else:
            self.ready.set_exception(exc)
            # Retrieved here: nobody may be waiting, and that is fine.
            self.ready.exception()


class Books:
    """The disposables by name, and their journal records, kept in step."""

    def __init__(self, journal: Journal, now: Callable[[], float]) -> None:
        self._journal = journal
        self._now = now
        self._by_name: dict[str, Disposable] = {}

    def __iter__(self) -> Iterator[Disposable]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Disposable | None:
        return self._by_name.get(name)

    def open(self, dispid: int, template: str, fingerprint: str, origin: OriginName) -> Disposable:
        """A new disposable (stage ``preload``), recorded before its domain exists.

        ``dispid`` must come from :meth:`Journal.allocate_dispid` with no await since."""
        d = Disposable(
            name=f"disp{dispid}",
            dispid=dispid,
            template=template,
            fingerprint=fingerprint,
            origin=origin,
            stage=Stage.PRELOAD,
            since=self._now(),
        )
        self.adopt(d)
        return d

    def adopt(self, d: Disposable) -> None:
        """Put ``d`` (found at start-up) into the books and the journal."""
        self._by_name[d.name] = d
        self._journal.put(d.record())

    def move(self, d: Disposable, event: Event) -> Stage | None:
        """The one place a stage changes: books and journal together. Returns the new
        stage, None when ``d`` has left the books. Raises
        :class:`~dispoold.lifecycle.IllegalTransition`."""
        stage = next_stage(d.name, d.stage, event)
        if stage is None:
            del self._by_name[d.name]
            self._journal.remove(d.name)
            return None
        if stage is not d.stage:
            d.stage = stage
            d.since = self._now()
        self._journal.put(d.record())
        return stage

    def save(self, d: Disposable) -> None:
        """Write what changed besides the stage (the domid, once the domain exists)."""
        self._journal.put(d.record())

    def forget(self, d: Disposable) -> None:
        """Drop a record whose domain is found gone at start-up."""
        self._by_name.pop(d.name, None)
        self._journal.remove(d.name)

    def members(self, template: str) -> list[Disposable]:
        """The template's pool: preloads at any stage before a request takes them."""
        return [
            d
            for d in self._by_name.values()
            if d.template == template and d.stage in POOL and d.origin != "prepare"
        ]

    def in_stage(self, *stages: Stage) -> list[Disposable]:
        return [d for d in self._by_name.values() if d.stage in stages]

    def dispids(self) -> frozenset[int]:
        return frozenset(d.dispid for d in self._by_name.values())

    def templates(self) -> set[str]:
        return {d.template for d in self._by_name.values()}
