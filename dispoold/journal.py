"""The engine's books on disk: one SQLite file in the state directory.

The engine writes a disposable's record *before* it creates the domain, updates it on
every stage change, and deletes it only once the domain is destroyed. So after a crash
at any point the journal lists every domain the daemon may have made, with the last
stage it was known to be in; restart recovery (:mod:`dispoold.recovery`) decides from
that. WAL mode keeps a process crash from losing a committed write.

Each volume of a disposable is recorded before it is made and forgotten once it is
removed, so that recovery removes the volumes of half-started disposables and of those
whose domain is gone. Also kept here: dispids freed recently (Qubes keeps these in
memory only, so they were forgotten on restart), and the operator's run-time overrides
of the configuration (``set_max``, ``set_threshold``).
"""

from __future__ import annotations

import logging
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from dispoold.config import DISPIDS
from dispoold.errors import DispidsExhausted
from dispoold.lifecycle import Stage
from dispoold.storage import Planned

#: Random picks before falling back to a scan (Qubes gives up after 100 picks; we only
#: give up when no dispid at all is free).
RANDOM_PICKS = 100

SCHEMA_VERSION = 3
SCHEMA = """
CREATE TABLE IF NOT EXISTS disposables (
    name        TEXT PRIMARY KEY,
    dispid      INTEGER NOT NULL UNIQUE,
    template    TEXT NOT NULL,
    stage       TEXT NOT NULL,
    since       REAL NOT NULL,
    domid       INTEGER,
    origin      TEXT NOT NULL,
    fingerprint TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS freed_dispids (
    dispid   INTEGER PRIMARY KEY,
    freed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS volumes (
    pool       TEXT NOT NULL,
    name       TEXT NOT NULL,
    disposable TEXT NOT NULL,
    vdev       TEXT NOT NULL,
    PRIMARY KEY (pool, name)
);
"""
#: How a journal of each older version becomes the next one (run in one transaction).
MIGRATIONS: dict[int, str] = {
    # 1 -> 2: "requested and delivered" became a stage of its own (handed out paused).
    1: """
    UPDATE disposables SET stage = 'handed-paused' WHERE stage = 'requested' AND delivered;
    ALTER TABLE disposables DROP COLUMN delivered;
    """,
    # 2 -> 3: volumes, recorded before they are made.
    2: """
    CREATE TABLE volumes (pool TEXT NOT NULL, name TEXT NOT NULL, disposable TEXT NOT NULL,
                          vdev TEXT NOT NULL, PRIMARY KEY (pool, name));
    """,
}


@dataclass(frozen=True, slots=True)
class Record:
    name: str
    dispid: int
    template: str
    stage: Stage
    since: float
    domid: int | None
    origin: str
    fingerprint: str


class Journal:
    def __init__(
        self,
        path: Path | str,
        *,
        log: logging.Logger,
        now: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.path = Path(path)
        self._log = log
        self._now = now
        self._rng = rng or random.SystemRandom()
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.DatabaseError as exc:
            # A damaged journal must not keep the daemon down: keep it for inspection and
            # start afresh; recovery then reconciles the domains from their markers.
            aside = self.path.with_name(f"{self.path.name}.damaged-{int(self._now())}")
            self._log.error("journal %s is damaged (%s); moved to %s", self.path, exc, aside)
            self.path.rename(aside)
            for suffix in ("-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            return self._connect()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(
                    f"schema version {version} is newer than this dispoold's {SCHEMA_VERSION}"
                )
            if version == 0:
                db.executescript(SCHEMA)
            for old in range(version or SCHEMA_VERSION, SCHEMA_VERSION):
                db.executescript(f"BEGIN IMMEDIATE; {MIGRATIONS[old]} COMMIT;")
                self._log.info("journal %s: schema %d -> %d", self.path, old, old + 1)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- disposables ---------------------------------------------------------------

    def records(self) -> list[Record]:
        with closing(self._db.execute("SELECT * FROM disposables ORDER BY since")) as rows:
            return [
                Record(
                    name=name,
                    dispid=dispid,
                    template=template,
                    stage=Stage(stage),
                    since=since,
                    domid=domid,
                    origin=origin,
                    fingerprint=fingerprint,
                )
                for (name, dispid, template, stage, since, domid, origin, fingerprint) in rows
            ]

    def put(self, record: Record) -> None:
        """Insert or update the record of ``record.name``."""
        self._db.execute(
            "INSERT INTO disposables VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT(name) DO UPDATE SET stage=excluded.stage, since=excluded.since,"
            " domid=excluded.domid",
            (
                record.name,
                record.dispid,
                record.template,
                record.stage.value,
                record.since,
                record.domid,
                record.origin,
                record.fingerprint,
            ),
        )

    def remove(self, name: str, *, quarantine: bool = True) -> None:
        """Forget the disposable; its dispid stays unusable for the quarantine period."""
        with self._transaction() as db:
            row = db.execute("SELECT dispid FROM disposables WHERE name = ?", (name,)).fetchone()
            if row is None:
                return
            db.execute("DELETE FROM disposables WHERE name = ?", (name,))
            if quarantine:
                db.execute(
                    "INSERT OR REPLACE INTO freed_dispids VALUES (?, ?)", (row[0], self._now())
                )

    def allocate_dispid(
        self, quarantine_seconds: float, *, exclude: frozenset[int] = frozenset()
    ) -> int:
        """A dispid neither in use, nor freed within ``quarantine_seconds``, nor in
        ``exclude``. The caller records it (via :meth:`put`) before yielding to the loop.

        Raises :class:`DispidsExhausted` when there is none.
        """
        cutoff = self._now() - quarantine_seconds
        self._db.execute("DELETE FROM freed_dispids WHERE freed_at <= ?", (cutoff,))
        taken = set(exclude)
        with closing(
            self._db.execute(
                "SELECT dispid FROM disposables UNION SELECT dispid FROM freed_dispids"
            )
        ) as rows:
            taken.update(dispid for (dispid,) in rows)
        for _ in range(RANDOM_PICKS):
            dispid = self._rng.randrange(DISPIDS)
            if dispid not in taken:
                return dispid
        free = [dispid for dispid in range(DISPIDS) if dispid not in taken]
        if not free:
            raise DispidsExhausted(
                f"all {DISPIDS} dispids are in use or were freed in the last"
                f" {quarantine_seconds / 86400:g} days"
            )
        return self._rng.choice(free)

    # -- volumes ------------------------------------------------------------------

    def volumes(self) -> dict[str, list[Planned]]:
        """Every recorded volume, by the disposable it belongs to."""
        found: dict[str, list[Planned]] = {}
        with closing(self._db.execute("SELECT pool, name, disposable, vdev FROM volumes")) as rows:
            for pool, name, disposable, vdev in rows:
                found.setdefault(disposable, []).append(Planned(pool, name, vdev))
        return found

    def add_volume(self, disposable: str, volume: Planned) -> None:
        """Record a volume of ``disposable`` before it is made."""
        self._db.execute(
            "INSERT OR REPLACE INTO volumes VALUES (?, ?, ?, ?)",
            (volume.pool, volume.name, disposable, volume.vdev),
        )

    def remove_volume(self, volume: Planned) -> None:
        """Forget a volume once it is removed."""
        self._db.execute(
            "DELETE FROM volumes WHERE pool = ? AND name = ?", (volume.pool, volume.name)
        )

    # -- operator overrides --------------------------------------------------------

    def get_setting(self, key: str) -> int | None:
        row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else int(row[0])

    def set_setting(self, key: str, value: int | None) -> None:
        """Store an override; ``None`` deletes it."""
        if value is None:
            self._db.execute("DELETE FROM settings WHERE key = ?", (key,))
        else:
            self._db.execute("INSERT OR REPLACE INTO settings VALUES (?, ?)", (key, value))
