"""The client library, blocking and asyncio, against a real daemon."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest

from dispoold import client
from dispoold.client import (
    AsyncClient,
    Client,
    DaemonFailed,
    DaemonStopping,
    DaemonUnavailable,
    InvalidRequest,
    MessageTooLarge,
    NotAllowed,
    NotDisposableTemplate,
    OutOfMemory,
    PermissionRefused,
    RemoteError,
    SocketAccessDenied,
    TimedOut,
    UnknownDisposable,
    UnknownTemplate,
    UnsupportedOperation,
    remote_error,
)
from dispoold.protocol import ErrorCode
from dispoold.views import Handout, PoolView
from tests.daemon_harness import DaemonProcess, running_daemon


@pytest.fixture(scope="module")
def daemon() -> Iterator[DaemonProcess]:
    with running_daemon() as process:
        yield process


def test_every_wire_code_has_its_exception() -> None:
    for code in ErrorCode:
        exc = remote_error(code.value, "words")
        assert type(exc) is client.REMOTE_ERRORS[code.value]
        assert exc.code == code.value and str(exc) == "words"
    newer = remote_error("quota_exceeded", "from a newer daemon")
    assert type(newer) is RemoteError and newer.code == "quota_exceeded"
    assert isinstance(remote_error("unauthorized", "x"), NotAllowed)
    assert issubclass(SocketAccessDenied, NotAllowed)
    assert issubclass(SocketAccessDenied, DaemonUnavailable)


def test_blocking_calls(daemon: DaemonProcess) -> None:
    with Client(daemon.socket_path) as dispoold:
        assert dispoold.ping().protocol == 1
        vm = dispoold.request("@dispvm:fedora-dvm", source="work", timeout=30)
        assert isinstance(vm, Handout) and vm.template == "fedora-dvm"
        status = dispoold.status("fedora-dvm")
        assert isinstance(status, PoolView)
        assert vm.name in {d.name for d in status.templates[0].disposables}
        dispoold.release(vm.name)
        with pytest.raises(UnknownDisposable) as caught:
            dispoold.release(vm.name)
        assert caught.value.code == "not_found"
        assert dispoold.ping().version  # the connection survives an error


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"target": "@dispvm:nope"}, UnknownTemplate),
        ({"target": "@dispvm:plain"}, NotDisposableTemplate),
        ({"target": "@dispvm:huge"}, OutOfMemory),
        ({"target": "@dispvm:broken"}, DaemonFailed),
        ({"target": "@dispvm:slow", "timeout": 0.2}, TimedOut),
        ({"target": "nonsense"}, InvalidRequest),
    ],
)
def test_typed_errors(daemon: DaemonProcess, kwargs: dict[str, object], error: type) -> None:
    with Client(daemon.socket_path) as dispoold, pytest.raises(error) as caught:
        dispoold.request(**kwargs)  # type: ignore[arg-type]
    assert isinstance(caught.value, RemoteError) and caught.value.message


def test_raw_calls_and_protocol_errors(daemon: DaemonProcess) -> None:
    with Client(daemon.socket_path) as dispoold:
        assert dispoold.call("ping") == {"protocol": 1, "version": "0.1.0"}
        with pytest.raises(UnsupportedOperation):
            dispoold.call("launch")
        with pytest.raises(InvalidRequest, match=r"args\.colour: unknown key"):
            dispoold.call("request", {"colour": "blue"})
        with pytest.raises(MessageTooLarge):
            dispoold.call("ping", {"x": "y" * 70000})  # refused before it is sent
        assert dispoold.ping().protocol == 1


def test_root_only_wrappers_send_what_they_say(daemon: DaemonProcess) -> None:
    with Client(daemon.socket_path) as dispoold:
        dispoold.set_max(2, template="fedora-dvm")
        dispoold.set_max(None, template="fedora-dvm")
        dispoold.set_threshold(0)
        dispoold.set_threshold(None)
        dispoold.refresh("debian-dvm")
        with pytest.raises(UnknownTemplate):
            dispoold.refresh("nope")


def test_a_daemon_that_is_not_running() -> None:
    with pytest.raises(DaemonUnavailable, match="dispoold is not running"):
        Client("/nonexistent/dispoold.sock").connect()

    async def connect() -> None:
        async with AsyncClient("/nonexistent/dispoold.sock"):
            pass

    with pytest.raises(DaemonUnavailable, match="dispoold is not running"):
        asyncio.run(connect())


def test_unauthorized_is_typed() -> None:
    # unauthorized from the daemon and SocketAccessDenied are both NotAllowed.
    assert issubclass(PermissionRefused, NotAllowed) and issubclass(PermissionRefused, RemoteError)


@pytest.mark.asyncio
async def test_concurrent_calls_on_one_connection_finish_in_their_own_order(
    daemon: DaemonProcess,
) -> None:
    finished: list[str] = []

    async def slow(dispoold: AsyncClient) -> None:
        with pytest.raises(TimedOut):
            await dispoold.request("@dispvm:slow", timeout=0.5)
        finished.append("slow")

    async def quick(dispoold: AsyncClient, n: int) -> None:
        await dispoold.ping()
        finished.append(f"ping{n}")

    async with AsyncClient(daemon.socket_path) as dispoold:
        await asyncio.gather(slow(dispoold), *(quick(dispoold, n) for n in range(5)))
        vm = await dispoold.request("@dispvm:debian-dvm")
        await dispoold.release(vm.name)
        status = await dispoold.status()
        assert status.templates
    assert finished[-1] == "slow"
    assert sorted(finished[:-1]) == [f"ping{n}" for n in range(5)]


@pytest.mark.asyncio
async def test_async_subscription(daemon: DaemonProcess) -> None:
    async with AsyncClient(daemon.socket_path) as watcher, AsyncClient(daemon.socket_path) as user:
        stream = await watcher.subscribe(["requested", "removed"])
        vm = await user.request("@dispvm:debian-dvm")
        await user.release(vm.name)
        async with asyncio.timeout(10):
            first = await anext(stream)
            second = await anext(stream)
        stream.close()
        # Other calls go on beside a stream on the same connection.
        assert (await watcher.ping()).protocol == 1
    assert (first.name, first.data["name"]) == ("requested", vm.name)
    assert (second.name, second.data["name"]) == ("removed", vm.name)


@pytest.mark.asyncio
async def test_calls_in_flight_when_the_daemon_stops() -> None:
    with running_daemon(daemon={"drain_timeout": 0.3}) as daemon:
        async with AsyncClient(daemon.socket_path) as dispoold:
            stream = await dispoold.subscribe()
            waiting = asyncio.ensure_future(dispoold.request("@dispvm:slow", timeout=60))
            await asyncio.sleep(0.2)
            daemon.signal(signal.SIGTERM)
            with pytest.raises(DaemonStopping, match="cut short"):
                await waiting
            with pytest.raises(DaemonStopping):
                async with asyncio.timeout(10):
                    async for _ in stream:
                        pass
            await asyncio.sleep(0.3)
            with pytest.raises(DaemonUnavailable, match="lost"):
                await dispoold.ping()
        assert daemon.wait_exit() == 0
