"""The storage layer on the host: naming, loading drivers, and the file driver's files.

The file driver's loop devices and the lvm_thin driver need root and a dom0 with LVM:
they are tested in the lab (``tests/xen/test_xen_volumes.py``). Here the file driver runs
for real on real files, with its attach step replaced by one that names the file.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from dispoold.config import ConfigError, StorageSettings, TemplateSettings
from dispoold.storage import Planned, Storage, StorageError, load_driver, run_tool
from dispoold.storage.file import FileDriver
from tests.storage_doubles import FakePool


def template() -> TemplateSettings:
    return TemplateSettings.model_validate(
        {
            "storage": "thin",
            "volumes": [
                {"role": "root", "vdev": "xvda", "source": "root"},
                {"role": "volatile", "vdev": "xvdc", "size_mib": 8, "pool": "other"},
                {"role": "read-only", "vdev": "xvdd", "source": "/shared.img"},
            ],
        }
    )


def test_volumes_are_named_by_daemon_disposable_and_disk() -> None:
    storage = Storage({"thin": FakePool(), "other": FakePool()}, "lab")
    planned = [p for p, _ in storage.plan("disp12", template())]
    assert planned == [
        Planned("thin", "lab--disp12--xvda", "xvda"),
        Planned("other", "lab--disp12--xvdc", "xvdc"),
    ]  # the read-only image is nobody's


def test_leftovers_are_ours_and_owned_by_nobody_known() -> None:
    pool = FakePool(FakePool.Options(key="leftovers"))
    storage = Storage({"thin": pool}, "lab")

    async def scenario() -> list[Planned]:
        for name in (
            "lab--disp1--xvda",
            "lab--named--x--xvda",
            "lab--disp2--xvda",
            "x--disp3--xvda",
        ):
            await pool.create(name, 1)
        return await storage.leftovers(known={"disp1"})

    found = asyncio.run(scenario())
    # A named disposable's name may hold the separator: the disk is what follows the last.
    assert sorted(p.name for p in found) == ["lab--disp2--xvda", "lab--named--x--xvda"]


def test_driver_options_are_checked_naming_the_file_and_the_field(tmp_path: Path) -> None:
    bad = StorageSettings.model_validate({"driver": "lvm_thin", "volume_group": "vg"})
    with pytest.raises(ConfigError, match=r"storage\.thin\.thin_pool: required"):
        load_driver("thin", bad, tmp_path / "dispoold.toml")
    typo = StorageSettings.model_validate({"driver": "file", "directory": "/x", "reflnk": "auto"})
    with pytest.raises(ConfigError, match=r"storage\.files\.reflnk: unknown key"):
        load_driver("files", typo, tmp_path / "dispoold.toml")
    missing = StorageSettings.model_validate({"driver": "zfs"})
    with pytest.raises(ConfigError, match=r"storage\.z\.driver: storage driver 'zfs'"):
        load_driver("z", missing, tmp_path / "dispoold.toml")


class Unattached(FileDriver):
    """The file driver with the file itself in place of a loop device."""

    async def _attach(self, path: Path, name: str) -> Path:
        return path

    async def _loops(self, path: Path) -> list[str]:
        return []


def test_the_file_driver_copies_sparsely_and_makes_sparse_volatile_files(tmp_path: Path) -> None:
    image = tmp_path / "root.img"
    with image.open("wb") as f:
        f.write(b"template")
        f.seek(64 * 2**20 - 1)
        f.write(b"\0")  # 64 MiB, nearly all of it a hole
    driver = Unattached(FileDriver.Options(directory=tmp_path / "volumes"))

    async def scenario() -> None:
        await driver.open()
        copy = await driver.clone("lab--disp1--xvda", str(image))
        assert copy.read_bytes()[:8] == b"template" and copy.stat().st_size == 64 * 2**20
        assert copy.stat().st_blocks * 512 < 2**20  # the holes stayed holes
        scratch = await driver.create("lab--disp1--xvdc", 16)
        assert scratch.stat().st_size == 16 * 2**20 and scratch.stat().st_blocks == 0
        assert sorted(await driver.names("lab--")) == ["lab--disp1--xvda", "lab--disp1--xvdc"]
        used = await driver.usage(["lab--disp1--xvda", "lab--disp1--xvdc", "gone"])
        assert set(used) == {"lab--disp1--xvda", "lab--disp1--xvdc"}
        with pytest.raises(StorageError, match="exists"):
            await driver.create("lab--disp1--xvdc", 16)
        await driver.remove("lab--disp1--xvda")
        await driver.remove("lab--disp1--xvda")  # gone already: fine
        assert await driver.names("lab--") == ["lab--disp1--xvdc"]
        with pytest.raises(StorageError, match="no such image"):
            await driver.clone("lab--disp2--xvda", str(tmp_path / "missing.img"))

    asyncio.run(scenario())
    before = driver.identify(str(image))
    os.utime(image, ns=(0, 0))
    assert driver.identify(str(image)) != before
    assert driver.identify(str(tmp_path / "missing.img")) == "missing"


def test_a_storage_tool_that_fails_or_hangs_is_a_clear_error() -> None:
    async def scenario() -> None:
        with pytest.raises(StorageError, match="list: ls: cannot access"):
            await run_tool(["ls", "/no/such/dir"], "list")
        with pytest.raises(StorageError, match="cannot run no-such-tool"):
            await run_tool(["no-such-tool"], "run it")
        with pytest.raises(StorageError, match=r"did not finish within 0\.2 s"):
            await run_tool(["sleep", "5"], "wait", timeout=0.2)

    asyncio.run(scenario())
