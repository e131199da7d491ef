"""The hypervisor seam: what the pool engine needs from a backend, and how one is chosen.

The engine knows domains only by name (``dispNNNN``) and never touches a hypervisor
API. A backend is any class with the methods of :class:`Backend`; ``xen`` is the one
that ships (:mod:`dispoold.xen`), and ``package.module:Class`` in the configuration
loads an out-of-tree one (:func:`load_backend`, through :mod:`dispoold.loader`).

Contract shared by every method:

- All methods are coroutines and must not block the event loop; a backend that calls a
  blocking C library runs it in a worker thread.
- Failures raise :class:`BackendError` (or a subclass) carrying the operation and the
  domain. Nothing else escapes, apart from :class:`asyncio.CancelledError`.
- :meth:`Backend.destroy` is idempotent: destroying a domain that is already gone is
  not an error. Everything else on a domain that does not exist raises
  :class:`NoSuchDomain`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from dispoold.config import TemplateSettings
from dispoold.identity import Identity
from dispoold.loader import Axis, load


class BackendError(Exception):
    """A backend operation failed."""

    def __init__(self, operation: str, domain: str | None, message: str) -> None:
        where = f" {domain}" if domain else ""
        super().__init__(f"{operation}{where}: {message}")
        self.operation = operation
        self.domain = domain
        self.message = message


class NoSuchDomain(BackendError):
    """The domain does not exist (it was never created, or it is gone)."""


class NotPaused(BackendError):
    """:meth:`Backend.unpause` found the domain already running: someone else unpaused it."""


class NotReady(BackendError):
    """The guest did not report readiness in time, or died while booting."""


class BackendUnavailable(BackendError):
    """The backend cannot work on this host at all (missing library, no hypervisor)."""


@dataclass(frozen=True, slots=True)
class Marker:
    """What the daemon writes on every domain it creates, so it can find them again.

    ``owner`` names the daemon instance (two daemons on one host never touch each other's
    domains); ``template`` and ``dispid`` let restart recovery reconcile a domain that
    the journal does not know.
    """

    owner: str
    template: str
    dispid: int


@dataclass(frozen=True, slots=True)
class Disk:
    """A block device the domain gets as ``vdev``."""

    vdev: str
    path: Path
    writable: bool


@dataclass(frozen=True, slots=True)
class Provision:
    """What one domain gets besides its template: its own disks (made by the engine's
    storage before the domain), and its identity (name, interfaces, seed), which the
    backend passes to the guest (on Xen: docs/guest.md)."""

    disks: tuple[Disk, ...] = ()
    identity: Identity | None = None
    #: This boot prepares a savefile (docs/guest.md): the guest runs ``prerun`` (if
    #: any), reports its used memory and waits to be saved.
    save_request: bool = False
    prerun: str | None = None


#: A domain with no disks and no identity of its own.
NO_PROVISION = Provision()


@dataclass(frozen=True, slots=True)
class DomainInfo:
    name: str
    domid: int
    paused: bool
    #: True once the guest has shut down or crashed (a Xen domain lingers until destroyed).
    shutdown: bool
    memory_mib: int
    maxmem_mib: int
    marker: Marker | None


@dataclass(frozen=True, slots=True)
class MemoryInfo:
    actual_mib: int
    target_mib: int
    maxmem_mib: int
    #: What the guest reports using, if it reports (Qubes: meminfo-writer).
    used_mib: int | None


class DomainEventKind(StrEnum):
    #: The domain is gone, or has shut down or crashed.
    DIED = "died"
    #: A domain this backend paused was found running although the backend did not
    #: unpause it: someone else did.
    UNPAUSED = "unpaused"


@dataclass(frozen=True, slots=True)
class DomainEvent:
    kind: DomainEventKind
    name: str


@runtime_checkable
class Backend(Protocol):
    """What the pool engine needs from a hypervisor. See the module docstring."""

    async def open(self) -> None:
        """Connect to the hypervisor. Raises :class:`BackendUnavailable` when it can't."""

    async def close(self) -> None:
        """Release every resource; domains are left as they are."""

    async def create(
        self,
        name: str,
        template: TemplateSettings,
        marker: Marker,
        provision: Provision = NO_PROVISION,
    ) -> int:
        """Create the domain ``name`` from ``template``, marked with ``marker``, with the
        disks and identity of ``provision``, and start it (running, not paused). Returns
        its domid.

        On failure nothing is left behind: a half-built domain is destroyed before
        :class:`BackendError` is raised. This call is not cancellable halfway; the engine
        shields it and destroys the domain afterwards when it no longer wants it.
        """

    async def wait_ready(self, name: str, timeout: float) -> None:
        """Return once the guest reports that its system is running.

        Raises :class:`NotReady` after ``timeout`` seconds or if the domain dies first.
        Cancellable at any point.
        """

    async def pause(self, name: str) -> None:
        """Pause the domain. From now on, an unpause that this backend did not do is
        reported as a :attr:`DomainEventKind.UNPAUSED` event."""

    async def unpause(self, name: str) -> None:
        """Unpause a domain this backend paused.

        Raises :class:`NotPaused` if it was already running (someone else unpaused it);
        the check and the unpause are one step, so a domain is never handed out after an
        unnoticed foreign unpause.
        """

    async def set_memory_target(self, name: str, mib: int) -> None:
        """Ask the guest's balloon driver for ``mib`` MiB (capped at maxmem)."""

    async def memory(self, name: str) -> MemoryInfo:
        """The domain's current, target and maximum memory, and its reported use."""

    async def destroy(self, name: str) -> None:
        """Destroy the domain. A domain that does not exist is not an error."""

    async def domain_info(self, name: str) -> DomainInfo | None:
        """The domain's state, or None if it does not exist."""

    async def list_owned(self, owner: str) -> list[DomainInfo]:
        """Every domain carrying a marker whose owner is ``owner``."""

    async def free_memory_mib(self) -> int:
        """Memory the hypervisor has not given to any domain."""

    def events(self) -> AsyncIterator[DomainEvent]:
        """Deaths and foreign unpauses of the domains this backend created or found via
        :meth:`list_owned`, as they happen. One consumer; ends when the backend closes."""
        ...


@runtime_checkable
class SaveRestore(Protocol):
    """A backend that can save a prepared domain to a file and restore copies of it
    (the savefile origin, :mod:`dispoold.savefile`). Optional: without it, templates
    have no savefiles and the engine says so."""

    async def wait_prepared(self, name: str, timeout: float) -> int:
        """Return the used memory (MiB) the guest reports once it is prepared for a save
        (it was created with ``Provision.save_request``). Raises :class:`NotReady` after
        ``timeout`` or if it dies."""

    async def save(self, name: str, path: Path) -> None:
        """Suspend the domain and write its state to ``path`` (created, must not exist).
        The domain is left shut down, and no death is reported for it: destroy it next."""

    async def restore(
        self,
        name: str,
        template: TemplateSettings,
        marker: Marker,
        provision: Provision,
        *,
        path: Path,
        memory_mib: int,
    ) -> int:
        """Create domain ``name`` from the state in ``path``, with its own marker, disks
        and identity (a new seed), told that its restore is complete, and start it, with
        ``memory_mib`` (what it was saved with). Returns its domid. Like
        :meth:`Backend.create`: nothing is left behind on failure."""


def _unavailable(message: str) -> BackendUnavailable:
    return BackendUnavailable("load", None, message)


#: The backends that ship with dispoold, and how a backend is loaded (:mod:`dispoold.loader`).
BACKENDS: Axis[Backend] = Axis(
    kind="backend",
    builtins={"xen": "dispoold.xen.backend:XenBackend"},
    port=Backend,
    error=_unavailable,
    own_errors=(BackendError,),
)


def load_backend(name: str, options: Mapping[str, Any]) -> Backend:
    """Instantiate the backend named in the configuration.

    ``name`` is a key of ``BACKENDS.builtins`` or ``package.module:Class``; the class is
    called with ``options`` (the ``[backend.options]`` table). Raises
    :class:`BackendUnavailable` with a message a person can act on.
    """
    return load(BACKENDS, name, dict(options))
