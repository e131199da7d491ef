"""Restores: a disposable restored from its template's savefile (:mod:`dispoold.savefile`).

Faster than a boot, slower than a paused preload: the engine asks this origin when the
pool has nothing, and refills the pool this way when the template's savefile is ready.

:class:`Keeper` keeps the templates' savefiles: their state, their files and the volumes
saved with them. It never makes a request wait for a savefile: one that is not ready is
simply not claimed, and the engine prepares a new one in the background.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from dispoold.events import EventBus
from dispoold.journal import Journal
from dispoold.origins import Workshop
from dispoold.savefile import (
    Description,
    Savefile,
    SavefileError,
    State,
    Store,
    owner,
    saved_name,
    stat_of,
)
from dispoold.storage import Planned, Storage, StorageError
from dispoold.views import OriginName

if TYPE_CHECKING:
    from dispoold.books import Disposable


class Restores:
    name: OriginName = "restore"
    last_resort = False
    #: One restore per request: if it fails, the request moves on to a fresh start.
    repeat = False

    def __init__(self, pool: Workshop) -> None:
        self._pool = pool

    def claim(self, templates: Sequence[str]) -> Disposable | None:
        for template in templates:
            if self._pool.keeper.usable(template, self._pool.fingerprint_of(template)):
                return self._pool.start_for_request(template, self.name)
        return None

    def patience(self) -> float:
        return self._pool.config.savefile.restore_timeout


class Keeper:
    """The savefiles of the templates that enable them."""

    def __init__(
        self,
        store: Store,
        storage: Storage,
        journal: Journal,
        bus: EventBus,
        log: logging.Logger,
    ) -> None:
        self.store = store
        self._storage = storage
        self._journal = journal
        self._bus = bus
        self._log = log
        self.savefiles: dict[str, Savefile] = {}

    def configure(self, enabled: Sequence[str]) -> list[Savefile]:
        """Keep the savefiles of ``enabled``; returns those no longer wanted (the engine
        discards them)."""
        gone = [sf for name, sf in self.savefiles.items() if name not in enabled]
        for sf in gone:
            del self.savefiles[sf.template]
        for name in enabled:
            self.savefiles.setdefault(name, Savefile(name))
        return gone

    async def load(self, fingerprints: Mapping[str, str]) -> None:
        """Read what the savefile directory holds for each template. A savefile made
        from another fingerprint than the template's now is invalid (and made again)."""
        if not self.savefiles:
            return
        await self.store.open()
        for sf in self.savefiles.values():
            try:
                described = await self.store.load(sf.template)
            except SavefileError as exc:
                self._log.warning("%s; it is made again", exc)
                sf.state, sf.error = State.INVALID, str(exc)
                continue
            sf.description = described
            if described is None:
                sf.state = State.ABSENT
            elif described.fingerprint != fingerprints.get(sf.template):
                sf.state, sf.error = State.INVALID, "made from an older template"
            else:
                sf.state = State.READY

    def known_owners(self) -> set[str]:
        """The owners whose volumes the sweep must leave alone: savefiles described on
        disk (a discard removes their volumes itself)."""
        return {owner(sf.template) for sf in self.savefiles.values() if sf.description}

    def usable(self, template: str, fingerprint: str | None) -> bool:
        """The template has a ready savefile made from what the template is now. (One
        made from something older is invalid from now on.)"""
        sf = self.savefiles.get(template)
        if sf is None or sf.state is not State.READY or sf.description is None:
            return False
        if sf.description.fingerprint != fingerprint:
            self.invalidate(template, "the template changed")
            return False
        return True

    def invalidate(self, template: str, reason: str) -> None:
        sf = self.savefiles.get(template)
        if sf is None or sf.state is State.INVALID:
            return
        if sf.description is None and sf.state is not State.READY:
            return
        sf.state, sf.error = State.INVALID, reason
        self._log.info("savefile of %s is invalid: %s", template, reason)
        self._bus.publish("savefile-discarded", {"template": template, "reason": reason})

    async def verified(self, template: str) -> Description:
        """The template's ready savefile, its image checked against its checksum when it
        was not checked yet or has changed since. Raises :class:`SavefileError`."""
        sf = self.savefiles.get(template)
        if sf is None or sf.state is not State.READY or sf.description is None:
            raise SavefileError(f"{template} has no ready savefile")
        described = sf.description
        try:
            current = await _stat(self.store, template)
        except OSError as exc:
            raise SavefileError(f"savefile of {template}: {exc.strerror}") from None
        if sf.verified != current:
            sf.verified = await self.store.verify(described)
        return described

    async def discard(self, sf: Savefile) -> None:
        """Remove a savefile's files and saved volumes. Raises
        :class:`~dispoold.storage.StorageError` or :class:`SavefileError`; what could not
        be removed stays recorded for the next try."""
        described, sf.description, sf.verified = sf.description, None, None
        await self.store.discard(sf.template)
        volumes = list(described.volumes) if described is not None else []
        recorded = self._journal.volumes().get(owner(sf.template), [])
        for volume in [*(v.planned() for v in volumes), *recorded]:
            await self._storage.remove(volume)
            self._journal.remove_volume(volume)
        if sf.state is not State.PREPARING:
            sf.state = State.ABSENT

    def failed(self, template: str, error: str, backoff: float, now: float) -> None:
        sf = self.savefiles.get(template)
        if sf is None:
            return
        sf.state, sf.error = State.ABSENT, error
        sf.failures += 1
        sf.retry_at = now + backoff
        self._log.warning("savefile of %s not made: %s", template, error)
        self._bus.publish("savefile-failed", {"template": template, "error": error})

    async def preserve(
        self, template: str, volumes: Sequence[Planned], instance: str
    ) -> list[Planned]:
        """Keep a saved domain's volumes for the savefile: renamed to the savefile's
        names, and recorded under its owner. Raises :class:`StorageError`."""
        kept = []
        for volume in volumes:
            saved = Planned(volume.pool, saved_name(instance, template, volume.vdev), volume.vdev)
            self._journal.add_volume(owner(template), saved)
            try:
                await self._storage.rename(volume, saved.name)
            except StorageError:
                self._journal.remove_volume(saved)
                raise
            self._journal.remove_volume(volume)
            kept.append(saved)
        return kept


async def _stat(store: Store, template: str) -> tuple[int, int, int]:
    return await asyncio.to_thread(stat_of, store.image(template))
