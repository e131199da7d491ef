"""Real disposables: each one's own volumes and network identity, in the engine.

The storage pool is the double of ``tests/storage_doubles.py`` (an LVM thin pool that
takes time, fills up and fails when told); the drivers themselves meet LVM and loop
devices in the lab (``tests/xen/test_xen_volumes.py``).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dispoold.config import Config
from dispoold.errors import StartFailed
from dispoold.lifecycle import Stage
from dispoold.storage import Storage
from tests.daemon_harness import clean_env, config_text, running_daemon
from tests.doubles import FakeBackend
from tests.pool_harness import Harness, settle
from tests.storage_doubles import FakePool
from tests.virtual_time import run

VOLUMES = [
    {"role": "root", "vdev": "xvda", "source": "root"},
    {"role": "private", "vdev": "xvdb", "source": "private"},
    {"role": "volatile", "vdev": "xvdc", "size_mib": 256},
]
INTERFACE = {"subnet": "10.137.0.0/16", "gateway": "10.137.0.1", "dns": ["10.137.0.1"]}


def config(**pool: Any) -> Config:
    return Config.model_validate(
        {
            "pool": {
                "default_dispvm": "dvm",
                "refresh_check_interval": 5.0,
                "refill_delay": 0.0,
                **pool,
            },
            "storage": {"thin": {"driver": "tests.storage_doubles:FakePool"}},
            "templates": {
                "dvm": {
                    "preload_max": 2,
                    "memory": 400,
                    "storage": "thin",
                    "volumes": VOLUMES,
                    "interfaces": [INTERFACE],
                }
            },
        }
    )


def harness(tmp_path: Path, **options: Any) -> tuple[Harness, FakePool]:
    pool = FakePool(FakePool.Options(key=str(tmp_path), **options))
    storage = Storage({"thin": pool}, "dispoold")
    return Harness(tmp_path, config(), storage=storage, backend=FakeBackend()), pool


def volumes_of(pool: FakePool, name: str) -> list[str]:
    return sorted(v for v in pool.volumes if f"--{name}--" in v)


def test_every_disposable_gets_volumes_and_an_identity_of_its_own(tmp_path: Path) -> None:
    h, pool = harness(tmp_path, delay=0.5)

    async def scenario() -> None:
        await h.start()
        await settle()
        names = h.names(Stage.PAUSED)
        assert len(names) == 2
        paths: set[Path] = set()
        macs, addresses = set(), set()
        for name in names:
            provision = h.backend.domains[name].provision
            assert [(d.vdev, d.writable) for d in provision.disks] == [
                ("xvda", True),
                ("xvdb", True),
                ("xvdc", True),
            ]
            paths |= {d.path for d in provision.disks}
            assert volumes_of(pool, name) == [
                f"dispoold--{name}--xvda",
                f"dispoold--{name}--xvdb",
                f"dispoold--{name}--xvdc",
            ]
            identity = provision.identity
            assert identity is not None and identity.name == name
            [interface] = identity.interfaces
            assert interface.bridge == "xenbr0" and interface.gateway == "10.137.0.1"
            dispid = h.books[name].dispid
            assert str(interface.address) == f"10.137.{(dispid + 2) >> 8}.{(dispid + 2) & 255}/16"
            macs.add(interface.mac)
            addresses.add(interface.address)
            assert len(identity.seed) == 64
        assert len(paths) == 6 and len(macs) == 2 and len(addresses) == 2
        seeds = {h.backend.domains[n].provision.identity.seed for n in names}  # type: ignore[union-attr]
        assert len(seeds) == 2
        await h.stop()

    run(scenario())


def test_volumes_are_recorded_before_they_are_made(tmp_path: Path) -> None:
    h, pool = harness(tmp_path)
    seen: list[bool] = []
    original = pool.clone

    async def clone(name: str, source: str) -> Path:
        assert h.journal is not None
        recorded = {v.name for vs in h.journal.volumes().values() for v in vs}
        seen.append(name in recorded)
        return await original(name, source)

    pool.clone = clone  # type: ignore[method-assign]

    async def scenario() -> None:
        await h.start()
        await settle()
        assert seen and all(seen)
        await h.stop()

    run(scenario())


def test_release_removes_a_disposables_volumes(tmp_path: Path) -> None:
    h, pool = harness(tmp_path, delay=0.2)

    async def scenario() -> None:
        await h.start()
        await settle()
        handout = await h.pool.request("@dispvm")
        assert len(volumes_of(pool, handout.name)) == 3
        await h.pool.release(handout.name)
        assert volumes_of(pool, handout.name) == []
        assert h.journal is not None and handout.name not in h.journal.volumes()
        await h.stop()

    run(scenario())


def test_a_volume_that_cannot_be_made_fails_the_start_and_leaves_nothing(tmp_path: Path) -> None:
    h, pool = harness(tmp_path, capacity=2)  # room for two of a disposable's three volumes

    async def scenario() -> None:
        await h.start()
        await settle(3)
        [failed, *_] = h.events_of("preload-failed")
        assert "thin pool is full" in failed["error"]
        assert failed["name"] not in h.books
        assert volumes_of(pool, failed["name"]) == []
        assert h.backend.counters.created == 0  # no domain without its disks
        # The template backs off instead of retrying in a tight loop.
        assert len(h.events_of("preload-failed")) <= 2
        await h.stop()

    run(scenario())


def test_a_missing_template_volume_is_a_clear_failure(tmp_path: Path) -> None:
    h, pool = harness(tmp_path, sources={"private": 1})  # no "root"

    async def scenario() -> None:
        await h.start()
        await settle(3)
        [failed, *_] = h.events_of("preload-failed")
        assert "snapshot root" in failed["error"] and "Failed to find" in failed["error"]
        assert pool.volumes == {}
        await h.stop()

    run(scenario())


def test_a_fresh_start_whose_volumes_fail_answers_the_request(tmp_path: Path) -> None:
    h, _ = harness(tmp_path, capacity=0)

    async def scenario() -> None:
        await h.start()
        await h.pool.set_max(None, 0)
        with pytest.raises(StartFailed, match="thin pool is full"):
            await h.pool.request("@dispvm", timeout=30)
        assert h.names() == []
        await h.stop()

    run(scenario())


def test_a_kill_during_a_bring_up_leaves_no_volume_after_the_restart(tmp_path: Path) -> None:
    first, pool = harness(tmp_path, delay=2.0)
    state: dict[str, list[str]] = {}

    async def before_the_kill() -> None:
        await first.start()
        await settle(3)  # the first volumes of each preload are being made
        state["starting"] = first.names()
        assert state["starting"] and pool.volumes

    run(before_the_kill(), crash=True)
    assert pool.volumes  # left behind by the killed daemon
    second = first.next_lifetime()

    async def after_the_restart() -> None:
        await second.start()
        await settle(10)  # each removal takes 2 s here
        for name in state["starting"]:
            assert volumes_of(pool, name) == []
        await settle()
        # The new preloads have theirs, and nothing else is left.
        owners = {v.split("--")[1] for v in pool.volumes}
        assert owners == set(second.names(Stage.PAUSED))
        await second.stop()

    run(after_the_restart())


def test_volumes_no_record_knows_are_removed_at_start_and_others_left(tmp_path: Path) -> None:
    h, pool = harness(tmp_path)
    orphan = "dispoold--disp77--xvda"
    foreign = "other--disp78--xvda"

    async def scenario() -> None:
        await pool.create(orphan, 10)
        await pool.create(foreign, 10)
        await h.start()
        await settle(1)
        assert orphan not in pool.volumes  # ours, owned by nobody: removed
        assert foreign in pool.volumes  # another daemon's: left alone
        await h.stop()

    run(scenario())


def test_replacing_a_template_volume_outdates_its_preloads(tmp_path: Path) -> None:
    h, pool = harness(tmp_path)

    async def scenario() -> None:
        await h.start()
        await settle()
        before = set(h.names(Stage.PAUSED))
        pool.update_source("root")
        await settle(30)
        after = set(h.names(Stage.PAUSED))
        assert len(after) == 2 and not before & after
        assert h.events_of("refreshed")[-1]["reason"] == "the template's files changed"
        await h.stop()

    run(scenario())


def test_status_shows_each_volume_its_driver_and_space_used(tmp_path: Path) -> None:
    h, pool = harness(tmp_path)

    async def scenario() -> None:
        await h.start()
        await settle()
        for volume in pool.volumes.values():
            volume.written_mib = 10.0
        await settle(6)  # the next measurement
        [template] = h.status()["templates"]
        assert [
            (v["vdev"], v["role"], v["pool"], v["driver"], v["used_mib"])
            for v in template["volumes"]
        ] == [
            ("xvda", "root", "thin", "fake", 20.0),
            ("xvdb", "private", "thin", "fake", 20.0),
            ("xvdc", "volatile", "thin", "fake", 20.0),
        ]
        await h.stop()

    run(scenario())


def test_volume_removal_failing_is_retried_and_nothing_is_forgotten(tmp_path: Path) -> None:
    h, pool = harness(tmp_path)

    async def scenario() -> None:
        await h.start()
        await settle()
        handout = await h.pool.request("@dispvm")
        pool.fail_next.add("remove")
        release = asyncio.ensure_future(h.pool.release(handout.name))
        await settle(1)
        assert not release.done()  # the volume could not be removed yet
        await settle(10)
        assert release.done() and volumes_of(pool, handout.name) == []
        await h.stop()

    run(scenario())


def test_a_daemon_with_volumes_shows_them_in_status() -> None:
    template = {"preload_max": 1, "memory": 400, "storage": "thin", "volumes": VOLUMES}
    storage = {"thin": {"driver": "tests.storage_doubles:FakePool", "delay": 0.01}}
    with running_daemon(templates={"fedora-dvm": template}, storage=storage) as daemon:
        status = daemon.wait_until(
            lambda s: any(d["stage"] == "paused" for d in s["templates"][0]["disposables"])
        )
        [entry] = status["templates"]
        assert [(v["vdev"], v["driver"]) for v in entry["volumes"]] == [
            ("xvda", "fake"),
            ("xvdb", "fake"),
            ("xvdc", "fake"),
        ]


def test_a_mistake_in_a_storage_pool_stops_the_daemon_naming_the_field(tmp_path: Path) -> None:
    text = config_text(
        tmp_path,
        templates={"fedora-dvm": {"memory": 400}},
        storage={"thin": {"driver": "lvm_thin", "volume_group": "vg"}},
    )
    path = tmp_path / "dispoold.toml"
    path.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "dispoold.daemon", "--config", str(path), "--check"],
        capture_output=True,
        text=True,
        check=False,
        env=clean_env(),
    )
    assert result.returncode == 78, result.stderr
    assert f"{path}: storage.thin.thin_pool: required" in result.stderr
