"""The backend contract (``tests/contracts/backend.py``) against ``XenBackend`` on real Xen.

    lab/labctl run -- /opt/dispoold/venv/bin/python -m pytest tests/xen/test_backend_contract.py

The same tests run on the host against the test double (``tests/test_backend_contract.py``).
The host is looked at, and acted on behind the backend's back, with ``xl``, as in
``tests/xen/test_xen_backend.py``; the guests are the lab's (``tests/xen/xen_fixtures.py``).
One guest boots for the whole module; the others are created and never need to boot.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from dispoold.backend import Backend
from dispoold.config import TemplateSettings
from dispoold.xen.backend import XenBackend
from tests.contracts.backend import BackendContract, BackendEnv, EventRecorder, State
from tests.xen.xen_fixtures import (
    GUEST,
    LOG,
    READY_TIMEOUT,
    destroy_by_name,
    template,
    xen_backend,
    xl,
    xl_names,
    xl_state,
)

pytestmark = [pytest.mark.xen, pytest.mark.asyncio(loop_scope="module")]

OWNER = "dispoold-test-contract"
#: Names disp9100... (tests/xen/test_xen_backend.py uses disp9001-9009 and 9090-9091).
FIRST_DISPID = 9100
OPTIONS: dict[str, object] = {"unpause_check_interval": 0.5}


class XenEnv(BackendEnv):
    def __init__(self, backend: XenBackend, scratch: Path) -> None:
        self.backend = backend
        self.owner = OWNER
        self.shared_dispid = FIRST_DISPID
        self.shared = f"disp{FIRST_DISPID}"
        self.boot_timeout = READY_TIMEOUT
        self.short_timeout = 20.0
        self.notice_timeout = 30.0
        # What Xen takes per domain beyond its memory (page tables, p2m, grant tables).
        self.overhead_mib = 32
        self.scratch = scratch
        self.made_behind: set[str] = set()
        self._dispids = itertools.count(FIRST_DISPID + 1)

    def template(self, **changes: Any) -> TemplateSettings:
        return template(**changes)

    def never_ready_template(self) -> TemplateSettings:
        # init is busybox's sleep: the kernel boots, nothing ever reports.
        return template(cmdline="console=hvc0 rdinit=/bin/sleep 3600")

    def dying_template(self) -> TemplateSettings:
        # A ramdisk that is not one: the kernel finds no init and panics; Xen marks the
        # domain crashed, and it lingers until destroyed.
        return template(ramdisk=GUEST / "vmlinuz", cmdline="console=hvc0")

    def failing_templates(self) -> dict[str, TemplateSettings]:
        garbage = self.scratch / "not-a-kernel"
        garbage.write_bytes(b"this is not an ELF image\n" * 100)
        return {
            "its kernel is missing": template(kernel="/nonexistent/vmlinuz"),
            "a kernel libxl cannot load (fails part-way through the build)": template(
                kernel=garbage
            ),
            "more memory than the host has": template(memory=10**6, maxmem=10**6),
            "options the backend cannot read": template(options={"nope": 1}),
        }

    def new_dispid(self) -> int:
        return next(self._dispids)

    def names(self) -> set[str]:
        return xl_names()

    def state(self, name: str) -> State | None:
        flags = xl_state(name)
        if flags is None:
            return None
        # xl's state column: r running, b blocked, p paused, s shut down, c crashed, d dying.
        if any(flag in flags for flag in "scd"):
            return "shutdown"
        return "paused" if "p" in flags else "running"

    async def unpause_behind(self, name: str) -> None:
        await asyncio.to_thread(xl, "unpause", name)

    async def destroy_behind(self, name: str) -> None:
        await asyncio.to_thread(xl, "destroy", name)

    async def make_unmarked(self, name: str) -> None:
        config = self.scratch / f"{name}.cfg"
        config.write_text(
            f'name = "{name}"\ntype = "pv"\nkernel = "{GUEST / "vmlinuz"}"\n'
            f'ramdisk = "{GUEST / "initrd.img"}"\nmemory = 128\n'
        )
        self.made_behind.add(name)
        await asyncio.to_thread(xl, "create", "-p", str(config))  # paused: costs no CPU

    @asynccontextmanager
    async def other_owner(self) -> AsyncIterator[tuple[Backend, str]]:
        owner = OWNER + "-other"
        async with xen_backend(owner) as other:
            yield other, owner

    @asynccontextmanager
    async def another_process(self) -> AsyncIterator[Backend]:
        # A backend of its own on the same Xen, as a restarted daemon makes; it destroys
        # nothing when it ends (what it finds is the first backend's to clean up).
        restarted = XenBackend(OPTIONS)
        await restarted.open()
        try:
            yield restarted
        finally:
            await restarted.close()

    def unopened(self) -> Backend:
        return XenBackend(OPTIONS)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[XenEnv]:
    before = xl_names()
    environment: XenEnv | None = None
    try:
        async with xen_backend(OWNER, OPTIONS) as backend:
            assert await backend.list_owned(OWNER) == []
            environment = XenEnv(backend, tmp_path_factory.mktemp("contract"))
            environment.events = EventRecorder(backend)
            loop = asyncio.get_running_loop()
            start = loop.time()
            await backend.create(
                environment.shared,
                environment.template(),
                environment.marker(environment.shared_dispid),
            )
            await backend.wait_ready(environment.shared, READY_TIMEOUT)
            LOG.info("%s booted in %.1f s", environment.shared, loop.time() - start)
            try:
                yield environment
            finally:
                await environment.events.stop()
    finally:
        if environment is not None:
            destroy_by_name(environment.made_behind)
        leaked = xl_names() - before
        assert not leaked, f"domains left behind: {leaked}"


class TestXenBackend(BackendContract):
    pass
