"""A release never waits behind a build (found on real Xen: 17-39 s while a refill ran).

libxl holds a context's lock while it builds a domain; destroys used the build's context,
so destroying a handed-out disposable waited for whatever the pool was building. They
have a context (and threads) of their own now.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from dispoold.backend import Marker
from tests.xen.xen_fixtures import LOG, boot, template, xen_backend, xl_names

OWNER = "release-test"


@pytest.mark.asyncio
async def test_a_destroy_finishes_while_a_build_is_still_running() -> None:
    async with xen_backend(OWNER) as backend:
        await boot(backend, "disp9301", OWNER, 9301)
        started = time.monotonic()
        build = asyncio.create_task(
            backend.create("disp9302", template(), Marker(OWNER, "lab-dvm", 9302))
        )
        await asyncio.sleep(0.5)  # the build is under way (it takes seconds here)
        assert not build.done()
        destroy_started = time.monotonic()
        await backend.destroy("disp9301")
        destroyed = time.monotonic()
        build_running = not build.done()
        await build
        built = time.monotonic()
        LOG.info(
            "destroy %.2f s, during a build of %.2f s", destroyed - destroy_started, built - started
        )
        assert "disp9301" not in xl_names()
        # The destroy did not wait for the build to end.
        assert build_running, (
            f"the destroy took {destroyed - destroy_started:.2f} s and ended after the build"
        )
