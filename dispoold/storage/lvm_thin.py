"""``lvm_thin``: every writable volume a thin volume in an LVM thin pool.

A root or private volume is a thin snapshot of the template's thin volume in the same
volume group (``lvcreate --snapshot``: instant, shares every block until written); a
volatile one a new thin volume. Thin snapshots are created with the activation-skip flag
cleared (``--setactivationskip n``), so that they are active and their device exists at
once. Everything goes through the LVM tools, which serialise themselves with LVM's own
locks.

The template's identity (what outdates preloads) is its volume's UUID, size and creation
time: replacing the template's volume (as Qubes does on every template update: a new
snapshot renamed into place) changes it. Writing into the template's volume in place is
not seen; run ``dispoolctl refresh TEMPLATE`` after that.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from dispoold.storage import COMMAND_TIMEOUT, StorageError, run_tool


class LvmThin:
    name = "lvm_thin"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)

        #: The volume group holding the thin pool and the templates' volumes.
        volume_group: str = Field(pattern=r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
        #: The thin pool (a logical volume of the group) new volumes are made in.
        thin_pool: str = Field(pattern=r"^[A-Za-z0-9+_.][A-Za-z0-9+_.-]*$")
        #: Seconds one LVM command may take.
        command_timeout: float = Field(COMMAND_TIMEOUT, gt=0)

    def __init__(self, options: LvmThin.Options) -> None:
        self.options = options
        self._vg = options.volume_group

    async def open(self) -> None:
        attr = await self._lvs(["lv_attr"], f"{self._vg}/{self.options.thin_pool}", "check")
        # lv_attr's first letter: t for a thin pool (lvs(8)).
        if not attr.strip().startswith("t"):
            raise StorageError(
                f"{self._vg}/{self.options.thin_pool} is not a thin pool (lv_attr {attr.strip()})"
            )

    async def clone(self, name: str, source: str) -> Path:
        await self._run(
            [
                "lvcreate",
                "--snapshot",
                "--setactivationskip",
                "n",
                "--activate",
                "y",
                "--name",
                name,
                f"{self._vg}/{source}",
            ],
            f"snapshot {self._vg}/{source} as {name}",
        )
        return self._device(name)

    async def create(self, name: str, size_mib: int) -> Path:
        await self._run(
            [
                "lvcreate",
                "--thin",
                "--virtualsize",
                f"{size_mib}m",
                "--name",
                name,
                f"{self._vg}/{self.options.thin_pool}",
            ],
            f"create {name} ({size_mib} MiB) in {self._vg}/{self.options.thin_pool}",
        )
        return self._device(name)

    async def remove(self, name: str) -> None:
        if name not in await self.names(name):
            return
        await self._run(["lvremove", "--force", f"{self._vg}/{name}"], f"remove {name}")

    async def rename(self, name: str, new_name: str) -> None:
        await self._run(["lvrename", self._vg, name, new_name], f"rename {name} to {new_name}")

    def source_of(self, name: str) -> str:
        return name

    async def names(self, prefix: str) -> list[str]:
        out = await self._lvs(["lv_name"], self._vg, "list volumes")
        return [n for n in (line.strip() for line in out.splitlines()) if n.startswith(prefix)]

    async def usage(self, names: Sequence[str]) -> dict[str, float]:
        out = await self._lvs(["lv_name", "lv_size", "data_percent"], self._vg, "usage", "m")
        wanted = set(names)
        used: dict[str, float] = {}
        for line in out.splitlines():
            fields = line.split()
            if len(fields) == 3 and fields[0] in wanted:
                try:
                    used[fields[0]] = round(float(fields[1]) * float(fields[2]) / 100, 1)
                except ValueError:
                    continue
        return used

    def identify(self, source: str) -> str:
        argv = [
            "lvs",
            "--noheadings",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            "lv_uuid,lv_size,lv_time",
            f"{self._vg}/{source}",
        ]
        try:
            result = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=self.options.command_timeout,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StorageError(f"identify {self._vg}/{source}: {exc}") from None
        if result.returncode != 0:
            return "missing"
        return " ".join(result.stdout.split())

    def _device(self, name: str) -> Path:
        return Path("/dev") / self._vg / name

    async def _lvs(self, fields: list[str], what_lv: str, what: str, units: str = "b") -> str:
        return await self._run(
            [
                "lvs",
                "--noheadings",
                "--units",
                units,
                "--nosuffix",
                "-o",
                ",".join(fields),
                what_lv,
            ],
            f"{what} ({what_lv})",
        )

    async def _run(self, argv: list[str], what: str) -> str:
        return await run_tool(argv, what, self.options.command_timeout)
