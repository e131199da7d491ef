"""Savefiles: a template's booted domain, saved once, restored into each disposable.

This is Qubes R3.2's method (``docs/guest.md`` has the guest's side), without its flaws:

- one savefile per template that enables it, not one for the whole system;
- made in the background: when the template changes, its savefile is invalid at once and
  a new one is made while requests use the other origins (R3.2 made the next caller wait
  about 2.5 minutes);
- checked: its image carries a SHA-256 that is verified when it is first used and
  whenever the file changed since, and a savefile whose check or restore fails is
  discarded and made again;
- written under a temporary name and renamed into place only when complete, image first,
  its description last: a crash never leaves a half savefile that looks usable;
- every restore gets a new identity and a fresh seed for its RNG (R3.2's restores shared
  the RNG state of the saved domain).

The files, in ``[savefile] directory`` (RAM-backed by default): ``TEMPLATE.img``, the
libxl stream, and ``TEMPLATE.json``, what it was made from (:class:`Description`). The
saved domain's writable volumes are kept in their pools beside it (``<instance>--
savefile-TEMPLATE--<vdev>``): each restore starts from snapshots of exactly the disks that
were saved.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from dispoold.config import describe_validation
from dispoold.storage import Planned
from dispoold.views import SavefileView

#: The most a prerun script may hold (the guest reads it from one xenstore key, and
#: xenstore values are limited to 4096 bytes).
MAX_PRERUN_BYTES = 3072
#: A description is a few hundred bytes; anything much bigger is not ours.
MAX_DESCRIPTION_BYTES = 64 * 1024
#: The owner the journal and the pools' volume names give a savefile's volumes (no
#: disposable is ever named so: named disposables may not start with it).
OWNER_PREFIX = "savefile-"


class State(StrEnum):
    #: There is none (or the template does not enable savefiles).
    ABSENT = "absent"
    #: One is being made.
    PREPARING = "preparing"
    #: Usable: requests and refills restore from it.
    READY = "ready"
    #: There is one, but it is outdated or damaged; a new one is on its way.
    INVALID = "invalid"


class SavedVolume(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    vdev: str
    pool: str
    name: str

    def planned(self) -> Planned:
        return Planned(self.pool, self.name, self.vdev)


class Description(BaseModel):
    """What a savefile was made from, and how to check it (``TEMPLATE.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    template: str
    #: The template's fingerprint when it was made: any other one now makes it invalid.
    fingerprint: str
    #: What the domain had when it was saved (a restore starts with that).
    memory_mib: int
    maxmem_mib: int
    vcpus: int
    image: str
    size: int
    sha256: str
    volumes: tuple[SavedVolume, ...] = ()
    made_at: float
    #: How long the preparation took, boot to saved.
    seconds: float


def owner(template: str) -> str:
    return OWNER_PREFIX + template


def saved_name(instance: str, template: str, vdev: str) -> str:
    """The pool's name for a savefile's copy of one volume."""
    return f"{instance}--{owner(template)}--{vdev}"


@dataclass
class Savefile:
    """One template's savefile as the engine knows it."""

    template: str
    state: State = State.ABSENT
    description: Description | None = None
    #: The image's (inode, size, mtime) when its checksum last matched.
    verified: tuple[int, int, int] | None = None
    #: Why the last preparation or restore failed.
    error: str | None = None
    failures: int = 0
    #: Loop time before which no preparation starts (back-off after failures).
    retry_at: float = 0.0
    #: Wall time the preparation under way began.
    started_at: float | None = None

    def view(self, now: float) -> SavefileView:
        described = self.description
        return SavefileView(
            state=self.state.value,
            made_from=None if described is None else described.fingerprint,
            age=None if described is None else round(max(0.0, now - described.made_at), 1),
            size_mib=None if described is None else round(described.size / 2**20, 1),
            memory_mib=None if described is None else described.memory_mib,
            vcpus=None if described is None else described.vcpus,
            prepare_seconds=None if described is None else round(described.seconds, 1),
            error=self.error,
        )


class SavefileError(Exception):
    """A savefile cannot be written, read or trusted; the message says why."""


class Store:
    """The savefile directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def image(self, template: str) -> Path:
        return self.directory / f"{template}.img"

    def temporary(self, template: str) -> Path:
        """Where a savefile in the making is written (never taken for a usable one)."""
        return self.directory / f".{template}.img.tmp"

    def _description(self, template: str) -> Path:
        return self.directory / f"{template}.json"

    async def open(self) -> None:
        """Make the directory and remove what a crash left half-written."""

        def prepare() -> None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for entry in self.directory.iterdir():
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    entry.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(prepare)
        except OSError as exc:
            raise SavefileError(f"savefile directory {self.directory}: {exc.strerror}") from None

    async def load(self, template: str) -> Description | None:
        """The template's savefile as described on disk, or None when there is none
        (or only part of one: the image without its description is not usable)."""

        def read() -> bytes | None:
            try:
                with self._description(template).open("rb") as f:
                    return f.read(MAX_DESCRIPTION_BYTES + 1)
            except FileNotFoundError:
                return None

        try:
            raw = await asyncio.to_thread(read)
        except OSError as exc:
            raise SavefileError(f"{self._description(template)}: {exc.strerror}") from None
        if raw is None:
            return None
        if len(raw) > MAX_DESCRIPTION_BYTES:
            raise SavefileError(f"{self._description(template)}: too big to be a description")
        try:
            described = Description.model_validate_json(raw)
        except ValidationError as exc:
            raise SavefileError(
                f"{self._description(template)}: {describe_validation(exc)}"
            ) from None
        if described.template != template:
            raise SavefileError(f"{self._description(template)} describes {described.template}")
        return described

    async def complete(self, described: Description) -> tuple[int, int, int]:
        """Make the savefile in the making usable: the image is renamed into place, then
        the description is written (under a temporary name, then renamed). Returns the
        image's (inode, size, mtime)."""
        template = described.template

        def finish() -> tuple[int, int, int]:
            image = self.image(template)
            os.replace(self.temporary(template), image)
            staging = self.directory / f".{template}.json.tmp"
            with staging.open("w") as f:
                f.write(described.model_dump_json(indent=1))
                f.flush()
                os.fsync(f.fileno())
            os.replace(staging, self._description(template))
            return stat_of(image)

        try:
            return await asyncio.to_thread(finish)
        except OSError as exc:
            raise SavefileError(f"savefile of {template}: {exc.strerror or exc}") from None

    async def discard(self, template: str) -> None:
        """Remove the template's savefile files (the description first: the image alone
        is never taken for usable)."""

        def remove() -> None:
            for path in (
                self._description(template),
                self.image(template),
                self.temporary(template),
            ):
                path.unlink(missing_ok=True)

        try:
            await asyncio.to_thread(remove)
        except OSError as exc:
            raise SavefileError(f"savefile of {template}: {exc.strerror}") from None

    async def checksum(self, path: Path) -> tuple[str, int]:
        """SHA-256 and size of ``path``."""
        return await asyncio.to_thread(sha256_of, path)

    async def verify(self, described: Description) -> tuple[int, int, int]:
        """Check the image against its description; returns its (inode, size, mtime).
        Raises :class:`SavefileError` when it is missing or does not match."""
        image = self.image(described.template)
        try:
            digest, size = await self.checksum(image)
            st = await asyncio.to_thread(stat_of, image)
        except OSError as exc:
            raise SavefileError(f"{image}: {exc.strerror}") from None
        if size != described.size or digest != described.sha256:
            raise SavefileError(
                f"{image} fails its checksum ({size} bytes, {described.size} expected)"
            )
        return st


def stat_of(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_ino, st.st_size, st.st_mtime_ns


def sha256_of(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
