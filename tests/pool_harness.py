"""The pool engine wired to the test doubles, for unit and property tests.

A :class:`Harness` is one daemon lifetime. The backend (the "hypervisor"), the journal
file and the wall clock outlive it, so a test can crash a daemon (abandon its event loop
without any clean-up, as ``kill -9`` would) and start the next one on what is left.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dispoold.books import Disposable
from dispoold.config import Config, MemorySettings
from dispoold.events import EventBus, PoolEvent
from dispoold.journal import Journal, Record
from dispoold.lifecycle import HANDED_OUT, POOL, Stage
from dispoold.pool import Pool
from dispoold.storage import Storage
from tests.doubles import FakeBackend, FakeMemory

LOG = logging.getLogger("dispoold.test")


def make_config(templates: dict[str, dict[str, Any]] | None = None, **pool: Any) -> Config:
    """A configuration with three templates unless told otherwise: ``dvm`` (the default
    disposable template, max 2), ``alt`` (max 1; both tagged ``work``) and ``appvm``
    (not a disposable template)."""
    sources: dict[str, Any] = {}
    if templates is None:
        sources = {"work": {"default_dispvm": "alt"}, "nodefault": {"default_dispvm": ""}}
        templates = {
            "dvm": {"preload_max": 2, "memory": 400, "tags": ["work"]},
            "alt": {"preload_max": 1, "memory": 400, "tags": ["work"]},
            "appvm": {"dispvm_template": False, "memory": 400},
        }
    pool = {"default_dispvm": "dvm", "refresh_check_interval": 3600.0, **pool}
    return Config.model_validate(
        {
            "pool": pool,
            "templates": templates,
            "sources": sources,
        }
    )


class RecordingBus(EventBus):
    """Keeps every event, in order, as it is published."""

    def __init__(self, log: list[PoolEvent]) -> None:
        super().__init__()
        self._log = log

    def publish(self, name: str, data: dict[str, Any]) -> PoolEvent:
        event = super().publish(name, data)
        self._log.append(event)
        return event


class Wall:
    """Wall-clock time that follows the running loop's virtual clock and keeps going
    across daemon lifetimes (each of which starts a new loop at 0)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self.offset = start
        self.last = start

    def __call__(self) -> float:
        try:
            now = self.offset + asyncio.get_running_loop().time()
        except RuntimeError:
            now = self.last
        self.last = max(self.last, now)
        return self.last

    def new_lifetime(self, skip: float = 0.0) -> None:
        self.offset = self.last + skip


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        config: Config | None = None,
        *,
        backend: FakeBackend | None = None,
        wall: Wall | None = None,
        storage: Storage | None = None,
    ) -> None:
        self.tmp_path = tmp_path
        self.config = config or make_config()
        self.backend = backend or FakeBackend()
        self.storage = storage
        self.wall = wall or Wall()
        # Preferred size = the templates' 400 MiB: shrinking frees nothing unless a test says so.
        self.memory = FakeMemory(MemorySettings(preferred_floor_mib=400), self.backend)
        self.events: list[PoolEvent] = []
        self.journal: Journal | None = None
        self._pool: Pool | None = None

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("the harness has not started")
        return self._pool

    async def start(self) -> Pool:
        await self.backend.open()
        # Seeded: hypothesis replays a scenario and needs the same dispids each time.
        self.journal = Journal(
            self.tmp_path / "journal.sqlite", log=LOG, now=self.wall, rng=random.Random(7)
        )
        bus = RecordingBus(self.events)
        self._pool = Pool(
            self.config,
            backend=self.backend,
            memory=self.memory,
            journal=self.journal,
            bus=bus,
            log=LOG,
            now=self.wall,
            storage=self.storage,
        )
        await self.pool.start()
        return self.pool

    async def stop(self, drain: float = 30.0) -> None:
        await self.pool.stop(drain)
        self.check_healthy()
        await self.backend.close()
        if self.journal is not None:
            self.journal.close()

    def records_on_disk(self) -> list[Record]:
        """The journal as the next start would read it (as a new process opens it)."""
        journal = Journal(self.tmp_path / "journal.sqlite", log=LOG, now=self.wall)
        try:
            return journal.records()
        finally:
            journal.close()

    def close_journal(self) -> None:
        if self.journal is not None:
            self.journal.close()

    def next_lifetime(self, config: Config | None = None, skip: float = 0.0) -> Harness:
        """The harness for the daemon's next start, on the same host and state."""
        self.wall.new_lifetime(skip)
        return Harness(
            self.tmp_path,
            config or self.config,
            backend=self.backend,
            wall=self.wall,
            storage=self.storage,
        )

    # -- looking at the books -------------------------------------------------------

    @property
    def books(self) -> dict[str, Disposable]:
        return {d.name: d for d in self.pool.books}

    def status(self, template: str | None = None) -> dict[str, Any]:
        """The engine's status as the wire carries it."""
        return self.pool.status(template).model_dump()

    def names(self, *stages: Stage, template: str | None = None) -> list[str]:
        return sorted(
            d.name
            for d in self.books.values()
            if (not stages or d.stage in stages) and (template is None or d.template == template)
        )

    def pool_members(self, template: str) -> list[str]:
        return self.names(*POOL, template=template)

    def handed_out(self) -> list[str]:
        return self.names(*HANDED_OUT)

    def event_names(self, *names: str) -> list[str]:
        return [e.name for e in self.events if not names or e.name in names]

    def events_of(self, name: str) -> list[dict[str, Any]]:
        return [e.data for e in self.events if e.name == name]

    def check_healthy(self) -> None:
        """No background part of the engine died (it would have stopped the daemon)."""
        if self.pool.fatal.done():
            raise AssertionError("the engine failed") from self.pool.fatal.exception()

    def check_books(self) -> None:
        """Every domain the backend holds is in the books exactly once (the books are
        keyed by name, and a stage says where it is), and every entry whose domain was
        created still has it unless it is being destroyed."""
        missing = set(self.backend.domains) - set(self.books)
        assert not missing, f"domains outside the books: {sorted(missing)}"
        for d in self.books.values():
            if d.domid is not None and d.stage is not Stage.DESTROYING:
                assert d.name in self.backend.domains, f"{d.name} ({d.stage}) has no domain"


async def settle(seconds: float = 120.0) -> None:
    """Let the engine run for ``seconds`` of virtual time."""
    await asyncio.sleep(seconds)


def stages(harness: Harness, names: Iterable[str]) -> list[Stage]:
    return [harness.books[name].stage for name in names]
