"""The qmemman client against the qmemman stand-in (tests/qmemman_standin.py) on a real
Unix socket, over the balloon double: qmemman as it really behaves (issue 14)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from dispoold.backend import Marker
from dispoold.config import MemorySettings, TemplateSettings
from dispoold.memory import MemoryManager, MemoryManagerError, NoMemory, QmemmanClient
from dispoold.memory.port import PreloadMemory
from tests.memory_doubles import (
    HANG_UP,
    MIB,
    NO_ANSWER,
    BalloonBackend,
    QmemmanStandIn,
    Rules,
    standin,
    write_avail,
)

#: Every domain here: 1000 MiB, its guest uses a quarter (250 MiB), so qmemman's
#: preferred size is max(min(250 x 1.3, 1000), 200) = 325 MiB.
MEMORY = 1000
PREFERRED = 325
#: qmemman's 0.1 s poll, 1 s window and 3 s check period, shrunk as in the stand-in.
FAST = {"check_period": 0.3, "check_window": 0.1, "poll_interval": 0.01}


@pytest.fixture
def rundir() -> Iterator[Path]:
    # A short path: a Unix socket's path must fit in 108 bytes.
    path = Path(tempfile.mkdtemp(prefix="qm", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings(rundir: Path) -> MemorySettings:
    return MemorySettings(
        manager="qmemman",
        qmemman_socket=rundir / "qmemman.sock",
        qmemman_avail_file=rundir / "qmemman-avail-mem",
        qmemman_connect_timeout=0.5,
        qmemman_answer_timeout=0.5,
        **FAST,
    )


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[BalloonBackend]:
    backend = BalloonBackend({"host_mib": 16_384})
    await backend.open()
    yield backend
    await backend.close()


@pytest_asyncio.fixture
async def qmemman(
    settings: MemorySettings, backend: BalloonBackend
) -> AsyncIterator[QmemmanStandIn]:
    server = standin(settings.qmemman_socket, backend, settings.qmemman_avail_file)
    async with server:
        yield server


@pytest_asyncio.fixture
async def client(settings: MemorySettings, backend: BalloonBackend) -> AsyncIterator[QmemmanClient]:
    client = QmemmanClient(settings, backend)
    await client.open()
    yield client
    await client.close()


async def create(
    client: QmemmanClient, backend: BalloonBackend, name: str, memory: int = MEMORY
) -> None:
    """A domain created as the engine creates one: inside the allocation."""
    template = TemplateSettings(memory=memory, maxmem=memory)
    async with client.allocation(name, memory):
        await backend.create(name, template, Marker("dispoold", "t", int(name[4:])))


async def foreign(backend: BalloonBackend, name: str, memory: int = MEMORY) -> None:
    """A domain some other toolstack created (it reports nothing to qmemman)."""
    template = TemplateSettings(memory=memory, maxmem=memory)
    await backend.create(name, template, Marker("other", "t", int(name[4:])))


class Peers:
    """Other clients of qmemman (qubesd), each on its own connection; all closed at the
    end of the test, whatever happened."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.writers: list[asyncio.StreamWriter] = []

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_unix_connection(str(self.path))
        self.writers.append(writer)
        return reader, writer

    async def hold(self) -> asyncio.StreamWriter:
        """qubesd asks for memory and keeps qmemman while it creates a domain."""
        reader, writer = await self.connect()
        writer.write(b"1000\n")
        assert await reader.readline() == b"OK\n"
        return writer

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@pytest_asyncio.fixture
async def peers(settings: MemorySettings) -> AsyncIterator[Peers]:
    peers = Peers(settings.qmemman_socket)
    yield peers
    await peers.close()


def guests_can_report(backend: BalloonBackend) -> None:
    """Create ``memory/meminfo`` owned by each new domain, whatever the client does, so
    that a test of another point does not depend on the client creating them."""

    async def nothing(name: str, domid: int) -> None:
        pass

    backend.observe_builds(nothing, guest_keys=("memory/meminfo",))


def reported(qmemman: QmemmanStandIn, domid: int) -> int | None:
    """The used memory qmemman has recorded for ``domid``, if any yet."""
    domain = qmemman.domains.get(domid)
    return None if domain is None else domain.mem_used


async def until(condition: Callable[[], object], timeout: float = 2.0) -> None:
    """Wait until ``condition()`` holds: the doubles offer nothing to wait on, so poll."""
    async with asyncio.timeout(timeout):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def test_client_implements_the_protocol(settings: MemorySettings) -> None:
    client = QmemmanClient(settings, BalloonBackend())
    assert isinstance(client, MemoryManager)
    assert isinstance(client, PreloadMemory)


# -- the stand-in itself ---------------------------------------------------------------------


@pytest.mark.asyncio
async def test_the_stand_in_answers_ok_without_ballooning_when_there_is_no_meminfo(
    qmemman: QmemmanStandIn, backend: BalloonBackend, peers: Peers
) -> None:
    await foreign(backend, "disp1")
    await asyncio.sleep(0.05)
    reader, writer = await peers.connect()
    writer.write(b"1:0\n")
    assert await reader.readline() == b"OK\n"
    writer.close()
    assert backend.targets == []
    assert any("meminfo was not reported back" in e for e in qmemman.events)


@pytest.mark.asyncio
async def test_the_stand_in_serves_one_client_at_a_time(
    qmemman: QmemmanStandIn, peers: Peers
) -> None:
    first = await peers.connect()
    first[1].write(b"1000\n")
    assert await first[0].readline() == b"OK\n"
    second = await peers.connect()
    second[1].write(b"1000\n")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(second[0].readline(), 0.2)  # not even read yet
    first[1].close()
    assert await asyncio.wait_for(second[0].readline(), 1) == b"OK\n"


# -- available memory ------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_available_memory_comes_from_qmemmans_file(
    client: QmemmanClient, qmemman: QmemmanStandIn, settings: MemorySettings
) -> None:
    # The stand-in publishes it at start: its free memory, less 50 MiB it keeps.
    await until(settings.qmemman_avail_file.exists)
    assert await client.available_mib() == 16_384 - 50
    write_avail(settings.qmemman_avail_file, str(3000 * MIB + 12345))
    assert await client.available_mib() == 3000
    # qmemman writes a negative figure when memory is short.
    write_avail(settings.qmemman_avail_file, str(-200 * MIB))
    assert await client.available_mib() == 0
    assert client.status()["available_mib"] == 0


@pytest.mark.asyncio
async def test_available_memory_file_missing_or_garbled(
    client: QmemmanClient, qmemman: QmemmanStandIn, settings: MemorySettings
) -> None:
    settings.qmemman_avail_file.unlink(missing_ok=True)
    with pytest.raises(MemoryManagerError, match=r"does not exist .is qmemman running"):
        await client.available_mib()
    for garbage in ("", "12.5", "lots", "1 2", "9" * 80):
        write_avail(settings.qmemman_avail_file, garbage)
        with pytest.raises(MemoryManagerError, match="not a number of bytes"):
            await client.available_mib()


@pytest.mark.asyncio
async def test_a_stale_available_memory_file_is_not_trusted(
    client: QmemmanClient, qmemman: QmemmanStandIn, settings: MemorySettings
) -> None:
    await until(settings.qmemman_avail_file.exists)
    await qmemman.stop()  # the file stays behind, as qmemman's does
    assert settings.qmemman_avail_file.exists()
    with pytest.raises(MemoryManagerError, match="qmemman is not running"):
        await client.available_mib()
    # Killed rather than stopped: the socket file is there, nobody listens.
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(settings.qmemman_socket))
    dead.close()
    with pytest.raises(MemoryManagerError, match="qmemman"):
        await client.available_mib()


@pytest.mark.asyncio
async def test_available_memory_can_be_read_inside_an_allocation(
    client: QmemmanClient, qmemman: QmemmanStandIn, settings: MemorySettings
) -> None:
    # The engine re-checks the threshold inside the block: that must not wait on the
    # request lock (and qmemman, holding its own lock, does not rewrite the file then).
    async with client.allocation("disp9", 400):
        write_avail(settings.qmemman_avail_file, str(2048 * MIB))
        assert await asyncio.wait_for(client.available_mib(), 0.5) == 2048


# -- allocation ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_allocation_asks_for_what_qubesd_asks_for(
    client: QmemmanClient, qmemman: QmemmanStandIn
) -> None:
    # qubesd: the guest's memory + 4 MiB + 1.5 MiB per vCPU (one here, PV).
    async with client.allocation("disp9", 400):
        pass
    assert [r.line for r in qmemman.requests] == [str(400 * MIB + 4 * MIB + 3 * MIB // 2)]


@pytest.mark.asyncio
async def test_allocation_holds_qmemman_until_the_domain_exists(
    client: QmemmanClient, qmemman: QmemmanStandIn
) -> None:
    async with client.allocation("disp9", 400):
        assert len(qmemman.requests) == 1
        assert qmemman.lock.locked()  # qmemman balances nothing while we create
        await asyncio.sleep(0.1)
    await until(lambda: qmemman.requests[0].held is not None)
    held = qmemman.requests[0].held
    assert held is not None and held >= 0.1
    assert qmemman.second_lines == 0
    assert client.status()["qmemman_reachable"] is True


@pytest.mark.asyncio
async def test_allocation_ends_once_the_domain_exists_before_its_unpause(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    backend.unpause_delay = 0.4  # the build is done; libxl has not unpaused it yet
    began = asyncio.get_running_loop().time()
    await create(client, backend, "disp1")
    assert asyncio.get_running_loop().time() - began >= 0.4
    await until(lambda: qmemman.requests[0].held is not None)
    held = qmemman.requests[0].held
    assert held is not None and held < 0.2  # released when the domain existed


@pytest.mark.asyncio
async def test_allocation_creates_the_meminfo_keys_owned_by_the_domain(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    await create(client, backend, "disp1")
    assert {"memory/meminfo", "memory/swapinfo"} <= backend.guest_writable["disp1"]
    # ...so the guest reports, and qmemman learns what it uses.
    await until(lambda: reported(qmemman, 1) == 250 * MIB)


@pytest.mark.asyncio
async def test_allocation_fail_is_no_memory(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    backend.options.host_mib = 1000  # nothing to balloon: FAIL
    with pytest.raises(NoMemory, match=r"allocate 2000 MiB for disp9: .*FAIL"):
        async with client.allocation("disp9", 2000):
            pytest.fail("entered without memory")
    assert not client._request_lock.locked()
    assert qmemman.requests[0].answer == "FAIL"


@pytest.mark.asyncio
async def test_allocation_balloons_running_domains_down(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    guests_can_report(backend)
    backend.options.host_mib = 2200
    await create(client, backend, "disp1")
    await create(client, backend, "disp2")  # qmemman shrinks disp1 toward preferred
    await asyncio.sleep(0.1)
    await create(client, backend, "disp3", memory=400)
    assert backend.domains["disp1"].memory_mib < MEMORY


@pytest.mark.asyncio
async def test_allocation_invalid_arg_is_an_error_not_a_shortage(
    client: QmemmanClient, qmemman: QmemmanStandIn
) -> None:
    qmemman.answers["free"] = "INVALID_ARG"
    with pytest.raises(MemoryManagerError, match="INVALID_ARG") as raised:
        async with client.allocation("disp9", 400):
            pytest.fail("entered after INVALID_ARG")
    assert not isinstance(raised.value, NoMemory)


@pytest.mark.asyncio
async def test_missing_socket_is_a_clear_error(client: QmemmanClient) -> None:
    with pytest.raises(MemoryManagerError, match=r"qmemman is not running \(.*does not exist\)"):
        async with client.allocation("disp9", 400):
            pass
    status = client.status()
    assert status["qmemman_reachable"] is False
    assert "not running" in status["last_error"]


@pytest.mark.asyncio
async def test_dead_qmemman_is_a_clear_error(
    client: QmemmanClient, settings: MemorySettings
) -> None:
    # The socket file is there, nobody listens on it (qmemman crashed).
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(settings.qmemman_socket))
    sock.close()
    with pytest.raises(MemoryManagerError, match=r"nothing listens on .*qmemman died"):
        async with client.allocation("disp9", 400):
            pass


@pytest.mark.asyncio
async def test_a_busy_qmemman_is_not_a_dead_one(
    client: QmemmanClient, qmemman: QmemmanStandIn, peers: Peers
) -> None:
    # qubesd holds qmemman (creating a domain) past our answer timeout.
    writer = await peers.hold()
    with pytest.raises(NoMemory, match=r"busy") as raised:  # a shortage for now, not a failure
        async with client.allocation("disp9", 400):
            pytest.fail("entered while qmemman was busy")
    assert "did not answer" in str(raised.value)
    status = client.status()
    assert status["qmemman_reachable"] is True
    assert status["qmemman_state"] == "busy"
    # Our request cannot be withdrawn: qmemman reads it once qubesd is done, and we keep
    # its connection, so that we never have two open (Qubes #9917).
    writer.close()
    await until(lambda: len(qmemman.requests) == 2 and qmemman.requests[1].closed_at)
    assert qmemman.max_open == 2  # qubesd's and our one
    await until(lambda: client.status()["qmemman_state"] == "ok")


@pytest.mark.asyncio
async def test_no_answer_times_out_and_frees_everything(
    client: QmemmanClient, qmemman: QmemmanStandIn
) -> None:
    qmemman.answers["free"] = NO_ANSWER
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(MemoryManagerError, match=r"did not answer within 0.5 s"):
        async with client.allocation("disp9", 400):
            pass
    assert 0.5 <= loop.time() - began < 1.0
    assert not client._allocation_lock.locked()  # the next creation may go on


# -- shrink ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_shrink_brings_the_preload_to_qmemmans_preferred_size(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    await create(client, backend, "disp1")
    await until(lambda: reported(qmemman, 1))
    result = await client.shrink("disp1")
    assert result.converged
    assert result.target_mib == PREFERRED  # qmemman's target, as qmemman set it
    assert result.actual_mib <= PREFERRED * 1.1
    assert backend.targets[-1] == ("disp1", PREFERRED)


@pytest.mark.asyncio
async def test_ok_without_ballooning_is_a_skipped_shrink_not_a_converged_one(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    await create(client, backend, "disp1")
    backend.domains["disp1"].used_mib = None  # type: ignore[assignment]  # reports nothing
    result = await client.shrink("disp1")
    assert not result.converged
    assert (result.target_mib, result.actual_mib) == (MEMORY, MEMORY)
    assert client.status()["shrinks"][-1]["outcome"] == "skipped"
    assert client.status()["skipped_shrinks"] >= 1
    assert len(qmemman.requests) >= 3  # it was tried again, a little later


@pytest.mark.asyncio
async def test_a_shrink_skipped_because_the_watcher_lagged_is_retried(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    guests_can_report(backend)
    # qmemman's watcher has not recorded the guest's report yet when the request comes.
    qmemman.timing = qmemman.timing.__class__(**{**qmemman.timing.__dict__, "watch": 0.4})
    await create(client, backend, "disp1")
    result = await client.shrink("disp1")
    assert any("meminfo was not reported back" in e for e in qmemman.events)
    assert result.converged and result.target_mib == PREFERRED


@pytest.mark.asyncio
async def test_the_shrink_holds_qmemman_until_the_pause_has_returned(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    guests_can_report(backend)
    await create(client, backend, "disp1")
    await until(lambda: reported(qmemman, 1))
    result = await client.shrink("disp1")
    set_so_far = len(backend.targets)
    await asyncio.sleep(0.2)  # the engine is pausing it
    assert len(backend.targets) == set_so_far  # no balance regrew it meanwhile
    assert qmemman.lock.locked()
    await backend.pause("disp1")
    client.exclude("disp1")  # the pause has returned
    await until(lambda: not qmemman.lock.locked())
    assert backend.domains["disp1"].memory_mib <= result.target_mib * 1.1


@pytest.mark.asyncio
async def test_a_paused_preloads_target_raised_behind_our_back_is_reported(
    client: QmemmanClient,
    qmemman: QmemmanStandIn,
    backend: BalloonBackend,
    caplog: pytest.LogCaptureFixture,
) -> None:
    guests_can_report(backend)
    # Current qmemman still has Qubes #11121: it balances paused domains too.
    await create(client, backend, "disp1")
    await until(lambda: reported(qmemman, 1))
    await client.shrink("disp1")
    await backend.pause("disp1")
    client.exclude("disp1")
    await create(client, backend, "disp2")  # any balance will do
    await until(lambda: client.status()["qubes_11121"] is not None, timeout=3)
    seen = client.status()["qubes_11121"]
    assert "disp1" in seen and "#11121" in seen
    assert backend.domains["disp1"].memory_mib <= PREFERRED * 1.1  # paused: it took none
    assert any("11121" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.mark.asyncio
async def test_a_qmemman_with_the_fix_leaves_paused_preloads_alone(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    guests_can_report(backend)
    qmemman.fixed_11121 = True
    await create(client, backend, "disp1")
    await until(lambda: reported(qmemman, 1))
    result = await client.shrink("disp1")
    await backend.pause("disp1")
    client.exclude("disp1")
    await create(client, backend, "disp2")
    await asyncio.sleep(0.3)
    assert backend.xen_targets["disp1"] == result.target_mib


@pytest.mark.asyncio
async def test_a_busy_qmemman_makes_a_shrink_skipped_not_failed(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend, peers: Peers
) -> None:
    await create(client, backend, "disp1")
    writer = await peers.hold()
    result = await client.shrink("disp1")
    assert not result.converged
    assert client.status()["shrinks"][-1]["outcome"] == "busy"
    writer.close()


@pytest.mark.asyncio
async def test_shrink_fail_is_a_result_that_did_not_converge(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    guests_can_report(backend)
    await create(client, backend, "disp1")
    await until(lambda: reported(qmemman, 1))
    backend.stuck_at["disp1"] = 900  # the guest cannot give more
    result = await client.shrink("disp1")
    assert not result.converged
    assert result.actual_mib == 900
    assert qmemman.requests[-1].answer == "FAIL"
    assert client.status()["shrinks"][-1]["outcome"] == "gave up"


@pytest.mark.asyncio
async def test_shrink_invalid_arg_and_unknown_domains_fail_naming_the_domain(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    await create(client, backend, "disp1")
    qmemman.answers["set"] = "INVALID_ARG"
    with pytest.raises(MemoryManagerError, match=r"shrink disp1: .*INVALID_ARG"):
        await client.shrink("disp1")
    with pytest.raises(MemoryManagerError, match="shrink disp7: no such domain"):
        await client.shrink("disp7")
    assert [r.line.split(":")[0] for r in qmemman.requests[1:]] == ["1"]  # none for disp7


@pytest.mark.asyncio
async def test_hang_up_and_garbage_answers(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    await create(client, backend, "disp1")
    qmemman.answers["set"] = HANG_UP
    with pytest.raises(MemoryManagerError, match="closed the connection without answering"):
        await client.shrink("disp1")
    qmemman.answers["set"] = "MAYBE"
    with pytest.raises(MemoryManagerError, match="answered 'MAYBE'"):
        await client.shrink("disp1")
    qmemman.answers["set"] = "OK" + "K" * 100
    with pytest.raises(MemoryManagerError, match="too long"):
        await client.shrink("disp1")
    assert not client._request_lock.locked()


# -- one request at a time (Qubes #9917) -------------------------------------------------------


@pytest.mark.asyncio
async def test_a_request_waits_while_another_client_holds_qmemman(
    client: QmemmanClient,
    qmemman: QmemmanStandIn,
    backend: BalloonBackend,
    settings: MemorySettings,
    peers: Peers,
) -> None:
    guests_can_report(backend)
    await create(client, backend, "disp1")
    await until(lambda: reported(qmemman, 1))
    writer = await peers.hold()  # qubesd is creating a domain
    client.settings = settings.model_copy(update={"qmemman_answer_timeout": 5.0})
    shrink = asyncio.create_task(client.shrink("disp1"))
    await asyncio.sleep(0.3)
    assert not shrink.done()
    writer.close()
    result = await asyncio.wait_for(shrink, 3)
    assert result.target_mib == PREFERRED


@pytest.mark.asyncio
async def test_eight_concurrent_callers_go_one_at_a_time(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    guests_can_report(backend)
    await create(client, backend, "disp1")
    await create(client, backend, "disp2")
    qmemman.delay = 0.02
    done: list[str] = []

    async def preload(dispid: int) -> None:
        async with client.allocation(f"disp{dispid}", 300):
            await asyncio.sleep(0.01)  # creating the domain
        done.append(f"disp{dispid}")

    async def shrink(name: str) -> None:
        await client.shrink(name)
        client.exclude(name)  # paused

    preloads = [preload(i) for i in range(4, 10)]
    await asyncio.wait_for(asyncio.gather(*preloads, shrink("disp1"), shrink("disp2")), 10)
    assert qmemman.max_open == 1  # never a second connection while one is open
    assert len(done) == 6


@pytest.mark.asyncio
async def test_a_cancelled_shrink_keeps_its_request_until_qmemman_is_done(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    await create(client, backend, "disp1")
    await create(client, backend, "disp2")
    qmemman.delay = 0.3  # qmemman busy ballooning
    shrink = asyncio.create_task(client.shrink("disp1"))
    await asyncio.sleep(0.1)
    shrink.cancel()
    with pytest.raises(asyncio.CancelledError):
        await shrink
    assert client.status()["shrinks"][-1]["outcome"] == "cancelled"
    # A sent request cannot be withdrawn: qmemman executes it anyway. The client keeps
    # the connection until qmemman answers, and opens no second one meanwhile.
    qmemman.delay = 0.0
    await asyncio.wait_for(client.shrink("disp2"), 3)
    assert qmemman.max_open == 1
    assert not any(r.gone_before_answer for r in qmemman.requests)


@pytest.mark.asyncio
async def test_cancelled_wait_for_the_lock_sends_nothing(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    await create(client, backend, "disp1")
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def allocate() -> None:
        async with client.allocation("disp9", 300):
            entered.set()
            await leave.wait()

    holder = asyncio.create_task(allocate())
    await entered.wait()
    sent = len(qmemman.requests)
    waiting = asyncio.create_task(client.shrink("disp1"))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    leave.set()
    await holder
    assert len(qmemman.requests) == sent


@pytest.mark.asyncio
async def test_no_shrink_is_sent_for_a_domain_handed_out_since(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    await create(client, backend, "disp1")
    client.include("disp1")  # handed out
    sent = len(qmemman.requests)
    with pytest.raises(MemoryManagerError, match=r"disp1.*handed out"):
        await client.shrink("disp1")
    assert len(qmemman.requests) == sent


@pytest.mark.asyncio
async def test_exclude_include_forget_are_bookkeeping(
    client: QmemmanClient, qmemman: QmemmanStandIn
) -> None:
    client.exclude("disp1")
    client.exclude("disp2")
    client.include("disp2")
    client.forget("disp3")
    assert client.status()["domains"] == {"starting": 0, "excluded": 1, "included": 1}
    assert qmemman.requests == []  # qmemman balances running domains itself


@pytest.mark.asyncio
async def test_a_handed_out_disposable_gets_memory_back_from_qmemman(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    guests_can_report(backend)
    await create(client, backend, "disp1")
    await until(lambda: reported(qmemman, 1))
    result = await client.shrink("disp1")
    await backend.pause("disp1")
    client.exclude("disp1")
    await backend.unpause("disp1")
    client.include("disp1")
    await create(client, backend, "disp2")  # qmemman balances: plenty of free memory
    await until(lambda: backend.domains["disp1"].target_mib > result.target_mib)


# -- qmemman's own settings govern --------------------------------------------------------


@pytest.mark.asyncio
async def test_qmemmans_settings_govern_and_status_shows_them(
    rundir: Path, settings: MemorySettings, backend: BalloonBackend
) -> None:
    conf = rundir / "qmemman.conf"
    conf.write_text("[global]\nvm-min-mem = 400M\ncache-margin-factor = 1.3\n")
    settings = settings.model_copy(
        update={"qmemman_config": conf, "preferred_floor_mib": 200, "qmemman_retries": 0}
    )
    guests_can_report(backend)
    rules = Rules.parse(conf.read_text())
    async with standin(settings.qmemman_socket, backend, rules=rules) as qmemman:
        client = QmemmanClient(settings, backend)
        await client.open()
        try:
            await create(client, backend, "disp1")
            await until(lambda: reported(qmemman, 1))
            result = await client.shrink("disp1")
            # 400M is decimal: 381.5 MiB, not dispoold's 200 MiB floor, nor 400 MiB.
            assert (result.target_mib, result.converged) == (381, True)
            assert "vm-min-mem 381.5 MiB" in client.status()["qmemman_rules"]
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_a_bad_qmemman_config_is_a_clear_error(
    rundir: Path, settings: MemorySettings, backend: BalloonBackend
) -> None:
    conf = rundir / "qmemman.conf"
    conf.write_text("[global]\nvm-min-mem = plenty\n")
    client = QmemmanClient(settings.model_copy(update={"qmemman_config": conf}), backend)
    with pytest.raises(MemoryManagerError, match=r"qmemman.conf: vm-min-mem: 'plenty'"):
        await client.open()


@pytest.mark.asyncio
async def test_a_start_is_sized_by_the_template_as_qubesd_sizes_it(
    client: QmemmanClient, qmemman: QmemmanStandIn
) -> None:
    template = TemplateSettings(memory=400, maxmem=4000, vcpus=2, options={"type": "pvh"})
    async with client.allocation("disp9", 400, template):
        pass
    shadow = 4000 * 8 * 1024  # 8 KiB per MiB of maxmem for a guest that is not PV
    assert qmemman.requests[-1].line == str(400 * MIB + 4 * MIB + 2 * 3 * MIB // 2 + shadow)


# -- what the engine is told, and may be asked to do ----------------------------------------


@pytest.mark.asyncio
async def test_a_preload_paused_unshrunk_while_qmemman_was_down_is_named_once_it_is_back(
    settings: MemorySettings, backend: BalloonBackend
) -> None:
    settings = settings.model_copy(update={"qmemman_check_interval": 0.05})
    guests_can_report(backend)
    qmemman = standin(settings.qmemman_socket, backend, settings.qmemman_avail_file)
    await qmemman.start()
    client = QmemmanClient(settings, backend)
    await client.open()
    try:
        await create(client, backend, "disp1")
        await qmemman.stop()  # qmemman dies while disp1 boots
        with pytest.raises(MemoryManagerError, match="qmemman is not running"):
            await client.shrink("disp1")
        await backend.pause("disp1")
        client.exclude("disp1")  # the engine pauses it anyway
        assert client.status()["paused_unshrunk"] == ["disp1"]
        assert client.shrink_wanted() == []  # nothing to be done while qmemman is down
        wanted = asyncio.create_task(client.wait_shrink_wanted())
        await asyncio.sleep(0.2)
        assert not wanted.done()
        await qmemman.start()
        assert await asyncio.wait_for(wanted, 2) == ["disp1"]
        # The engine unpauses it, shrinks it, pauses it again.
        await backend.unpause("disp1")
        await until(lambda: reported(qmemman, 1))
        result = await client.shrink("disp1")
        await backend.pause("disp1")
        client.exclude("disp1")
        assert result.converged and result.target_mib == PREFERRED
        assert client.shrink_wanted() == [] and client.status()["paused_unshrunk"] == []
    finally:
        await client.close()
        await qmemman.stop()


@pytest.mark.asyncio
async def test_a_skipped_shrink_leaves_a_paused_preload_to_be_shrunk_later(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    await create(client, backend, "disp1")
    backend.domains["disp1"].used_mib = None  # type: ignore[assignment]  # no report yet
    result = await client.shrink("disp1")
    assert result.skipped and not result.converged
    await backend.pause("disp1")
    client.exclude("disp1")
    assert client.shrink_wanted() == ["disp1"]
    client.include("disp1")  # handed out instead: never shrunk again
    assert client.shrink_wanted() == []


@pytest.mark.asyncio
async def test_the_hold_after_a_shrink_ends_on_its_own_if_nobody_says_paused(
    settings: MemorySettings, backend: BalloonBackend, caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings.model_copy(update={"qmemman_hold_timeout": 0.3})
    guests_can_report(backend)
    async with standin(settings.qmemman_socket, backend) as qmemman:
        client = QmemmanClient(settings, backend)
        await client.open()
        try:
            await create(client, backend, "disp1")
            await until(lambda: reported(qmemman, 1))
            await client.shrink("disp1")
            assert qmemman.lock.locked()
            await until(lambda: not qmemman.lock.locked(), timeout=1)
            assert any("without a word" in r.getMessage() for r in caplog.records)
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_a_qmemman_that_never_answers_is_taken_for_hung(
    settings: MemorySettings, backend: BalloonBackend
) -> None:
    settings = settings.model_copy(update={"qmemman_busy_limit": 0.5})
    async with standin(settings.qmemman_socket, backend) as qmemman:
        client = QmemmanClient(settings, backend)
        await client.open()
        try:
            qmemman.answers["free"] = NO_ANSWER
            with pytest.raises(NoMemory, match="busy"):
                async with client.allocation("disp9", 400):
                    pass
            assert client.status()["qmemman_state"] == "busy"
            await until(lambda: client.status()["qmemman_state"] == "dead", timeout=2)
            assert "hung" in str(client._state_why)
            assert qmemman.max_open == 1
        finally:
            await client.close()


@pytest.mark.asyncio
async def test_a_disposable_found_at_a_restart_can_be_included(
    client: QmemmanClient, qmemman: QmemmanStandIn, backend: BalloonBackend
) -> None:
    await foreign(backend, "disp1")
    client.include("disp1")  # re-adopted, handed out before the restart
    client.exclude("disp2")  # re-adopted, paused: its target is the baseline
    await asyncio.sleep(0.1)
    assert client.status()["domains"]["included"] == 1
    assert qmemman.requests == []
