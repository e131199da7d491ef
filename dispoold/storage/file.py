"""``file``: every writable volume a file in a directory, attached as a loop device.

A root or private volume is a copy of the template's image: a reflink copy where the
file system shares blocks (btrfs, XFS with reflink), else a sparse copy (holes stay
holes); a volatile volume is a sparse file of its size. Each file is attached to a loop
device (``losetup``) and the domain gets that block device, so that Xen's ``block``
hotplug script sees a block device whatever the file system.

The template's identity (what outdates preloads) is its image's inode, size and
modification time, as for a kernel.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from dispoold.storage import COMMAND_TIMEOUT, StorageError, run_tool

SUFFIX = ".img"


class FileDriver:
    name = "file"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        #: Where the volumes' files are kept (made, mode 0700, if missing).
        directory: Path
        #: ``auto``: reflink where the file system can, else a sparse copy; ``always``:
        #: fail where it cannot (a full copy of a big image takes long); ``never``.
        reflink: Literal["auto", "always", "never"] = "auto"
        #: Seconds one copy or losetup may take.
        command_timeout: float = Field(COMMAND_TIMEOUT, gt=0)

    def __init__(self, options: FileDriver.Options) -> None:
        self.options = options
        self._dir = options.directory

    async def open(self) -> None:
        try:
            await asyncio.to_thread(self._dir.mkdir, mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self._dir}: {exc.strerror}") from None
        if not os.access(self._dir, os.W_OK | os.X_OK):
            raise StorageError(f"{self._dir} is not writable")
        await run_tool(["losetup", "--version"], "check losetup", self.options.command_timeout)

    async def clone(self, name: str, source: str) -> Path:
        if not await asyncio.to_thread(Path(source).is_file):
            raise StorageError(f"copy {source} as {name}: no such image")
        path = self._file(name)
        await run_tool(
            ["cp", f"--reflink={self.options.reflink}", "--sparse=always", source, str(path)],
            f"copy {source} as {name}",
            self.options.command_timeout,
        )
        return await self._attach(path, name)

    async def create(self, name: str, size_mib: int) -> Path:
        path = self._file(name)

        def make() -> None:
            with path.open("xb") as f:
                f.truncate(size_mib * 1024 * 1024)

        try:
            await asyncio.to_thread(make)
        except OSError as exc:
            raise StorageError(f"create {name} ({size_mib} MiB): {exc.strerror}") from None
        return await self._attach(path, name)

    async def remove(self, name: str) -> None:
        path = self._file(name)
        for device in await self._loops(path):
            await run_tool(
                ["losetup", "--detach", device], f"detach {name}", self.options.command_timeout
            )
        try:
            await asyncio.to_thread(path.unlink, missing_ok=True)
        except OSError as exc:
            raise StorageError(f"remove {name}: {exc.strerror}") from None

    async def rename(self, name: str, new_name: str) -> None:
        path, target = self._file(name), self._file(new_name)
        for device in await self._loops(path):
            await run_tool(
                ["losetup", "--detach", device], f"detach {name}", self.options.command_timeout
            )
        try:
            await asyncio.to_thread(os.replace, path, target)
        except OSError as exc:
            raise StorageError(f"rename {name} to {new_name}: {exc.strerror}") from None

    def source_of(self, name: str) -> str:
        return str(self._file(name))

    async def names(self, prefix: str) -> list[str]:
        def scan() -> list[str]:
            try:
                entries = os.listdir(self._dir)
            except FileNotFoundError:
                return []
            return [
                e.removesuffix(SUFFIX)
                for e in entries
                if e.startswith(prefix) and e.endswith(SUFFIX)
            ]

        return await asyncio.to_thread(scan)

    async def usage(self, names: Sequence[str]) -> dict[str, float]:
        def measure() -> dict[str, float]:
            used = {}
            for name in names:
                try:
                    used[name] = round(self._file(name).stat().st_blocks * 512 / 2**20, 1)
                except OSError:
                    continue
            return used

        return await asyncio.to_thread(measure)

    def identify(self, source: str) -> str:
        try:
            st = os.stat(source)
        except OSError:
            return "missing"
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    def _file(self, name: str) -> Path:
        return self._dir / f"{name}{SUFFIX}"

    async def _attach(self, path: Path, name: str) -> Path:
        try:
            out = await run_tool(
                ["losetup", "--find", "--show", str(path)],
                f"attach {name}",
                self.options.command_timeout,
            )
        except StorageError:
            await asyncio.to_thread(path.unlink, missing_ok=True)
            raise
        return Path(out.strip())

    async def _loops(self, path: Path) -> list[str]:
        if not await asyncio.to_thread(path.exists):
            return []
        out = await run_tool(
            ["losetup", "--associated", str(path), "--noheadings", "--output", "NAME"],
            f"find the loop devices of {path.name}",
            self.options.command_timeout,
        )
        return [line.strip() for line in out.splitlines() if line.strip()]
