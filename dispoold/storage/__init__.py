"""Storage: the disks every disposable owns, made before its domain and removed with it.

A template describes its disks by role (:class:`dispoold.config.VolumeSettings`); each
writable one lives in a storage pool (``[storage.NAME]``) served by a driver, one module
each behind :class:`StorageDriver`:

- ``lvm_thin`` (:mod:`dispoold.storage.lvm_thin`): thin snapshots in an LVM thin pool,
  instant, what Qubes uses by default;
- ``file`` (:mod:`dispoold.storage.file`): a file per volume in a directory, a reflink
  copy where the file system can, a sparse copy otherwise, attached as a loop device.

``package.module:Class`` names an out-of-tree driver. :class:`Storage` is what the engine
uses: it names the volumes (``<instance>--<disposable>--<role>``, so that a daemon finds
its own and no other's), makes and removes them through the pools' drivers, and finds the
ones no record knows of after a crash (Qubes #11086: volumes left behind).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ValidationError

from dispoold.config import (
    WRITABLE_ROLES,
    ConfigError,
    StorageSettings,
    TemplateSettings,
    VolumeSettings,
    describe_validation,
)
from dispoold.loader import Axis, resolve

log = logging.getLogger("dispoold.storage")

#: Between the parts of a volume's name: instance, disposable, role.
SEPARATOR = "--"
#: How long one storage command may take before it is taken for hung.
COMMAND_TIMEOUT = 120.0


class StorageError(Exception):
    """A volume could not be made, found or removed; the message says which and why."""


@runtime_checkable
class StorageDriver(Protocol):
    """One storage pool. Every method but :meth:`identify` is a coroutine that never
    blocks the event loop; failures raise :class:`StorageError` naming the volume."""

    async def open(self) -> None:
        """Check that the pool can be used (it exists, it is writable, the tools are
        there). Raises :class:`StorageError` saying what to do."""

    async def clone(self, name: str, source: str) -> Path:
        """A new writable volume ``name``, a copy-on-write snapshot of ``source`` (or the
        cheapest copy the pool can make). Returns the block device to give the domain."""

    async def create(self, name: str, size_mib: int) -> Path:
        """A new, empty volume ``name`` of ``size_mib``. Returns its block device."""

    async def remove(self, name: str) -> None:
        """Remove volume ``name`` (detach it first where needed). A volume that does not
        exist is not an error."""

    async def rename(self, name: str, new_name: str) -> None:
        """Give volume ``name`` (no longer in use) the name ``new_name``: a savefile keeps
        the volumes of the domain it saved."""

    def source_of(self, name: str) -> str:
        """What :meth:`clone` takes to snapshot this pool's own volume ``name``."""

    async def names(self, prefix: str) -> list[str]:
        """The pool's volumes whose name starts with ``prefix``."""

    async def usage(self, names: Sequence[str]) -> dict[str, float]:
        """MiB of the pool each of ``names`` really uses (missing ones left out)."""

    def identify(self, source: str) -> str:
        """The current state of ``source`` as a short string that changes when the
        source is replaced or changed (it outdates preloads). Blocking: called in a
        thread. ``missing`` when there is no such source."""


@dataclass(frozen=True, slots=True)
class Planned:
    """A volume of one disposable, named before it exists (the journal records it
    before it is made)."""

    pool: str
    name: str
    #: The disk it is in the domain (unique within a template).
    vdev: str


#: The drivers that ship, and how a driver is loaded (:mod:`dispoold.loader`).
DRIVERS: Axis[StorageDriver] = Axis(
    kind="storage driver",
    builtins={
        "lvm_thin": "dispoold.storage.lvm_thin:LvmThin",
        "file": "dispoold.storage.file:FileDriver",
    },
    port=StorageDriver,
    error=StorageError,
    own_errors=(StorageError,),
)


def load_driver(pool: str, settings: StorageSettings, path: Path | str) -> StorageDriver:
    """The driver ``settings.driver`` names, given its options (the driver's ``Options``
    model checks them). Raises :class:`~dispoold.config.ConfigError` naming the file and
    the field."""
    where = f"storage.{pool}"
    try:
        cls = resolve(DRIVERS, settings.driver)
    except StorageError as exc:
        raise ConfigError(path, f"{where}.driver: {exc}") from None
    options_model: type[BaseModel] | None = getattr(cls, "Options", None)
    try:
        options: Any = (
            options_model.model_validate(settings.driver_options())
            if options_model is not None
            else settings.driver_options()
        )
    except ValidationError as exc:
        raise ConfigError(path, describe_validation(exc, prefix=where)) from None
    driver: StorageDriver = cls(options)
    return driver


class Storage:
    """The configured storage pools, as the engine uses them."""

    def __init__(self, drivers: Mapping[str, StorageDriver], instance: str) -> None:
        self._drivers = dict(drivers)
        self._prefix = instance + SEPARATOR

    @classmethod
    def from_config(
        cls, storage: Mapping[str, StorageSettings], instance: str, path: Path | str
    ) -> Storage:
        return cls({n: load_driver(n, s, path) for n, s in storage.items()}, instance)

    @property
    def pools(self) -> list[str]:
        return sorted(self._drivers)

    async def open(self) -> None:
        """Check every pool. Raises :class:`StorageError` naming the pool."""
        for name, driver in self._drivers.items():
            try:
                await driver.open()
            except StorageError as exc:
                raise StorageError(f"storage pool {name}: {exc}") from None

    def plan(
        self, disposable: str, template: TemplateSettings
    ) -> list[tuple[Planned, VolumeSettings]]:
        """The writable volumes ``disposable`` gets, named, not yet made."""
        planned = []
        for volume in template.volumes:
            pool = template.pool_of(volume)
            if pool is not None and volume.role in WRITABLE_ROLES:
                name = self.name_for(disposable, volume.vdev)
                planned.append((Planned(pool, name, volume.vdev), volume))
        return planned

    def driver_name(self, pool: str) -> str:
        driver = self._drivers.get(pool)
        return "?" if driver is None else getattr(driver, "name", type(driver).__name__)

    async def make(self, planned: Planned, volume: VolumeSettings) -> Path:
        """Make a planned volume. Raises :class:`StorageError`."""
        driver = self._driver(planned.pool)
        if volume.role == "volatile":
            if volume.size_mib is None:  # pragma: no cover - the configuration checks it
                raise StorageError(f"{planned.name}: a volatile volume without a size")
            return await driver.create(planned.name, volume.size_mib)
        if volume.source is None:  # pragma: no cover - the configuration checks it
            raise StorageError(f"{planned.name}: no source to snapshot")
        return await driver.clone(planned.name, volume.source)

    async def remove(self, planned: Planned) -> None:
        """Remove a volume (gone already is fine). Raises :class:`StorageError`."""
        await self._driver(planned.pool).remove(planned.name)

    async def rename(self, planned: Planned, new_name: str) -> None:
        await self._driver(planned.pool).rename(planned.name, new_name)

    async def clone_from(self, planned: Planned, saved: Planned) -> Path:
        """Make ``planned`` a snapshot of ``saved``, a volume of the same pool."""
        driver = self._driver(saved.pool)
        return await driver.clone(planned.name, driver.source_of(saved.name))

    def name_for(self, disposable: str, vdev: str) -> str:
        return f"{self._prefix}{disposable}{SEPARATOR}{vdev}"

    async def leftovers(self, known: set[str]) -> list[Planned]:
        """This daemon's volumes that belong to no disposable in ``known`` (names)."""
        found = []
        for pool, driver in self._drivers.items():
            for name in await driver.names(self._prefix):
                disposable, _, vdev = name[len(self._prefix) :].rpartition(SEPARATOR)
                if disposable not in known:
                    found.append(Planned(pool, name, vdev))
        return found

    async def owned_by(self, disposable: str) -> list[Planned]:
        """The volumes found for ``disposable`` (one the journal does not know)."""
        owner = f"{self._prefix}{disposable}{SEPARATOR}"
        found = []
        for pool, driver in self._drivers.items():
            found += [Planned(pool, n, n[len(owner) :]) for n in await driver.names(owner)]
        return found

    async def usage(self, volumes: Sequence[Planned]) -> dict[str, float]:
        """MiB used by each of ``volumes`` (by name); a pool that cannot tell is left out."""
        used: dict[str, float] = {}
        by_pool: dict[str, list[str]] = {}
        for planned in volumes:
            by_pool.setdefault(planned.pool, []).append(planned.name)
        for pool, names in by_pool.items():
            try:
                used.update(await self._driver(pool).usage(names))
            except StorageError as exc:
                log.warning("storage pool %s: usage unknown: %s", pool, exc)
        return used

    def identify(self, pool: str, source: str) -> str:
        """Blocking: the state of a volume source (for the template's fingerprint)."""
        driver = self._drivers.get(pool)
        if driver is None:
            return "no such pool"
        try:
            return driver.identify(source)
        except StorageError as exc:
            return f"unknown: {exc}"

    def _driver(self, pool: str) -> StorageDriver:
        driver = self._drivers.get(pool)
        if driver is None:
            raise StorageError(f"no storage pool named {pool!r}")
        return driver


async def run_tool(argv: Sequence[str], what: str, timeout: float = COMMAND_TIMEOUT) -> str:
    """Run a storage command (lvcreate, losetup, cp, ...) and return its output.

    Raises :class:`StorageError` with ``what`` and the tool's own last words when it
    fails, is missing or hangs."""
    try:
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise StorageError(f"{what}: cannot run {argv[0]}: {exc.strerror or exc}") from None
    try:
        async with asyncio.timeout(timeout):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise StorageError(f"{what}: {argv[0]} did not finish within {timeout:g} s") from None
    if process.returncode != 0:
        lines = [line.strip() for line in err.decode(errors="replace").splitlines() if line.strip()]
        detail = lines[-1] if lines else f"exit status {process.returncode}"
        raise StorageError(f"{what}: {detail}")
    return out.decode(errors="replace")
