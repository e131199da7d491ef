"""The savefile origin in the engine: prepared in the background, restored into
disposables, never in a request's way, checked, and made again when it goes bad.

The backend is ``tests/savefile_doubles.py`` (saves real files, takes time, fails on a
damaged image); storage is the thin-pool double. On real Xen: tests/xen/test_xen_savefile.py.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from dispoold.config import Config
from dispoold.lifecycle import Stage
from dispoold.savefile import State
from dispoold.storage import Storage
from tests.pool_harness import Harness, settle
from tests.savefile_doubles import SavingBackend
from tests.storage_doubles import FakePool
from tests.virtual_time import run

VOLUMES = [
    {"role": "root", "vdev": "xvda", "source": "root"},
    {"role": "volatile", "vdev": "xvdc", "size_mib": 64},
]


def config(tmp_path: Path, preload_max: int = 0, **template: Any) -> Config:
    return Config.model_validate(
        {
            "pool": {
                "default_dispvm": "dvm",
                "refresh_check_interval": 5.0,
                "refill_delay": 0.0,
                "startup_timeout": 30.0,
            },
            "savefile": {"directory": str(tmp_path / "savefiles"), "restore_timeout": 20.0},
            "storage": {"thin": {"driver": "tests.storage_doubles:FakePool"}},
            "templates": {
                "dvm": {
                    "preload_max": preload_max,
                    "memory": 400,
                    "storage": "thin",
                    "volumes": VOLUMES,
                    "interfaces": [{"subnet": "10.137.0.0/16"}],
                    "savefile": {"enabled": True},
                    **template,
                }
            },
        }
    )


def harness(
    tmp_path: Path, preload_max: int = 0, backend: SavingBackend | None = None, **template: Any
) -> tuple[Harness, SavingBackend, FakePool]:
    backend = backend or SavingBackend({"ready_delay": 10.0})
    pool = FakePool(FakePool.Options(key=str(tmp_path), delay=0.1))
    h = Harness(
        tmp_path,
        config(tmp_path, preload_max, **template),
        backend=backend,
        storage=Storage({"thin": pool}, "dispoold"),
    )
    return h, backend, pool


def savefile(h: Harness) -> dict[str, Any]:
    entry: dict[str, Any] = h.status()["templates"][0]["savefile"]
    return entry


async def until_ready(h: Harness, limit: float = 120.0) -> None:
    for _ in range(int(limit)):
        if savefile(h)["state"] == "ready":
            return
        await asyncio.sleep(1)
    raise AssertionError(f"the savefile never became ready: {savefile(h)}")


def test_a_savefile_is_prepared_in_the_background_and_leaves_only_itself(tmp_path: Path) -> None:
    h, backend, pool = harness(tmp_path)

    async def scenario() -> None:
        await h.start()
        await settle(1)
        assert savefile(h)["state"] == "preparing"
        [preparing] = h.names()
        assert h.books[preparing].origin == "prepare"
        assert backend.domains[preparing].provision.save_request
        await until_ready(h)
        entry = savefile(h)
        assert entry["made_from"] == h.pool.fingerprint_of("dvm")
        assert entry["memory_mib"] and entry["size_mib"] is not None and entry["error"] is None
        files = sorted(p.name for p in (tmp_path / "savefiles").iterdir())
        assert files == ["dvm.img", "dvm.json"]  # nothing half-written left
        await settle(2)
        assert preparing not in backend.domains and h.names() == []  # the saved domain is gone
        # Its volumes are the savefile's now, under the savefile's names.
        assert sorted(pool.volumes) == [
            "dispoold--savefile-dvm--xvda",
            "dispoold--savefile-dvm--xvdc",
        ]
        assert h.event_names("savefile-preparing", "savefile-ready") == [
            "savefile-preparing",
            "savefile-ready",
        ]
        await h.stop()

    run(scenario())


def test_an_empty_pool_restores_and_the_caller_never_chooses(tmp_path: Path) -> None:
    h, backend, pool = harness(tmp_path)

    async def scenario() -> None:
        await h.start()
        # Before the savefile is ready, a request is a fresh start: it never waits for it.
        first = await h.pool.request("@dispvm", timeout=60)
        assert first.origin == "fresh"
        await until_ready(h)
        handout = await h.pool.request("@dispvm", timeout=60)
        assert handout.origin == "restore"
        assert backend.restored == [handout.name]
        assert handout.waited_ms < first.waited_ms / 5
        # Its own disks: snapshots of the saved ones, removed with it.
        own = sorted(v for v in pool.volumes if f"--{handout.name}--" in v)
        assert own == [f"dispoold--{handout.name}--xvda", f"dispoold--{handout.name}--xvdc"]
        provision = backend.domains[handout.name].provision
        identity = provision.identity
        assert identity is not None and identity.name == handout.name
        await h.pool.release(handout.name)
        assert not [v for v in pool.volumes if f"--{handout.name}--" in v]
        assert h.events_of("requested")[-1]["origin"] == "restore"
        await h.stop()

    run(scenario())


def test_two_restores_get_distinct_names_addresses_volumes_and_seeds(tmp_path: Path) -> None:
    h, backend, _ = harness(tmp_path)

    async def scenario() -> None:
        await h.start()
        await until_ready(h)
        one, two = await asyncio.gather(
            h.pool.request("@dispvm", timeout=60), h.pool.request("@dispvm", timeout=60)
        )
        assert {one.origin, two.origin} == {"restore", "fresh"} or one.origin == two.origin
        ids = [backend.domains[n].provision.identity for n in (one.name, two.name)]
        assert ids[0] is not None and ids[1] is not None
        assert ids[0].name != ids[1].name and ids[0].seed != ids[1].seed
        assert ids[0].interfaces[0].mac != ids[1].interfaces[0].mac
        assert ids[0].interfaces[0].address != ids[1].interfaces[0].address
        disks = [{d.path for d in backend.domains[n].provision.disks} for n in (one.name, two.name)]
        assert not disks[0] & disks[1]
        await h.stop()

    run(scenario())


def test_a_preload_beats_a_restore_and_refills_are_restores(tmp_path: Path) -> None:
    h, backend, _ = harness(tmp_path, preload_max=1)

    async def scenario() -> None:
        await h.start()
        await until_ready(h)
        await settle(60)
        [preload] = h.names(Stage.PAUSED)
        handout = await h.pool.request("@dispvm")
        assert handout.origin == "preload" and handout.name == preload
        await settle(30)
        [refill] = h.names(Stage.PAUSED)
        assert refill in backend.restored  # the pool came back by restore, not by boot
        await h.stop()

    run(scenario())


def test_a_template_change_invalidates_at_once_and_requests_fall_back_meanwhile(
    tmp_path: Path,
) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"1")
    h, _, _ = harness(tmp_path, kernel=str(kernel))

    async def scenario() -> None:
        await h.start()
        await until_ready(h)
        before = savefile(h)["made_from"]
        kernel.write_bytes(b"22")  # the template is updated
        handout = await h.pool.request("@dispvm", timeout=60)
        # The fingerprint check runs every 5 s: this one may still restore, and the
        # next one after the check must not.
        await settle(6)
        assert savefile(h)["state"] in ("invalid", "preparing")
        later = await h.pool.request("@dispvm", timeout=60)
        assert later.origin == "fresh"
        await until_ready(h, 300)
        assert savefile(h)["made_from"] != before
        again = await h.pool.request("@dispvm", timeout=60)
        assert again.origin == "restore"
        assert handout.origin in ("restore", "fresh")
        await h.stop()

    run(scenario())


def test_a_damaged_savefile_is_caught_and_made_again(tmp_path: Path) -> None:
    h, backend, _ = harness(tmp_path)

    async def scenario() -> None:
        await h.start()
        await until_ready(h)
        image = tmp_path / "savefiles" / "dvm.img"
        image.write_bytes(image.read_bytes()[:100])  # truncated
        handout = await h.pool.request("@dispvm", timeout=60)
        assert handout.origin == "fresh"  # fell through within the request
        assert backend.restored == []  # the checksum caught it before libxl saw it
        [discarded] = h.events_of("savefile-discarded")
        assert "checksum" in discarded["reason"]
        # The restore that found it out, then the fresh start it fell through to.
        assert [e["origin"] for e in h.events_of("requested")] == ["restore", "fresh"]
        # While it is made again, requests never try the damaged one.
        await h.pool.request("@dispvm", timeout=60)
        assert [e["origin"] for e in h.events_of("requested")][2:] == ["fresh"]
        await until_ready(h, 300)
        assert (await h.pool.request("@dispvm", timeout=60)).origin == "restore"
        await h.stop()

    run(scenario())


def test_a_restore_that_fails_falls_through_and_the_savefile_is_made_again(
    tmp_path: Path,
) -> None:
    h, backend, pool = harness(tmp_path)

    async def scenario() -> None:
        await h.start()
        await until_ready(h)
        backend.fail_restore = True
        handout = await h.pool.request("@dispvm", timeout=60)
        assert handout.origin == "fresh"
        assert "restore" in h.events_of("savefile-discarded")[0]["reason"]
        await until_ready(h, 300)
        assert savefile(h)["state"] == "ready"
        # The failed restore left no volume behind.
        owners = {v.split("--")[1] for v in pool.volumes}
        assert owners == {"savefile-dvm", handout.name}
        await h.stop()

    run(scenario())


def test_kill_during_preparation_leaves_nothing_and_a_new_one_is_made(tmp_path: Path) -> None:
    first, backend, pool = harness(tmp_path)

    async def before_the_kill() -> None:
        await first.start()
        await settle(12)  # booted, running its prerun: about to be saved
        assert savefile(first)["state"] == "preparing"

    run(before_the_kill(), crash=True)
    second = first.next_lifetime()

    async def after_the_restart() -> None:
        await second.start()
        await settle(1)
        assert savefile(second)["state"] == "preparing"  # a new one: the old one is gone
        [preparing] = second.names()
        assert set(backend.domains) == {preparing}
        await until_ready(second)
        assert sorted(pool.volumes) == [
            "dispoold--savefile-dvm--xvda",
            "dispoold--savefile-dvm--xvdc",
        ]
        await second.stop()

    run(after_the_restart())


def test_kill_during_the_save_leaves_no_half_savefile(tmp_path: Path) -> None:
    backend = SavingBackend({"ready_delay": 10.0})
    backend.save_delay = 5.0
    first, _, _ = harness(tmp_path, backend=backend)
    directory = tmp_path / "savefiles"

    async def before_the_kill() -> None:
        await first.start()
        for _ in range(120):
            await asyncio.sleep(0.5)
            if any(call.operation == "save" for call in backend.counters.calls):
                break
        await asyncio.sleep(2)  # half-way through the save

    run(before_the_kill(), crash=True)
    assert [p.name for p in directory.iterdir()] == [".dvm.img.tmp"]
    second = first.next_lifetime()

    async def after_the_restart() -> None:
        await second.start()
        assert ".dvm.img.tmp" not in [p.name for p in directory.iterdir()]
        assert savefile(second)["state"] in ("absent", "preparing")
        await until_ready(second)
        await second.stop()

    run(after_the_restart())


def test_a_prerun_script_goes_to_the_guest_and_a_too_big_one_is_a_clear_failure(
    tmp_path: Path,
) -> None:
    script = tmp_path / "prerun.sh"
    script.write_text("echo warming caches\n")
    h, backend, _ = harness(tmp_path, savefile={"enabled": True, "prerun": str(script)})

    async def scenario() -> None:
        await h.start()
        await settle(1)
        [preparing] = h.names()
        assert backend.domains[preparing].provision.prerun == "echo warming caches\n"
        await until_ready(h)
        script.write_text("x" * 4000)  # over the bound: the next preparation fails
        await settle(6)
        await settle(20)
        [failed, *_] = h.events_of("savefile-failed")
        assert "3072 bytes" in failed["error"] and failed["template"] == "dvm"
        assert savefile(h)["state"] == "absent"
        await h.stop()

    run(scenario())


def test_without_a_backend_that_saves_there_is_no_savefile(tmp_path: Path) -> None:
    from tests.doubles import FakeBackend

    h = Harness(
        tmp_path,
        config(tmp_path),
        backend=FakeBackend(),
        storage=Storage({"thin": FakePool(FakePool.Options(key=str(tmp_path)))}, "dispoold"),
    )

    async def scenario() -> None:
        await h.start()
        await settle(30)
        assert savefile(h)["state"] == "absent" and h.names() == []
        assert (await h.pool.request("@dispvm", timeout=60)).origin == "fresh"
        await h.stop()

    run(scenario())


@pytest.mark.parametrize("state", list(State))
def test_every_state_has_its_wire_name(state: State) -> None:
    assert state.value in {"absent", "preparing", "ready", "invalid"}


def test_only_a_ready_savefile_of_the_template_as_it_is_now_is_usable(tmp_path: Path) -> None:
    import logging

    from dispoold.events import EventBus
    from dispoold.journal import Journal
    from dispoold.origins.restore import Keeper
    from dispoold.savefile import Description, Savefile, Store

    described = Description(
        template="dvm",
        fingerprint="f1",
        memory_mib=96,
        maxmem_mib=256,
        vcpus=1,
        image="dvm.img",
        size=1,
        sha256="0",
        made_at=0.0,
        seconds=1.0,
    )
    log = logging.getLogger("test")
    bus = EventBus()
    keeper = Keeper(
        Store(tmp_path), Storage({}, "dispoold"), Journal(tmp_path / "j", log=log), bus, log
    )
    keeper.configure(["dvm"])
    for state in State:
        keeper.savefiles["dvm"] = Savefile("dvm", state=state, description=described)
        assert keeper.usable("dvm", "f1") is (state is State.READY)
    assert not keeper.usable("dvm", "f2")  # made from an older template
    assert keeper.savefiles["dvm"].state is State.INVALID
    assert not keeper.usable("other", "f1")
