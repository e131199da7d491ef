"""The qmemman client against a qmemman stand-in on a real Unix socket."""

from __future__ import annotations

import asyncio
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from dispoold.backend import Marker
from dispoold.config import MemorySettings, TemplateSettings
from dispoold.memory import (
    DOMAIN_OVERHEAD_MIB,
    MemoryManager,
    MemoryManagerError,
    NoMemory,
    QmemmanClient,
)
from tests.memory_doubles import (
    HANG_UP,
    MIB,
    NO_ANSWER,
    BalloonBackend,
    QmemmanServer,
    write_avail,
)


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
        check_period=0.3,
        check_window=0.1,
        poll_interval=0.01,
    )


@pytest_asyncio.fixture
async def backend() -> AsyncIterator[BalloonBackend]:
    backend = BalloonBackend({"host_mib": 16_384})
    await backend.open()
    for dispid in (1, 2, 3):
        template = TemplateSettings(memory=1000, maxmem=1000)
        await backend.create(f"disp{dispid}", template, Marker("dispoold", "t", dispid))
    yield backend
    await backend.close()


@pytest_asyncio.fixture
async def server(settings: MemorySettings, backend: BalloonBackend) -> AsyncIterator[QmemmanServer]:
    def balloon(memset: dict[int, int]) -> None:
        # What qmemman does on "<domid>:0": the target goes to preferred (used x 1.3).
        for domain in backend.domains.values():
            if domain.domid in memset:
                wanted = memset[domain.domid] // MIB or int(domain.used_mib * 1.3)
                domain.target_mib = wanted

    async with QmemmanServer(settings.qmemman_socket, on_set=balloon) as server:
        yield server


@pytest.fixture
def client(settings: MemorySettings, backend: BalloonBackend) -> QmemmanClient:
    client = QmemmanClient(settings, backend)
    return client


def test_client_implements_the_protocol(client: QmemmanClient) -> None:
    assert isinstance(client, MemoryManager)


# -- available memory -------------------------------------------------------------


@pytest.mark.asyncio
async def test_available_memory_comes_from_qmemmans_file(
    client: QmemmanClient, settings: MemorySettings
) -> None:
    write_avail(settings.qmemman_avail_file, str(3000 * MIB + 12345))
    assert await client.available_mib() == 3000
    write_avail(settings.qmemman_avail_file, f"{512 * MIB}\n")
    assert await client.available_mib() == 512
    # qmemman writes a negative figure when memory is short.
    write_avail(settings.qmemman_avail_file, str(-200 * MIB))
    assert await client.available_mib() == 0
    assert client.status()["available_mib"] == 0


@pytest.mark.asyncio
async def test_available_memory_file_missing_or_garbled(
    client: QmemmanClient, settings: MemorySettings
) -> None:
    with pytest.raises(MemoryManagerError, match=r"does not exist .is qmemman running"):
        await client.available_mib()
    for garbage in ("", "12.5", "lots", "1 2", "9" * 80):
        write_avail(settings.qmemman_avail_file, garbage)
        with pytest.raises(MemoryManagerError, match="not a number of bytes"):
            await client.available_mib()


# -- allocation -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_allocation_holds_qmemman_until_the_domain_exists(
    client: QmemmanClient, server: QmemmanServer
) -> None:
    async with client.allocation("disp9", 400):
        assert [r.line for r in server.requests] == [str((400 + DOMAIN_OVERHEAD_MIB) * MIB)]
        assert server.lock.locked()  # qmemman balances nothing while we create
        await asyncio.sleep(0.1)
    for _ in range(50):
        if not server.lock.locked():
            break
        await asyncio.sleep(0.01)
    assert not server.lock.locked()
    held = server.requests[0].held
    assert held is not None
    assert held >= 0.1
    assert server.second_lines == 0
    assert client.status()["qmemman_reachable"] is True


@pytest.mark.asyncio
async def test_allocation_fail_is_no_memory(client: QmemmanClient, server: QmemmanServer) -> None:
    server.answers["free"] = "FAIL"
    with pytest.raises(NoMemory, match=r"allocate 400 MiB for disp9: .*FAIL"):
        async with client.allocation("disp9", 400):
            pytest.fail("entered without memory")
    assert not client._request_lock.locked()


@pytest.mark.asyncio
async def test_allocation_invalid_arg_is_an_error_not_a_shortage(
    client: QmemmanClient, server: QmemmanServer
) -> None:
    server.answers["free"] = "INVALID_ARG"
    with pytest.raises(MemoryManagerError, match="INVALID_ARG") as raised:
        async with client.allocation("disp9", 400):
            pytest.fail("entered after INVALID_ARG")
    assert not isinstance(raised.value, NoMemory)


@pytest.mark.asyncio
async def test_no_answer_times_out_and_frees_everything(
    client: QmemmanClient, server: QmemmanServer
) -> None:
    server.answers["free"] = NO_ANSWER
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(MemoryManagerError, match=r"did not answer within 0.5 s"):
        async with client.allocation("disp9", 400):
            pass
    assert 0.5 <= loop.time() - began < 1.0
    assert client.status()["qmemman_reachable"] is False
    assert not client._request_lock.locked()
    # The stand-in saw the connection close, so the next request goes through.
    server.answers["free"] = "OK"
    async with asyncio.timeout(1), client.allocation("disp9", 400):
        pass
    assert client.status()["qmemman_reachable"] is True


@pytest.mark.asyncio
async def test_missing_socket_is_a_clear_error(client: QmemmanClient) -> None:
    with pytest.raises(MemoryManagerError, match=r"qmemman is not running \(.*does not exist\)"):
        async with client.allocation("disp9", 400):
            pass
    with pytest.raises(MemoryManagerError, match="shrink disp1: qmemman is not running"):
        await client.shrink("disp1")
    status = client.status()
    assert status["qmemman_reachable"] is False
    assert status["shrinks"][-1]["outcome"] == "failed"
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
        await client.shrink("disp1")


@pytest.mark.asyncio
async def test_hang_up_and_garbage_answers(client: QmemmanClient, server: QmemmanServer) -> None:
    server.answers["set"] = HANG_UP
    with pytest.raises(MemoryManagerError, match="closed the connection without answering"):
        await client.shrink("disp1")
    server.answers["set"] = "MAYBE"
    with pytest.raises(MemoryManagerError, match="answered 'MAYBE'"):
        await client.shrink("disp1")
    server.answers["set"] = "OK" + "K" * 100
    with pytest.raises(MemoryManagerError, match="too long"):
        await client.shrink("disp1")
    assert not client._request_lock.locked()
    assert not any(r.gone_before_answer for r in server.requests)


# -- shrink -----------------------------------------------------------------------


@pytest.mark.asyncio
async def test_shrink_asks_for_preferred_and_follows_the_domain(
    client: QmemmanClient, server: QmemmanServer, backend: BalloonBackend
) -> None:
    backend.speed["disp2"] = 5000
    result = await client.shrink("disp2")
    assert [r.line for r in server.requests] == ["2:0"]  # disp2's domid, 0 = preferred
    assert result.converged
    assert result.target_mib == 325
    assert result.actual_mib <= 325 * 1.1
    assert server.requests[0].held is not None  # the connection was closed after the answer


@pytest.mark.asyncio
async def test_shrink_result_tells_the_truth_when_the_domain_lags(
    client: QmemmanClient, server: QmemmanServer, backend: BalloonBackend
) -> None:
    backend.stuck_at["disp1"] = 700  # qmemman said OK, the hypervisor says otherwise
    result = await client.shrink("disp1")
    assert not result.converged
    assert (result.target_mib, result.actual_mib) == (325, 700)


@pytest.mark.asyncio
async def test_shrink_fail_is_a_result_that_did_not_converge(
    client: QmemmanClient, server: QmemmanServer, backend: BalloonBackend
) -> None:
    server.answers["set"] = "FAIL"
    result = await client.shrink("disp1")
    assert not result.converged
    assert result.actual_mib == 1000
    assert client.status()["shrinks"][-1]["outcome"] == "gave up"


@pytest.mark.asyncio
async def test_shrink_invalid_arg_and_unknown_domains_fail_naming_the_domain(
    client: QmemmanClient, server: QmemmanServer
) -> None:
    server.answers["set"] = "INVALID_ARG"
    with pytest.raises(MemoryManagerError, match=r"shrink disp1: .*INVALID_ARG"):
        await client.shrink("disp1")
    with pytest.raises(MemoryManagerError, match="shrink disp7: no such domain"):
        await client.shrink("disp7")
    assert [r.line for r in server.requests] == ["1:0"]  # nothing sent for disp7


# -- one request at a time (Qubes #9917) --------------------------------------------


@pytest.mark.asyncio
async def test_a_request_waits_while_another_client_holds_qmemman(
    client: QmemmanClient, server: QmemmanServer, settings: MemorySettings
) -> None:
    reader, writer = await asyncio.open_unix_connection(str(settings.qmemman_socket))
    writer.write(b"1000\n")
    assert await reader.readline() == b"OK\n"  # qubesd is creating a domain
    client.settings = settings.model_copy(update={"qmemman_answer_timeout": 5.0})
    shrink = asyncio.create_task(client.shrink("disp1"))
    await asyncio.sleep(0.3)
    assert not shrink.done()
    writer.close()
    await writer.wait_closed()
    result = await asyncio.wait_for(shrink, 2)
    assert result.converged
    assert [r.line for r in server.requests] == ["1000", "1:0"]


@pytest.mark.asyncio
async def test_eight_concurrent_callers_go_one_at_a_time(
    client: QmemmanClient, server: QmemmanServer
) -> None:
    server.delay = 0.02
    done: list[str] = []

    async def preload(dispid: int) -> None:
        async with client.allocation(f"disp{dispid}", 300):
            await asyncio.sleep(0.01)  # creating the domain
        done.append(f"disp{dispid}")

    preloads = [preload(i) for i in range(4, 10)]
    shrinks = [client.shrink("disp1"), client.shrink("disp2")]
    await asyncio.wait_for(asyncio.gather(*preloads, *shrinks), 5)
    assert len(server.requests) == 8
    assert server.max_open == 1  # never a second connection while one is open
    assert len(done) == 6


@pytest.mark.asyncio
async def test_cancelled_shrink_hangs_up_at_once(
    client: QmemmanClient, server: QmemmanServer
) -> None:
    server.delay = 0.3  # qmemman busy ballooning
    shrink = asyncio.create_task(client.shrink("disp1"))
    await asyncio.sleep(0.1)
    assert server.open_now == 1
    shrink.cancel()
    with pytest.raises(asyncio.CancelledError):
        await shrink
    assert not client._request_lock.locked()
    await asyncio.sleep(0.3)  # qmemman finishes, then finds the client gone
    assert server.requests[0].gone_before_answer
    assert client.status()["shrinks"][-1]["outcome"] == "cancelled"
    # The next request gets through once qmemman finished what it was doing.
    server.delay = 0.0
    result = await asyncio.wait_for(client.shrink("disp2"), 2)
    assert result.target_mib == 325


@pytest.mark.asyncio
async def test_cancelled_wait_for_the_lock_sends_nothing(
    client: QmemmanClient, server: QmemmanServer
) -> None:
    entered = asyncio.Event()
    leave = asyncio.Event()

    async def create() -> None:
        async with client.allocation("disp9", 300):
            entered.set()
            await leave.wait()

    holder = asyncio.create_task(create())
    await entered.wait()
    waiting = asyncio.create_task(client.shrink("disp1"))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    leave.set()
    await holder
    assert [r.line for r in server.requests] == [str(306 * MIB)]


@pytest.mark.asyncio
async def test_exclude_include_forget_are_bookkeeping(
    client: QmemmanClient, server: QmemmanServer
) -> None:
    client.exclude("disp1")
    client.exclude("disp2")
    client.include("disp2")
    client.forget("disp3")
    assert client.status()["domains"] == {"starting": 0, "excluded": 1, "included": 1}
    assert server.requests == []  # qmemman balances running domains itself


@pytest.mark.asyncio
async def test_available_memory_can_be_read_inside_an_allocation(
    client: QmemmanClient, server: QmemmanServer, settings: MemorySettings
) -> None:
    # The engine re-checks the threshold inside the block: that must not wait on the
    # request lock (and qmemman, holding its own lock, does not rewrite the file then).
    write_avail(settings.qmemman_avail_file, str(2048 * MIB))
    async with client.allocation("disp9", 400):
        assert await asyncio.wait_for(client.available_mib(), 0.5) == 2048
