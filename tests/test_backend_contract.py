"""The backend contract (``tests/contracts/backend.py``) against the test double.

The same tests run against ``XenBackend`` on real Xen in the lab
(``tests/xen/test_backend_contract.py``): what the engine's tests assume of
:class:`~tests.doubles.FakeBackend` is what Xen does.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_asyncio

from dispoold.backend import Backend
from dispoold.config import TemplateSettings
from tests.contracts.backend import BackendContract, BackendEnv, EventRecorder, State
from tests.doubles import FakeBackend

pytestmark = pytest.mark.asyncio

OWNER = "dispoold-test-contract"
SHARED_DISPID = 9100


class FakeEnv(BackendEnv):
    def __init__(self, backend: FakeBackend) -> None:
        self.fake = backend
        self.backend = backend
        self.owner = OWNER
        self.shared = f"disp{SHARED_DISPID}"
        self.shared_dispid = SHARED_DISPID
        # Real time, but the fake is quick: its guests boot in 50 ms.
        self.boot_timeout = 5.0
        self.short_timeout = 0.3
        self.notice_timeout = 1.0
        self.overhead_mib = 0
        self._dispids = itertools.count(SHARED_DISPID + 1)

    def template(self, **changes: Any) -> TemplateSettings:
        return TemplateSettings.model_validate({"memory": 128, "maxmem": 256, **changes})

    def never_ready_template(self) -> TemplateSettings:
        return self.template(options={"boot": "never"})

    def dying_template(self) -> TemplateSettings:
        return self.template(options={"boot": "die"})

    def failing_templates(self) -> dict[str, TemplateSettings]:
        return {
            "its kernel is missing": self.template(options={"fail_at": "create"}),
            "libxl fails part-way through the build": self.template(options={"fail_at": "build"}),
            "the unpause fails": self.template(options={"fail_at": "start"}),
            "more memory than the host has": self.template(memory=10**6, maxmem=10**6),
            "options the backend cannot read": self.template(options={"nope": 1}),
        }

    def new_dispid(self) -> int:
        return next(self._dispids)

    def names(self) -> set[str]:
        return set(self.fake.domains)

    def state(self, name: str) -> State | None:
        domain = self.fake.domains.get(name)
        if domain is None:
            return None
        if domain.shutdown:
            return "shutdown"
        return "paused" if domain.paused else "running"

    async def unpause_behind(self, name: str) -> None:
        self.fake.external_unpause(name)

    async def destroy_behind(self, name: str) -> None:
        self.fake.vanish(name)

    async def make_unmarked(self, name: str) -> None:
        self.fake.add_foreign(name)

    @asynccontextmanager
    async def other_owner(self) -> AsyncIterator[tuple[Backend, str]]:
        other, owner = self.fake.on_same_host(), OWNER + "-other"
        await other.open()
        try:
            yield other, owner
        finally:
            for info in await other.list_owned(owner):
                await other.destroy(info.name)
            await other.close()

    @asynccontextmanager
    async def another_process(self) -> AsyncIterator[Backend]:
        restarted = self.fake.on_same_host()
        await restarted.open()
        try:
            yield restarted
        finally:
            await restarted.close()

    def unopened(self) -> Backend:
        return self.fake.on_same_host()


@pytest_asyncio.fixture
async def env() -> AsyncIterator[FakeEnv]:
    backend = FakeBackend({"ready_delay": 0.05, "host_mib": 4096})
    await backend.open()
    assert await backend.list_owned(OWNER) == []
    environment = FakeEnv(backend)
    environment.events = EventRecorder(backend)
    await backend.create(
        environment.shared, environment.template(), environment.marker(SHARED_DISPID)
    )
    await backend.wait_ready(environment.shared, environment.boot_timeout)
    yield environment
    await environment.events.stop()
    await backend.close()


class TestFakeBackend(BackendContract):
    pass
