"""The daemon's own balancer (plain Xen) against a backend whose balloons take time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from dispoold.backend import Marker
from dispoold.config import MemorySettings, TemplateSettings
from dispoold.memory import (
    DOMAIN_OVERHEAD_MIB,
    Balancer,
    MemoryManager,
    MemoryManagerError,
    NoMemory,
)
from dispoold.memory.port import PreloadMemory
from tests.memory_doubles import BalloonBackend

# Real time, shrunk: qmemman's 0.1 s poll, 1 s window and 3 s check period become
# 0.01 s, 0.1 s and 0.3 s. A "slow" balloon moves at half the give-up rate.
CHECK_PERIOD = 0.3
SETTINGS = MemorySettings(
    manager="balancer",
    check_period=CHECK_PERIOD,
    check_window=0.1,
    check_mib_s=100,
    poll_interval=0.01,
)


def make_balancer(backend: BalloonBackend, settings: MemorySettings = SETTINGS) -> Balancer:
    return Balancer(settings, backend)


async def create(backend: BalloonBackend, name: str, memory: int = 1000) -> None:
    """A domain of ``memory`` MiB whose guest uses a quarter: preferred = 325 MiB at 1000."""
    template = TemplateSettings(memory=memory, maxmem=memory)
    await backend.create(name, template, Marker("dispoold", "t", int(name[4:])))


async def start(balancer: Balancer, backend: BalloonBackend, name: str, memory: int = 1000) -> None:
    """Create a domain the way the engine does: inside an allocation."""
    async with balancer.allocation(name, memory):
        await create(backend, name, memory)


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[BalloonBackend]:
    backend = BalloonBackend({"host_mib": 16_384})
    await backend.open()
    yield backend
    await backend.close()


@pytest_asyncio.fixture
async def balancer(backend: BalloonBackend) -> AsyncIterator[Balancer]:
    balancer = make_balancer(backend)
    await balancer.open()
    yield balancer
    await balancer.close()


def test_balancer_implements_the_protocol(balancer: Balancer) -> None:
    assert isinstance(balancer, MemoryManager)
    assert isinstance(balancer, PreloadMemory)
    assert balancer.shrink_wanted() == []  # nothing it could not do now


@pytest.mark.asyncio
async def test_an_allocation_is_sized_by_the_template(backend: BalloonBackend) -> None:
    # 4 MiB + 1.5 MiB per vCPU, and for PVH 8 KiB per MiB of maxmem: 400 + 10 + 32 MiB.
    template = TemplateSettings(memory=400, maxmem=4096, vcpus=4, options={"type": "pvh"})
    backend.options.host_mib = 441
    balancer = make_balancer(backend)
    with pytest.raises(NoMemory, match="442 MiB needed"):
        async with balancer.allocation("disp1", 400, template):
            pass
    backend.options.host_mib = 442
    async with balancer.allocation("disp1", 400, template):
        pass


@pytest.mark.asyncio
async def test_a_handed_out_disposable_is_never_shrunk(
    backend: BalloonBackend, balancer: Balancer
) -> None:
    await start(balancer, backend, "disp1")
    balancer.include("disp1")
    with pytest.raises(MemoryManagerError, match="disp1: it has been handed out"):
        await balancer.shrink("disp1")
    assert backend.targets == []


# -- shrink ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_shrink_converges_to_preferred(backend: BalloonBackend, balancer: Balancer) -> None:
    await create(backend, "disp1")
    backend.speed["disp1"] = 5000  # 675 MiB in ~0.14 s
    result = await balancer.shrink("disp1")
    assert result.converged
    assert result.target_mib == 325  # 250 used x 1.3
    assert result.actual_mib <= 325 * 1.1
    assert backend.targets == [("disp1", 325)]
    assert 0.05 < result.seconds < 1.0
    assert balancer.status()["shrinks"][-1]["outcome"] == "converged"


@pytest.mark.asyncio
async def test_shrink_respects_floor_and_maxmem(backend: BalloonBackend) -> None:
    balancer = make_balancer(backend, SETTINGS.model_copy(update={"preferred_floor_mib": 400}))
    await create(backend, "disp1")
    assert (await balancer.shrink("disp1")).target_mib == 400  # 325 < floor
    await create(backend, "disp2", memory=300)  # preferred 98 -> floor 400 -> maxmem 300
    result = await balancer.shrink("disp2")
    assert result.target_mib == 300
    assert [t for t in backend.targets if t[0] == "disp2"] == []  # never grows a preload
    await balancer.close()


@pytest.mark.asyncio
async def test_shrink_counts_within_ratio_as_converged(
    backend: BalloonBackend, balancer: Balancer
) -> None:
    await create(backend, "disp1")
    backend.stuck_at["disp1"] = 355  # 355 / 325 = 1.09
    result = await balancer.shrink("disp1")
    assert result.converged
    assert result.actual_mib == 355
    assert result.seconds < CHECK_PERIOD


@pytest.mark.asyncio
async def test_shrink_gives_up_on_a_slow_balloon(
    backend: BalloonBackend, balancer: Balancer
) -> None:
    await create(backend, "disp1")
    backend.speed["disp1"] = 50  # half the give-up rate of 100 MiB/s
    result = await balancer.shrink("disp1")
    assert not result.converged
    assert CHECK_PERIOD <= result.seconds < CHECK_PERIOD + 0.3
    assert 1000 - 50 * (result.seconds + 0.05) <= result.actual_mib < 1000
    assert balancer.status()["shrinks"][-1]["outcome"] == "gave up"


@pytest.mark.asyncio
async def test_shrink_gives_up_on_a_balloon_that_stops(
    backend: BalloonBackend, balancer: Balancer
) -> None:
    await create(backend, "disp1")
    backend.stuck_at["disp1"] = 600
    result = await balancer.shrink("disp1")
    assert not result.converged
    assert (result.target_mib, result.actual_mib) == (325, 600)
    assert CHECK_PERIOD <= result.seconds < CHECK_PERIOD + 0.3


@pytest.mark.asyncio
async def test_shrink_keeps_going_while_the_balloon_moves_fast_enough(
    backend: BalloonBackend, balancer: Balancer
) -> None:
    await create(backend, "disp1", memory=2000)  # preferred 650, 1350 MiB to go
    backend.speed["disp1"] = 1000  # 1.35 s: far past the check period, never slow
    result = await balancer.shrink("disp1")
    assert result.converged
    assert result.seconds > CHECK_PERIOD * 2


@pytest.mark.asyncio
async def test_shrink_failures_name_the_domain(backend: BalloonBackend, balancer: Balancer) -> None:
    with pytest.raises(MemoryManagerError, match="disp9"):
        await balancer.shrink("disp9")
    await create(backend, "disp1")
    backend.domains["disp1"].used_mib = None  # type: ignore[assignment]
    with pytest.raises(MemoryManagerError, match="disp1: the guest reports no memory use"):
        await balancer.shrink("disp1")
    assert balancer.status()["shrinks"][-1]["outcome"] == "failed"
    assert "disp1" in balancer.status()["last_error"]


@pytest.mark.asyncio
async def test_shrink_of_a_domain_that_vanishes_fails_cleanly(
    backend: BalloonBackend, balancer: Balancer
) -> None:
    await create(backend, "disp1")
    backend.speed["disp1"] = 100
    task = asyncio.create_task(balancer.shrink("disp1"))
    await asyncio.sleep(0.05)
    backend.vanish("disp1")
    with pytest.raises(MemoryManagerError, match="disp1"):
        await task


@pytest.mark.asyncio
async def test_cancelled_shrink_leaves_nothing_locked_and_include_gives_memory_back(
    backend: BalloonBackend, balancer: Balancer
) -> None:
    await start(balancer, backend, "disp1")
    backend.speed["disp1"] = 1000
    task = asyncio.create_task(balancer.shrink("disp1"))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not balancer._lock.locked()
    squeezed = (await backend.memory("disp1")).actual_mib
    assert squeezed < 900
    balancer.include("disp1")  # the request got it
    for _ in range(100):
        await asyncio.sleep(0.01)
        if (await backend.memory("disp1")).actual_mib >= 1000:
            break
    info = await backend.memory("disp1")
    assert (info.target_mib, info.actual_mib) == (1000, 1000)
    assert balancer.status()["shrinks"][-1]["outcome"] == "cancelled"
    # Nothing is held: the next allocation goes straight in.
    async with asyncio.timeout(0.5), balancer.allocation("disp2", 100):
        pass


@pytest.mark.asyncio
async def test_give_back_waits_for_a_target_still_in_flight(backend: BalloonBackend) -> None:
    """A shrink cancelled while its target request is in a worker thread: the target
    lands late, and the give-back must come after it, not before."""
    backend.set_delay = 0.3
    balancer = make_balancer(backend)
    await start(balancer, backend, "disp1")
    task = asyncio.create_task(balancer.shrink("disp1"))
    await asyncio.sleep(0.1)  # the shrink's target request is under way
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    balancer.include("disp1")
    await asyncio.sleep(0.8)
    assert backend.targets == [("disp1", 325), ("disp1", 1000)]
    assert (await backend.memory("disp1")).target_mib == 1000
    await balancer.close()


# -- exclusion (Qubes #11121) ------------------------------------------------------


@pytest.mark.asyncio
async def test_paused_preloads_never_get_memory(
    backend: BalloonBackend, balancer: Balancer
) -> None:
    for name in ("disp1", "disp2", "disp3"):
        await start(balancer, backend, name)
        await balancer.shrink(name)
    balancer.exclude("disp1")
    balancer.exclude("disp2")
    balancer.include("disp2")  # handed out...
    balancer.exclude("disp3")
    balancer.include("disp3")
    balancer.exclude("disp3")  # ...and (in a test only) paused again before the give-back ran
    backend.targets.clear()
    balancer.forget("disp4")  # memory freed up: a give-back round
    await asyncio.sleep(0.1)
    grown = {name for name, target in backend.targets if target > 400}
    assert grown == {"disp2"}
    assert balancer.status()["domains"] == {"starting": 0, "excluded": 2, "included": 1}


@pytest.mark.asyncio
async def test_forget_gives_squeezed_disposables_their_memory_back(
    backend: BalloonBackend,
) -> None:
    backend.options.host_mib = 2200
    balancer = make_balancer(backend)
    await start(balancer, backend, "disp1")
    balancer.include("disp1")
    await start(balancer, backend, "disp2")
    balancer.include("disp2")
    # 200 MiB free: disp3 needs 500, taken from disp1 and disp2.
    async with balancer.allocation("disp3", 500):
        await create(backend, "disp3", memory=500)
    squeezed = [(await backend.memory(n)).target_mib for n in ("disp1", "disp2")]
    assert all(t < 1000 for t in squeezed)
    await backend.destroy("disp3")
    balancer.forget("disp3")
    await asyncio.sleep(0.2)
    assert [(await backend.memory(n)).target_mib for n in ("disp1", "disp2")] == [1000, 1000]
    await balancer.close()


@pytest.mark.asyncio
async def test_a_squeezed_disposable_that_vanished_does_not_keep_the_others_waiting(
    backend: BalloonBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.options.host_mib = 3200
    balancer = make_balancer(backend)
    for name in ("disp1", "disp2", "disp3"):
        await start(balancer, backend, name)
        balancer.include(name)
    async with balancer.allocation("disp4", 500):
        await create(backend, "disp4", memory=500)
    squeezed = [(await backend.memory(n)).target_mib for n in ("disp1", "disp3")]
    assert all(target < 1000 for target in squeezed)
    # disp2 goes away behind the balancer's back (shut down by its user) just as disp4's
    # destruction frees memory: the others still get theirs back, and nobody is warned.
    await backend.destroy("disp2")
    await backend.destroy("disp4")
    balancer.forget("disp4")
    await asyncio.sleep(0.2)
    assert [(await backend.memory(n)).target_mib for n in ("disp1", "disp3")] == [1000, 1000]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    await balancer.close()


# -- allocation --------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_donor_that_vanished_does_not_fail_the_allocation(backend: BalloonBackend) -> None:
    backend.options.host_mib = 3200
    balancer = make_balancer(backend)
    for name in ("disp1", "disp2", "disp3"):
        await start(balancer, backend, name)
        balancer.include(name)
    # disp2 was shut down by its user; the engine has not heard of it yet.
    await backend.destroy("disp2")
    async with balancer.allocation("disp4", 1500):
        await create(backend, "disp4", memory=1500)
    assert (await backend.memory("disp4")).actual_mib == 1500
    await balancer.close()


@pytest.mark.asyncio
async def test_allocation_serializes_creations(balancer: Balancer) -> None:
    inside: list[str] = []
    overlaps = 0

    async def allocate(name: str) -> None:
        nonlocal overlaps
        async with balancer.allocation(name, 100):
            overlaps += bool(inside)
            inside.append(name)
            await asyncio.sleep(0.01)
            inside.remove(name)

    await asyncio.wait_for(asyncio.gather(*(allocate(f"disp{i}") for i in range(8))), 2)
    assert overlaps == 0


@pytest.mark.asyncio
async def test_allocation_reclaims_from_handed_out_disposables(
    backend: BalloonBackend,
) -> None:
    backend.options.host_mib = 2500
    balancer = make_balancer(backend)
    for name in ("disp1", "disp2"):
        await start(balancer, backend, name)
        balancer.include(name)
    backend.speed["disp1"] = 2000
    backend.speed["disp2"] = 2000
    assert await balancer.available_mib() == 500
    async with balancer.allocation("disp3", 900):
        assert backend.free_mib() >= 900 + DOMAIN_OVERHEAD_MIB
        await create(backend, "disp3", memory=900)
    for name in ("disp1", "disp2"):
        info = await backend.memory(name)
        assert 325 <= info.target_mib < 1000  # squeezed, never below preferred


@pytest.mark.asyncio
async def test_allocation_raises_no_memory_when_nothing_can_give_enough(
    backend: BalloonBackend,
) -> None:
    backend.options.host_mib = 2500
    balancer = make_balancer(backend)
    await start(balancer, backend, "disp1")
    balancer.include("disp1")  # 675 MiB above preferred
    await start(balancer, backend, "disp2")
    balancer.exclude("disp2")  # paused: cannot give anything
    backend.targets.clear()
    with pytest.raises(NoMemory, match=r"disp3: 500 MiB free and 675 MiB reclaimable"):
        async with balancer.allocation("disp3", 1200):
            pytest.fail("entered without memory")
    assert backend.targets == []  # nobody was squeezed for nothing
    assert not balancer._lock.locked()


@pytest.mark.asyncio
async def test_allocation_raises_no_memory_when_donors_do_not_move(
    backend: BalloonBackend,
) -> None:
    backend.options.host_mib = 2000
    balancer = make_balancer(backend)
    await start(balancer, backend, "disp1")
    balancer.include("disp1")
    backend.stuck_at["disp1"] = 990
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(NoMemory, match="too slowly"):
        async with balancer.allocation("disp2", 1200):
            pytest.fail("entered without memory")
    assert CHECK_PERIOD <= loop.time() - began < CHECK_PERIOD + 0.3
    assert not balancer._lock.locked()


@pytest.mark.asyncio
async def test_host_reserve_is_never_handed_out(backend: BalloonBackend) -> None:
    backend.options.host_mib = 1000
    balancer = make_balancer(backend, SETTINGS.model_copy(update={"host_reserve_mib": 600}))
    assert await balancer.available_mib() == 400
    with pytest.raises(NoMemory):
        async with balancer.allocation("disp1", 500):
            pass
    balancer2 = make_balancer(backend, SETTINGS.model_copy(update={"host_reserve_mib": 5000}))
    assert await balancer2.available_mib() == 0
    status = balancer.status()
    assert (status["free_mib"], status["available_mib"]) == (1000, 400)


@pytest.mark.asyncio
async def test_cancelled_wait_for_an_allocation_releases_everything(
    balancer: Balancer,
) -> None:
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def first() -> None:
        async with balancer.allocation("disp1", 100):
            entered.set()
            await leave.wait()

    holder = asyncio.create_task(first())
    await entered.wait()
    waiter = asyncio.create_task(balancer.allocation("disp2", 100).__aenter__())
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    leave.set()
    await holder
    async with asyncio.timeout(0.5), balancer.allocation("disp3", 100):
        pass


@pytest.mark.asyncio
async def test_a_failed_creation_releases_the_allocation(balancer: Balancer) -> None:
    with pytest.raises(RuntimeError):
        async with balancer.allocation("disp1", 100):
            raise RuntimeError("create failed")
    assert not balancer._lock.locked()
    assert "disp1" not in balancer._domains


@pytest.mark.asyncio
async def test_status_is_plain_data(backend: BalloonBackend, balancer: Balancer) -> None:
    import msgpack

    await create(backend, "disp1")
    await balancer.shrink("disp1")
    await balancer.available_mib()
    status = balancer.status()
    assert msgpack.unpackb(msgpack.packb(status)) == status
    assert status["manager"] == "balancer"
    assert status["shrinks"][0]["name"] == "disp1"


@pytest.mark.asyncio
async def test_available_memory_can_be_read_inside_an_allocation(balancer: Balancer) -> None:
    # The engine re-checks the threshold inside the block: that must not wait on the lock.
    async with balancer.allocation("disp1", 100):
        assert await asyncio.wait_for(balancer.available_mib(), 0.5) == 16_384


@pytest.mark.asyncio
async def test_a_disposable_found_at_restart_keeps_what_it_has(
    backend: BalloonBackend, balancer: Balancer
) -> None:
    # Created (and squeezed) by the previous daemon; maxmem is far above its creation size.
    await backend.create("disp1", TemplateSettings(memory=400, maxmem=4000), Marker("d", "t", 1))
    await backend.set_memory_target("disp1", 300)
    balancer.include("disp1")
    await asyncio.sleep(0.1)
    assert (await backend.memory("disp1")).target_mib == 300
