"""Shared pieces of the Xen backend's lab tests (``tests/xen/test_xen_*.py``).

The guest is the lab's PV image (``lab/guest``): busybox init, a reporter that writes
``data/ready`` and ``data/meminfo``, power-off on request.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from dispoold.backend import Backend, DomainEvent, DomainEventKind, Marker
from dispoold.config import TemplateSettings
from dispoold.xen.backend import XenBackend

GUEST = Path("/var/lib/dispoold-lab/guest")
CMDLINE = "console=hvc0 rdinit=/sbin/init quiet"
#: ~10 s on an idle machine (XENLAB.md); the lab shares a loaded host, so be generous.
READY_TIMEOUT = 240.0
LOG = logging.getLogger("dispoold.test.xen")


def template(**changes: object) -> TemplateSettings:
    settings: dict[str, object] = {
        "kernel": GUEST / "vmlinuz",
        "ramdisk": GUEST / "initrd.img",
        "cmdline": CMDLINE,
        "memory": 128,
        "maxmem": 256,
        "vcpus": 1,
    }
    settings.update(changes)
    return TemplateSettings.model_validate(settings)


def xl(*args: str, check: bool = True) -> str:
    """Run ``xl`` (the toolstack CLI, independent of the backend under test)."""
    result = subprocess.run(["xl", *args], check=False, capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"xl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def xl_names() -> set[str]:
    """Names of every domain but dom0, according to ``xl list``."""
    lines = xl("list").splitlines()[1:]
    return {line.split()[0] for line in lines if line.split() and line.split()[0] != "Domain-0"}


def xl_state(name: str) -> str | None:
    """The state column of ``xl list`` (e.g. ``-b----``, ``--p---``), or None."""
    for line in xl("list").splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == name:
            return fields[4]
    return None


def xenstore(*args: str) -> str:
    result = subprocess.run(
        ["xenstore-" + args[0], *args[1:]], check=False, capture_output=True, text=True
    )
    if result.returncode != 0:
        raise AssertionError(f"xenstore-{' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def destroy_by_name(names: Iterable[str]) -> None:
    """Last-resort clean-up with ``xl`` (for domains the backend must not touch)."""
    for name in names:
        if name in xl_names():
            xl("destroy", name, check=False)


class EventRecorder:
    """The single consumer of ``backend.events()``, keeping what it saw."""

    def __init__(self, backend: Backend) -> None:
        self.events: list[DomainEvent] = []
        self._changed = asyncio.Condition()
        self._task = asyncio.create_task(self._run(backend))

    async def _run(self, backend: Backend) -> None:
        async for event in backend.events():
            LOG.info("event %s %s", event.kind, event.name)
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    def count(self, kind: DomainEventKind, name: str) -> int:
        return sum(1 for e in self.events if e.kind == kind and e.name == name)

    async def wait_for(self, kind: DomainEventKind, name: str, timeout: float) -> float:
        """Seconds until the event was seen; raises TimeoutError."""
        start = time.monotonic()
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.count(kind, name) > 0)
        return time.monotonic() - start

    async def stop(self) -> None:
        self._task.cancel()
        with suppress(asyncio.CancelledError):
            await self._task


@asynccontextmanager
async def xen_backend(
    owner: str, options: dict[str, object] | None = None
) -> AsyncIterator[XenBackend]:
    """An open backend; on exit every domain marked with ``owner`` is destroyed."""
    backend = XenBackend(options or {})
    await backend.open()
    try:
        yield backend
    finally:
        try:
            for info in await backend.list_owned(owner):
                await backend.destroy(info.name)
        finally:
            await backend.close()


async def boot(backend: Backend, name: str, owner: str, dispid: int, **changes: object) -> int:
    """Create and wait until ready; returns the domid."""
    start = time.monotonic()
    domid = await backend.create(name, template(**changes), Marker(owner, "lab-dvm", dispid))
    created = time.monotonic()
    await backend.wait_ready(name, READY_TIMEOUT)
    LOG.info(
        "%s: create %.2f s, ready %.2f s later", name, created - start, time.monotonic() - created
    )
    return domid
