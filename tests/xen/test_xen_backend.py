"""The Xen backend against real Xen: every operation, the error paths, the events.

    lab/labctl run -- /opt/dispoold/venv/bin/python -m pytest tests/xen -k xen_backend

Booting a guest costs tens of seconds under emulation, so the tests share one backend,
one event consumer and one long-lived guest (``disp9001``) where they can, and start
their own guests only where the test is about a guest's life or death. Every domain a
test makes is destroyed at the end of the module, even after a failure (``xl`` cleans
up what the backend must not touch).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from dispoold.backend import (
    BackendError,
    DomainEventKind,
    Marker,
    NoSuchDomain,
    NotPaused,
    NotReady,
    load_backend,
)
from dispoold.xen.backend import XenBackend
from tests.xen.xen_fixtures import (
    GUEST,
    LOG,
    EventRecorder,
    boot,
    destroy_by_name,
    template,
    xen_backend,
    xenstore,
    xl,
    xl_names,
    xl_state,
)

pytestmark = [pytest.mark.xen, pytest.mark.asyncio(loop_scope="module")]

OWNER = "dispoold-test-backend"
SHARED = "disp9001"
#: Names of domains made behind the backend's back (xl), destroyed with xl.
FOREIGN = ("disp9090", "disp9091")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def backend() -> AsyncIterator[XenBackend]:
    before = xl_names()
    try:
        async with xen_backend(OWNER, {"unpause_check_interval": 0.5}) as backend:
            # The engine names its owner first thing (recovery): so do the tests.
            assert await backend.list_owned(OWNER) == []
            yield backend
    finally:
        destroy_by_name(FOREIGN)
        leaked = xl_names() - before
        assert not leaked, f"domains left behind: {leaked}"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def recorder(backend: XenBackend) -> AsyncIterator[EventRecorder]:
    recorder = EventRecorder(backend)
    yield recorder
    await recorder.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared(backend: XenBackend, recorder: EventRecorder) -> str:
    """A guest that is up; tests leave it running and unpaused."""
    await boot(backend, SHARED, OWNER, 9001)
    return SHARED


async def test_create_starts_a_running_marked_domain(backend: XenBackend, shared: str) -> None:
    info = await backend.domain_info(shared)
    assert info is not None
    assert info.name == shared
    assert not info.paused
    assert not info.shutdown
    assert info.marker == Marker(OWNER, "lab-dvm", 9001)
    assert info.memory_mib == 128
    assert info.maxmem_mib == 256
    assert shared in xl_names()
    assert "p" not in (xl_state(shared) or "p")


async def test_marker_is_dom0_owned_and_the_guest_cannot_write_it(
    backend: XenBackend, shared: str
) -> None:
    info = await backend.domain_info(shared)
    assert info is not None
    base = f"/local/domain/{info.domid}/dispoold"
    assert xenstore("read", f"{base}/owner") == OWNER
    assert xenstore("read", f"{base}/template") == "lab-dvm"
    assert xenstore("read", f"{base}/dispid") == "9001"
    for node in (base, f"{base}/owner"):
        # xenstore-ls -p style: "n0" = owner dom0, no access for others by default;
        # "r<domid>" at most: the guest may read, never write.
        perms = xenstore("ls", "-p", node.rsplit("/", 1)[0]).splitlines()
        line = next(p for p in perms if p.strip().startswith(node.rsplit("/", 1)[1] + " "))
        acl = line.rsplit("(", 1)[1].rstrip(")").split(",")
        assert acl[0] == "n0", line
        assert all(not entry.startswith(("w", "b")) for entry in acl[1:]), line


async def test_pause_and_unpause(backend: XenBackend, shared: str) -> None:
    start = time.monotonic()
    await backend.pause(shared)
    paused = time.monotonic()
    info = await backend.domain_info(shared)
    assert info is not None and info.paused
    assert "p" in (xl_state(shared) or "")
    before = time.monotonic()
    await backend.unpause(shared)
    LOG.info(
        "pause %.1f ms, unpause %.1f ms", (paused - start) * 1e3, (time.monotonic() - before) * 1e3
    )
    info = await backend.domain_info(shared)
    assert info is not None and not info.paused


async def test_unpause_of_a_running_domain_raises_not_paused(
    backend: XenBackend, shared: str
) -> None:
    with pytest.raises(NotPaused):
        await backend.unpause(shared)


async def test_pausing_twice_needs_one_unpause(backend: XenBackend, shared: str) -> None:
    await backend.pause(shared)
    await backend.pause(shared)
    await backend.unpause(shared)
    info = await backend.domain_info(shared)
    assert info is not None and not info.paused


async def test_foreign_unpause_is_reported_once_and_unpause_then_refuses(
    backend: XenBackend, recorder: EventRecorder, shared: str
) -> None:
    await backend.pause(shared)
    xl("unpause", shared)
    seconds = await recorder.wait_for(DomainEventKind.UNPAUSED, shared, timeout=30)
    LOG.info("foreign unpause noticed after %.2f s", seconds)
    with pytest.raises(NotPaused):
        await backend.unpause(shared)
    await asyncio.sleep(1.5)  # three more checks
    assert recorder.count(DomainEventKind.UNPAUSED, shared) == 1


async def test_foreign_unpause_between_checks_is_caught_by_unpause(
    backend: XenBackend, shared: str
) -> None:
    # Unpaused behind our back and unpause called at once, before the periodic check:
    # the hand-out must still refuse.
    await backend.pause(shared)
    xl("unpause", shared)
    with pytest.raises(NotPaused):
        await backend.unpause(shared)


async def test_memory_and_balloon_target(backend: XenBackend, shared: str) -> None:
    memory = await backend.memory(shared)
    assert memory.actual_mib == 128
    assert memory.target_mib == 128
    assert memory.maxmem_mib == 256
    assert memory.used_mib is not None and 5 < memory.used_mib < 128
    await backend.set_memory_target(shared, 160)
    assert (await backend.memory(shared)).target_mib == 160
    # The balloon driver follows within seconds.
    for _ in range(120):
        if (await backend.memory(shared)).actual_mib >= 150:
            break
        await asyncio.sleep(0.5)
    assert (await backend.memory(shared)).actual_mib >= 150
    # Above maxmem: capped.
    await backend.set_memory_target(shared, 4096)
    assert (await backend.memory(shared)).target_mib == 256
    await backend.set_memory_target(shared, 128)


async def test_free_memory(backend: XenBackend, shared: str) -> None:
    free = await backend.free_memory_mib()
    info = xl("info")
    reported = next(
        int(line.split(":")[1]) for line in info.splitlines() if line.startswith("free_memory")
    )
    assert abs(free - reported) < 64


async def test_list_owned_after_a_restart_finds_the_domain(
    backend: XenBackend, shared: str
) -> None:
    await backend.pause(shared)
    try:
        async with xen_backend("nobody-else") as restarted:
            owned = await restarted.list_owned(OWNER)
            assert [info.name for info in owned] == [shared]
            (info,) = owned
            assert info.marker == Marker(OWNER, "lab-dvm", 9001)
            assert info.paused
            # The new instance adopted it: it may unpause it and sees it as its own.
            await restarted.unpause(shared)
            assert await restarted.list_owned("someone-else") == []
    finally:
        if (current := await backend.domain_info(shared)) is not None and current.paused:
            await backend.unpause(shared)


async def test_create_with_a_name_in_use_is_refused(backend: XenBackend, shared: str) -> None:
    with pytest.raises(BackendError, match="already exists"):
        await backend.create(shared, template(), Marker(OWNER, "lab-dvm", 9001))
    assert (await backend.domain_info(shared)) is not None


async def test_missing_kernel_fails_clearly_and_leaves_nothing(backend: XenBackend) -> None:
    before = xl_names()
    with pytest.raises(BackendError, match=r"kernel /nonexistent/vmlinuz does not exist") as caught:
        await backend.create(
            "disp9002", template(kernel="/nonexistent/vmlinuz"), Marker(OWNER, "t", 9002)
        )
    assert caught.value.operation == "create" and caught.value.domain == "disp9002"
    assert xl_names() == before


async def test_kernel_libxl_cannot_load_fails_clearly_and_leaves_nothing(
    backend: XenBackend, tmp_path: Path
) -> None:
    garbage = tmp_path / "not-a-kernel"
    garbage.write_bytes(b"this is not an ELF image\n" * 100)
    before = xl_names()
    with pytest.raises(BackendError) as caught:
        await backend.create("disp9003", template(kernel=garbage), Marker(OWNER, "t", 9003))
    LOG.info("libxl's refusal: %s", caught.value)
    assert "libxl_domain_create_new failed" in str(caught.value)
    assert xl_names() == before
    assert await backend.domain_info("disp9003") is None


async def test_domains_without_our_marker_are_left_alone(
    backend: XenBackend, tmp_path: Path
) -> None:
    name = FOREIGN[0]
    config = tmp_path / f"{name}.cfg"
    config.write_text(
        f'name = "{name}"\ntype = "pv"\nkernel = "{GUEST / "vmlinuz"}"\n'
        f'ramdisk = "{GUEST / "initrd.img"}"\nmemory = 128\n'
    )
    xl("create", "-p", str(config))  # paused: never boots, costs no CPU
    try:
        assert name in xl_names()
        info = await backend.domain_info(name)
        assert info is not None and info.marker is None
        for operation in (backend.pause, backend.unpause, backend.memory):
            with pytest.raises(NoSuchDomain, match="no marker of this daemon"):
                await operation(name)
        with pytest.raises(NoSuchDomain):
            await backend.set_memory_target(name, 64)
        await backend.destroy(name)  # not ours: left alone, not an error
        assert name in xl_names()
        assert name not in {i.name for i in await backend.list_owned(OWNER)}
    finally:
        destroy_by_name([name])


async def test_another_owners_domain_is_left_alone(backend: XenBackend) -> None:
    name = FOREIGN[1]
    async with xen_backend("dispoold-test-other") as other:
        await other.create(name, template(), Marker("dispoold-test-other", "lab-dvm", 9091))
        await other.pause(name)  # keep it quiet while it waits
        await backend.destroy(name)
        assert name in xl_names()
        with pytest.raises(NoSuchDomain, match="no marker of this daemon"):
            await backend.pause(name)


async def test_never_ready_guest_times_out_and_destroy_leaves_nothing(
    backend: XenBackend, recorder: EventRecorder
) -> None:
    before = xl_names()
    name = "disp9004"
    # init is busybox's sleep: the kernel boots, nothing ever reports.
    await backend.create(
        name,
        template(cmdline="console=hvc0 rdinit=/bin/sleep 3600"),
        Marker(OWNER, "lab-dvm", 9004),
    )
    start = time.monotonic()
    with pytest.raises(NotReady, match=r"did not write .*data/ready within 30 s"):
        await backend.wait_ready(name, 30)
    assert 29 < time.monotonic() - start < 45
    await backend.destroy(name)
    await backend.destroy(name)  # idempotent
    assert xl_names() == before
    assert recorder.count(DomainEventKind.DIED, name) == 0  # our destroy is not a death


async def test_guest_dying_while_booting_is_not_ready_and_reported(
    backend: XenBackend, recorder: EventRecorder
) -> None:
    before = xl_names()
    name = "disp9005"
    # The kernel finds no init in a ramdisk that is not one: it panics, Xen marks the
    # domain crashed, and it lingers until destroyed.
    await backend.create(
        name,
        template(ramdisk=GUEST / "vmlinuz", cmdline="console=hvc0"),
        Marker(OWNER, "lab-dvm", 9005),
    )
    start = time.monotonic()
    with pytest.raises(NotReady, match="died"):
        await backend.wait_ready(name, 200)
    LOG.info("death while booting noticed after %.2f s", time.monotonic() - start)
    await recorder.wait_for(DomainEventKind.DIED, name, timeout=10)
    info = await backend.domain_info(name)
    assert info is not None and info.shutdown
    await backend.destroy(name)
    assert xl_names() == before
    assert recorder.count(DomainEventKind.DIED, name) == 1


async def test_shutdown_and_vanishing_are_deaths_and_operations_then_fail(
    backend: XenBackend, recorder: EventRecorder
) -> None:
    lingering, vanishing = "disp9006", "disp9007"
    await asyncio.gather(
        boot(backend, lingering, OWNER, 9006), boot(backend, vanishing, OWNER, 9007)
    )
    # A guest that powers off lingers in Xen until destroyed.
    xl("shutdown", lingering)
    seconds = await recorder.wait_for(DomainEventKind.DIED, lingering, timeout=120)
    LOG.info("shutdown noticed %.2f s after the request", seconds)
    info = await backend.domain_info(lingering)
    assert info is not None and info.shutdown
    # Destroyed behind our back: gone mid-operation.
    start = time.monotonic()
    xl("destroy", vanishing)
    await recorder.wait_for(DomainEventKind.DIED, vanishing, timeout=30)
    LOG.info("destroy by someone else noticed after %.3f s", time.monotonic() - start)
    for operation in (backend.pause, backend.unpause, backend.memory):
        with pytest.raises(NoSuchDomain):
            await operation(vanishing)
    with pytest.raises(NoSuchDomain):
        await backend.set_memory_target(vanishing, 128)
    with pytest.raises(NotReady):
        await backend.wait_ready(vanishing, 5)
    assert await backend.domain_info(vanishing) is None
    await backend.destroy(vanishing)  # already gone: fine
    await backend.destroy(lingering)
    assert lingering not in xl_names()
    assert recorder.count(DomainEventKind.DIED, lingering) == 1
    assert recorder.count(DomainEventKind.DIED, vanishing) == 1


async def test_deaths_before_events_is_iterated_are_reported() -> None:
    name, owner = "disp9008", "dispoold-test-late"
    async with xen_backend(owner) as first:
        await first.create(name, template(), Marker(owner, "lab-dvm", 9008))
        xl("destroy", name)
        # Give the watch time to fire with nobody listening yet.
        await asyncio.sleep(2)
        late = EventRecorder(first)
        try:
            await late.wait_for(DomainEventKind.DIED, name, timeout=10)
        finally:
            await late.stop()


async def test_vanishing_during_a_build_leaves_no_trace(backend: XenBackend) -> None:
    # Destroyed by someone else while libxl still builds it: create fails or the
    # domain is reported gone; either way nothing is left.
    name = "disp9009"
    before = xl_names()
    creating = asyncio.create_task(backend.create(name, template(), Marker(OWNER, "lab-dvm", 9009)))
    for _ in range(600):  # until libxl has named it in xenstore
        if name in xl_names() or creating.done():
            break
        await asyncio.sleep(0.2)
    xl("destroy", name, check=False)
    try:
        await creating
    except BackendError as exc:
        LOG.info("create after a destroy mid-build: %s", exc)
    await backend.destroy(name)
    assert xl_names() == before


async def test_load_backend_gives_a_xen_backend() -> None:
    backend = load_backend("xen", {"readiness": "xenstore"})
    assert isinstance(backend, XenBackend)
    await backend.open()
    await backend.close()
