"""A storage pool double that behaves like an LVM thin pool.

Volumes take time to make and remove (``delay``, through ``asyncio.sleep``), the pool
fills up (``capacity``), a missing source fails the snapshot as ``lvcreate`` would, and
any step can be made to fail (``fail_next``). Sources carry a revision that a test bumps
to "update the template" (it changes :meth:`identify`). Loadable as an out-of-tree driver
(``driver = "tests.storage_doubles:FakePool"``), which is how the daemon tests use it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from dispoold.storage import StorageError


@dataclass
class FakeVolume:
    name: str
    size_mib: int
    source: str | None
    written_mib: float = 0.0


@dataclass
class _Shared:
    """What outlives a daemon: the pool's volumes (a restart gets the same ones)."""

    volumes: dict[str, FakeVolume] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)


POOLS: dict[str, _Shared] = {}


class FakePool:
    name = "fake"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid")

        #: Pools with the same key share their volumes (one host, several daemons).
        key: str = "default"
        delay: float = 0.0
        capacity: int = 100
        sources: dict[str, int] = {"root": 1, "private": 1}

    def __init__(self, options: FakePool.Options | None = None) -> None:
        self.options = options or FakePool.Options()
        shared = POOLS.setdefault(self.options.key, _Shared())
        for source, revision in self.options.sources.items():
            shared.sources.setdefault(source, revision)
        self._shared = shared
        #: The next operation of this name ("clone", "create", "remove", "names") fails.
        self.fail_next: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    @property
    def volumes(self) -> dict[str, FakeVolume]:
        return self._shared.volumes

    def update_source(self, source: str) -> None:
        """The template's volume is replaced by a new revision."""
        self._shared.sources[source] = self._shared.sources.get(source, 0) + 1

    async def open(self) -> None:
        await self._step("open", "")

    async def clone(self, name: str, source: str) -> Path:
        await self._step("clone", name)
        if source not in self._shared.sources:
            raise StorageError(f"snapshot {source} as {name}: Failed to find logical volume")
        return self._add(FakeVolume(name, 1024, source))

    async def create(self, name: str, size_mib: int) -> Path:
        await self._step("create", name)
        return self._add(FakeVolume(name, size_mib, None))

    async def remove(self, name: str) -> None:
        await self._step("remove", name)
        self._shared.volumes.pop(name, None)

    async def rename(self, name: str, new_name: str) -> None:
        await self._step("rename", name)
        volume = self._shared.volumes.pop(name, None)
        if volume is None:
            raise StorageError(f"rename {name}: Failed to find logical volume")
        volume.name = new_name
        self._shared.volumes[new_name] = volume
        # A volume of the pool can be the source of a snapshot.
        self._shared.sources[new_name] = 1

    def source_of(self, name: str) -> str:
        return name

    async def names(self, prefix: str) -> list[str]:
        await self._step("names", prefix)
        return sorted(n for n in self._shared.volumes if n.startswith(prefix))

    async def usage(self, names: Sequence[str]) -> dict[str, float]:
        await self._step("usage", "")
        return {n: v.written_mib for n, v in self._shared.volumes.items() if n in names}

    def identify(self, source: str) -> str:
        revision = self._shared.sources.get(source)
        return "missing" if revision is None else f"revision {revision}"

    def _add(self, volume: FakeVolume) -> Path:
        if volume.name in self._shared.volumes:
            raise StorageError(f"{volume.name}: Logical Volume already exists")
        if len(self._shared.volumes) >= self.options.capacity:
            raise StorageError(f"{volume.name}: thin pool is full")
        self._shared.volumes[volume.name] = volume
        return Path("/dev/fake") / volume.name

    async def _step(self, operation: str, name: str) -> None:
        self.calls.append((operation, name))
        await asyncio.sleep(self.options.delay)
        if operation in self.fail_next:
            self.fail_next.discard(operation)
            raise StorageError(f"{operation} {name}: injected failure")
