"""The Xen backend: disposables as Xen domains, through libxl and xenstore.

Threads. Every libxl and xenstore request runs in a worker thread, never on the event
loop. Builds, saves and restores (seconds) have their own pool, destroys another, so
that neither the quick operations (pause, unpause, domain info, memory: milliseconds)
nor a release queue behind a build; with ``control_context = "separate"`` (the
default) the quick operations and the destroys also use a libxl context each, because
libxl holds a context's lock while it builds a domain.
Per domain, one asyncio lock serializes pause, unpause and the foreign-unpause check,
and the paused check and the unpause run as one call in one thread.

Marker. Each domain this backend creates carries ``/local/domain/<domid>/dispoold/``
``{owner,template,dispid}``. libxl writes it (``c_info.xsdata``) in the xenstore
transaction that names the domain, so no domain of ours ever exists in xenstore without
it, and removes it with the domain. ``/local/domain/<domid>`` is owned by dom0 and only
readable by the guest; the marker inherits that, so the guest can read it but can
neither change nor forge it (it can write only under ``data/``, ``control/...`` and the
like). Nothing acts on a domain without a marker of this daemon's owner, whatever its
name.

Memory. Under the qmemman memory manager, the backend creates ``memory/meminfo`` and
``memory/swapinfo`` empty and owned by each domain it builds, once the domain exists and
before its unpause, as the Qubes toolstack does (libxl leaves ``memory/`` read-only for
the guest, and qmemman learns what a guest uses only there); then it tells the memory
manager that the domain exists, so that its allocation ends before the unpause
(:meth:`XenBackend.observe_builds`, the manager's :class:`dispoold.memory.port.BuildObserver`).
A domain's target is the one the toolstack set in Xen: libxl and qmemman both keep Xen's
maxmem 1 MiB above it, while ``memory/target`` (what the guest's balloon follows) is the
same under libxl and 16 MiB lower under qmemman.

Events. Deaths: a watch on xenstore's ``@releaseDomain`` (fired when any domain shuts
down, crashes or is destroyed) wakes a scan: one ``libxl_list_domain`` call compared
with the domains we know. The watch's file descriptor sits in the event loop
(``add_reader``), so there is no polling delay. Foreign unpauses: the same scan runs
every ``unpause_check_interval`` seconds while some domain is paused by us, and
:meth:`XenBackend.unpause` checks the flag itself. Each event is reported once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from dispoold.backend import (
    NO_PROVISION,
    BackendError,
    BackendUnavailable,
    DomainEvent,
    DomainEventKind,
    DomainInfo,
    Marker,
    MemoryInfo,
    NoSuchDomain,
    NotPaused,
    NotReady,
    Provision,
)
from dispoold.config import TemplateSettings, describe_validation
from dispoold.xen import bindings, connection
from dispoold.xen.keys import (
    MARKER_DIR,
    MARKER_KEYS,
    RESTORE_COMPLETE_KEY,
    USED_MEM_KEY,
    identity_keys,
    marker_keys,
    parse_kib,
    parse_marker,
    save_request_keys,
)
from dispoold.xen.libxl import DomainSpec, DomInfo, Libxl, LibxlError, NicSpec
from dispoold.xen.options import XenBackendOptions, XenTemplateOptions
from dispoold.xen.xenstore import XenStore, XenStoreError

log = logging.getLogger("dispoold.xen")

T = TypeVar("T")

RELEASE_WATCH = "@releaseDomain"
#: Xen's maxmem sits this far above the target libxl and qmemman set (LIBXL_MAXMEM_CONSTANT).
MAXMEM_SLACK_KIB = 1024
#: qmemman writes memory/target this far below the target it sets in Xen (its mem_set).
QMEMMAN_TARGET_OFFSET_KIB = 16 * 1024
#: How long a build waits for a memory manager's word before it unpauses the domain.
BUILD_HOOK_TIMEOUT = 10.0

BuildHook = Callable[[str, int], Coroutine[Any, Any, None]]


class _Unpause(Enum):
    DONE = "done"
    GONE = "gone"
    RUNNING = "running"


@dataclass(eq=False)
class _Domain:
    """A domain this backend created or adopted (via list_owned or by name)."""

    name: str
    domid: int
    uuid: bytes
    marker: Marker
    #: Paused by this backend and not unpaused by it since.
    paused_by_backend: bool = False
    died: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class _Found:
    info: DomInfo
    name: str
    marker: Marker | None
    maxmem_kib: int


def xen_target_kib(max_memkb: int, balloon_kib: int | None, ceiling_kib: int) -> int | None:
    """The target the toolstack set in Xen, from Xen's maxmem and ``memory/target``.

    libxl and qmemman both set Xen's maxmem to the target + 1 MiB; ``memory/target`` is
    the target under libxl and 16 MiB below it under qmemman. When the two disagree
    otherwise (someone changed maxmem alone), ``memory/target`` is all there is."""
    if balloon_kib is None:
        return None
    xen_kib = max_memkb - MAXMEM_SLACK_KIB
    if 0 <= xen_kib - balloon_kib <= QMEMMAN_TARGET_OFFSET_KIB:
        return min(xen_kib, ceiling_kib)
    return balloon_kib


def domain_spec(
    name: str,
    template: TemplateSettings,
    marker: Marker,
    options: XenTemplateOptions,
    provision: Provision = NO_PROVISION,
) -> DomainSpec:
    """What libxl is asked to build. Raises ValueError naming what is wrong."""
    if template.kernel is None:
        raise ValueError("the template has no kernel (only direct kernel boot is supported)")
    for what, path in (("kernel", template.kernel), ("ramdisk", template.ramdisk)):
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{what} {path} does not exist or is not readable")
    disks = [
        f"format=raw, vdev={d.vdev}, access={'rw' if d.writable else 'ro'}, target={d.path}"
        for d in provision.disks
    ]
    # Shared images: read-only, as they are (the configuration allows nothing else).
    disks += [
        f"format=raw, vdev={volume.vdev}, access=ro, target={volume.source}"
        for volume in template.volumes
        if volume.role == "read-only"
    ]
    xsdata = marker_keys(marker)
    if provision.save_request:
        xsdata |= save_request_keys(provision.prerun)
    nics: tuple[NicSpec, ...] = ()
    if provision.identity is not None:
        xsdata |= identity_keys(provision.identity)
        nics = tuple(
            NicSpec(devid=i.devid, mac=i.mac, bridge=i.bridge, backend=i.backend)
            for i in provision.identity.interfaces
        )
    return DomainSpec(
        name=name,
        kernel=str(template.kernel),
        ramdisk=None if template.ramdisk is None else str(template.ramdisk),
        cmdline=template.cmdline,
        memory_kib=template.memory * 1024,
        maxmem_kib=template.max_memory * 1024,
        vcpus=template.vcpus,
        disks=tuple(disks),
        nics=nics,
        xsdata=xsdata,
        pvh=options.type == "pvh",
    )


class XenBackend:
    """:class:`dispoold.backend.Backend` on Xen. See the module docstring."""

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        # Options first: a typo is worth reporting even on a host without Xen.
        try:
            self.options = XenBackendOptions.model_validate(dict(options or {}))
        except ValidationError as exc:
            raise ValueError(describe_validation(exc)) from None
        self._ffi, self._lib = bindings.load()
        self._xl_build: Libxl | None = None
        self._xl_ctl: Libxl | None = None
        self._xl_teardown: Libxl | None = None
        self._xs: XenStore | None = None
        self._xs_watch: XenStore | None = None
        self._quick: ThreadPoolExecutor | None = None
        self._slow: ThreadPoolExecutor | None = None
        self._destroys: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._xen: connection.XenConnection | None = None
        self._attached = False
        self._release_token: str | None = None
        self._tracked: dict[str, _Domain] = {}
        self._creating: dict[str, asyncio.Future[tuple[int, bytes]]] = {}
        self._owners: set[str] = set()
        self._events: asyncio.Queue[DomainEvent | None] | None = None
        self._scan_wanted = asyncio.Event()
        self._monitor_task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Future[Any]] = set()
        self._build_hooks: list[BuildHook] = []
        self._guest_keys: tuple[str, ...] = ()

    def observe_builds(self, hook: BuildHook, guest_keys: tuple[str, ...] = ()) -> None:
        """For every domain built from now on: once it exists (paused), create
        ``guest_keys`` (relative to its xenstore area) empty and owned by it, run
        ``hook(name, domid)`` on the event loop and wait for it (at most
        :data:`BUILD_HOOK_TIMEOUT`), then unpause it. A key that cannot be created fails
        the build; a hook that fails or is late is logged and the build goes on."""
        self._build_hooks.append(hook)
        self._guest_keys = tuple(dict.fromkeys(self._guest_keys + tuple(guest_keys)))

    # -- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._quick = ThreadPoolExecutor(4, thread_name_prefix="dispoold-xen")
        self._destroys = ThreadPoolExecutor(2, thread_name_prefix="dispoold-xen-destroy")
        self._slow = ThreadPoolExecutor(
            self.options.build_threads, thread_name_prefix="dispoold-xen-build"
        )
        try:
            await loop.run_in_executor(self._quick, self._open_sync)
            xen = self._need(self._xen)
            xen.attach(loop)
            self._attached = True
            self._release_token = xen.token("release")
            xen.on_watch(self._release_token, lambda _path: self._scan_wanted.set())
            await loop.run_in_executor(
                self._quick, xen.xs_watch.watch, RELEASE_WATCH, self._release_token
            )
        except (LibxlError, XenStoreError, RuntimeError) as exc:
            await self._teardown()
            raise BackendUnavailable(
                "open",
                None,
                f"cannot use Xen: {exc}. The Xen backend runs as root in dom0, with the "
                "Xen toolstack up (xenstored; Debian: xen.service, elsewhere xencommons)",
            ) from None
        self._events = asyncio.Queue()
        self._monitor_task = asyncio.create_task(self._monitor(), name="dispoold-xen-monitor")

    async def close(self) -> None:
        if self._events is not None:
            self._events.put_nowait(None)
            self._events = None
        await self._teardown()

    async def _teardown(self) -> None:
        if self._monitor_task is not None:
            self._monitor_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor_task
            self._monitor_task = None
        xen = self._xen
        if xen is not None and self._release_token is not None:
            xen.forget_watch(self._release_token)
            with contextlib.suppress(XenStoreError):
                await asyncio.to_thread(xen.xs_watch.unwatch, RELEASE_WATCH, self._release_token)
            self._release_token = None
        if xen is not None and self._attached:
            xen.detach()
            self._attached = False
        # Builds in flight finish first. The connection itself stays open for the next
        # backend of this process (see dispoold.xen.connection).
        for executor in (self._slow, self._destroys, self._quick):
            if executor is not None:
                await asyncio.to_thread(executor.shutdown, True)
        self._slow = self._destroys = self._quick = None
        self._xen = None
        self._xl_build = self._xl_ctl = self._xl_teardown = None
        self._xs = self._xs_watch = None

    def _open_sync(self) -> None:
        xen = connection.connect(
            self._ffi, self._lib, self.options.libxl_log_level, self.options.sigchld
        )
        self._xen = xen
        self._xl_build = xen.build
        separate = self.options.control_context == "separate"
        self._xl_ctl = xen.control() if separate else xen.build
        self._xl_teardown = xen.teardown() if separate else xen.build
        self._xs = xen.xs
        self._xs_watch = xen.xs_watch

    # -- Backend: domains -----------------------------------------------------------

    async def create(
        self,
        name: str,
        template: TemplateSettings,
        marker: Marker,
        provision: Provision = NO_PROVISION,
    ) -> int:
        try:
            options = XenTemplateOptions.model_validate(template.options)
            spec = domain_spec(name, template, marker, options, provision)
        except ValidationError as exc:
            raise BackendError(
                "create", name, f"template options: {describe_validation(exc)}"
            ) from None
        except ValueError as exc:
            raise BackendError("create", name, str(exc)) from None
        if name in self._creating:
            raise BackendError("create", name, "a create of that name is in progress")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._need(self._slow), self._create_sync, spec)
        self._creating[name] = future
        try:
            domid, uuid = await future
        except LibxlError as exc:
            raise BackendError("create", name, exc.describe()) from None
        except ValueError as exc:
            raise BackendError("create", name, str(exc)) from None
        finally:
            if self._creating.get(name) is future:
                del self._creating[name]
        self._owners.add(marker.owner)
        self._tracked[name] = _Domain(name, domid, uuid, marker)
        log.info("created %s (domid %d) from template %s", name, domid, marker.template)
        return domid

    def _create_sync(self, spec: DomainSpec) -> tuple[int, bytes]:
        with self._need(self._xen).busy():
            return self._create_busy(spec)

    def _create_busy(self, spec: DomainSpec) -> tuple[int, bytes]:
        xl = self._need(self._xl_build)
        existing = xl.name_to_domid(spec.name)
        if existing is not None:
            raise LibxlError(
                "create", 0, f"a domain named {spec.name} already exists (domid {existing})"
            )
        domid, uuid = xl.create(spec)
        try:
            self._built_sync(spec.name, domid)
            xl.unpause(domid)
        except (LibxlError, XenStoreError) as exc:
            xl.destroy(domid)
            if isinstance(exc, XenStoreError):
                raise LibxlError("create", 0, f"guest keys: {exc}") from None
            raise
        return domid, uuid

    def _built_sync(self, name: str, domid: int) -> None:
        """The domain exists, paused: the keys its guest reports memory in, then the
        memory manager's word (in the worker thread, before the unpause)."""
        xs = self._need(self._xs)
        for key in self._guest_keys:
            path = f"/local/domain/{domid}/{key}"
            xs.write(path, "")
            # Owned by the domain, nobody else's (dom0 always has access).
            xs.set_permissions(path, [(domid, self._lib.XS_PERM_NONE)])
        loop = self._loop
        for hook in list(self._build_hooks):
            if loop is None:
                break
            future = asyncio.run_coroutine_threadsafe(hook(name, domid), loop)
            try:
                future.result(BUILD_HOOK_TIMEOUT)
            except concurrent.futures.TimeoutError:
                future.cancel()
                log.warning("%s: the memory manager did not answer the build in time", name)
            except Exception as exc:  # the manager's problem; the build goes on
                log.warning("%s: the memory manager's build hook failed: %s", name, exc)

    async def wait_ready(self, name: str, timeout: float) -> None:
        try:
            domain = await self._resolve("wait_ready", name)
        except NoSuchDomain:
            raise NotReady("wait_ready", name, "the domain is gone") from None
        if domain.died.is_set():
            raise NotReady("wait_ready", name, "the domain died while booting")
        if self.options.readiness == "qrexec":
            await self._wait_qrexec(domain, timeout)
        else:
            await self._wait_key(domain, self.options.ready_key, timeout, "wait_ready")

    async def wait_prepared(self, name: str, timeout: float) -> int:
        try:
            domain = await self._resolve("wait_prepared", name)
        except NoSuchDomain:
            raise NotReady("wait_prepared", name, "the domain is gone") from None
        untrusted_value = await self._wait_key(domain, USED_MEM_KEY, timeout, "wait_prepared")
        kib = parse_kib(untrusted_value, 2**40)
        if kib is None:
            raise NotReady("wait_prepared", name, f"{USED_MEM_KEY} is not a number of KiB")
        return max(1, kib // 1024)

    async def _wait_key(self, domain: _Domain, key: str, timeout: float, operation: str) -> str:
        """The first value other than "" or "0" the guest writes to ``key``."""
        path = self._key_path(domain.domid, key)
        xen = self._need(self._xen)
        token = xen.token("ready")
        fired = asyncio.Event()
        xen.on_watch(token, lambda _path: fired.set())
        xs_watch, xs = self._need(self._xs_watch), self._need(self._xs)
        try:
            await self._quick_call(xs_watch.watch, path, token)
            async with asyncio.timeout(timeout):
                while True:
                    fired.clear()
                    untrusted_value = await self._quick_call(xs.read, path)
                    if untrusted_value is not None and untrusted_value.strip() not in ("", "0"):
                        return untrusted_value
                    await self._first_of(fired, domain.died)
                    if domain.died.is_set():
                        raise NotReady(operation, domain.name, "the domain died while booting")
        except TimeoutError:
            raise NotReady(
                operation,
                domain.name,
                f"the guest did not write {path} within {timeout:g} s",
            ) from None
        except XenStoreError as exc:
            raise BackendError(operation, domain.name, str(exc)) from None
        finally:
            xen.forget_watch(token)
            self._in_background(self._quick_call(xs_watch.unwatch, path, token))

    async def _wait_qrexec(self, domain: _Domain, timeout: float) -> None:
        argv = [
            arg.format(name=domain.name, domid=domain.domid) for arg in self.options.qrexec_command
        ]
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as exc:
            raise NotReady("wait_ready", domain.name, f"cannot run {argv[0]}: {exc}") from None
        try:
            async with asyncio.timeout(timeout):
                finished = asyncio.ensure_future(process.communicate())
                died = asyncio.ensure_future(domain.died.wait())
                try:
                    await asyncio.wait({finished, died}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    died.cancel()
                if not finished.done():
                    finished.cancel()
                    raise NotReady("wait_ready", domain.name, "the domain died while booting")
                _, stderr = finished.result()
        except TimeoutError:
            raise NotReady(
                "wait_ready",
                domain.name,
                f"qubes.WaitForRunningSystem did not succeed within {timeout:g} s",
            ) from None
        finally:
            if process.returncode is None:
                process.kill()
                self._in_background(process.wait())
        if process.returncode != 0:
            why = stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise NotReady(
                "wait_ready",
                domain.name,
                f"{argv[0]} exited with status {process.returncode} {why[0]}".rstrip(),
            )

    async def pause(self, name: str) -> None:
        domain = await self._resolve("pause", name)
        async with domain.lock:
            try:
                alive = await self._quick_call(self._pause_sync, domain.domid, domain.uuid)
            except LibxlError as exc:
                raise BackendError("pause", name, exc.describe()) from None
            if not alive:
                self._gone(domain)
                raise NoSuchDomain("pause", name, "the domain is gone")
            domain.paused_by_backend = True

    def _pause_sync(self, domid: int, uuid: bytes) -> bool:
        xl = self._need(self._xl_ctl)
        info = self._info_sync(domid, uuid)
        if info is None:
            return False
        # Xen counts the toolstack's pauses: pausing a paused domain again would make
        # our one unpause leave it paused.
        if not info.paused:
            xl.pause(domid)
        return True

    async def unpause(self, name: str) -> None:
        domain = await self._resolve("unpause", name)
        async with domain.lock:
            try:
                result = await self._quick_call(self._unpause_sync, domain.domid, domain.uuid)
            except LibxlError as exc:
                raise BackendError("unpause", name, exc.describe()) from None
            domain.paused_by_backend = False
        if result is _Unpause.GONE:
            self._gone(domain)
            raise NoSuchDomain("unpause", name, "the domain is gone")
        if result is _Unpause.RUNNING:
            raise NotPaused("unpause", name, "the domain is already running")

    def _unpause_sync(self, domid: int, uuid: bytes) -> _Unpause:
        """Check the paused flag and unpause, as one step in one thread."""
        xl = self._need(self._xl_ctl)
        info = self._info_sync(domid, uuid)
        if info is None:
            return _Unpause.GONE
        if not info.paused:
            return _Unpause.RUNNING
        try:
            xl.unpause(domid)
        except LibxlError:
            # Xen refuses to unpause a domain with no toolstack pause left: someone
            # else unpaused it between our check and our call.
            after = self._info_sync(domid, uuid)
            if after is None:
                return _Unpause.GONE
            if not after.paused:
                return _Unpause.RUNNING
            raise
        return _Unpause.DONE

    async def set_memory_target(self, name: str, mib: int) -> None:
        domain = await self._resolve("set_memory_target", name)
        try:
            alive = await self._quick_call(
                self._set_target_sync, domain.domid, domain.uuid, mib * 1024
            )
        except LibxlError as exc:
            raise BackendError("set_memory_target", name, exc.describe()) from None
        if not alive:
            self._gone(domain)
            raise NoSuchDomain("set_memory_target", name, "the domain is gone")

    def _set_target_sync(self, domid: int, uuid: bytes, kib: int) -> bool:
        info = self._info_sync(domid, uuid)
        if info is None:
            return False
        ceiling = self._maxmem_sync(info)
        self._need(self._xl_ctl).set_memory_target(domid, max(0, min(kib, ceiling)))
        return True

    async def memory(self, name: str) -> MemoryInfo:
        domain = await self._resolve("memory", name)
        try:
            result = await self._quick_call(self._memory_sync, domain.domid, domain.uuid)
        except (LibxlError, XenStoreError) as exc:
            raise BackendError("memory", name, str(exc)) from None
        if result is None:
            self._gone(domain)
            raise NoSuchDomain("memory", name, "the domain is gone")
        return result

    def _memory_sync(self, domid: int, uuid: bytes) -> MemoryInfo | None:
        info = self._info_sync(domid, uuid)
        if info is None:
            return None
        xs = self._need(self._xs)
        maxmem = self._maxmem_sync(info)
        balloon = parse_kib(xs.read(f"/local/domain/{domid}/memory/target"), maxmem)
        target = xen_target_kib(info.max_memkb, balloon, maxmem)
        used = parse_kib(xs.read(self._key_path(domid, self.options.meminfo_key)), maxmem)
        return MemoryInfo(
            actual_mib=info.current_memkb // 1024,
            target_mib=(info.current_memkb if target is None else target) // 1024,
            maxmem_mib=maxmem // 1024,
            used_mib=None if used is None else used // 1024,
        )

    async def destroy(self, name: str) -> None:
        pending = self._creating.get(name)
        if pending is not None:
            # The domain may appear when the build finishes: wait for it, then destroy.
            with contextlib.suppress(Exception):
                await asyncio.shield(pending)
        domain = self._tracked.get(name)
        if domain is not None:
            domid, uuid = domain.domid, domain.uuid
        else:
            found = await self._lookup("destroy", name)
            if found is None:
                return
            if not self._is_ours(found.marker):
                log.warning(
                    "destroy %s: domain %d carries no marker of this daemon; left alone",
                    name,
                    found.info.domid,
                )
                return
            domid, uuid = found.info.domid, found.info.uuid
        # Forgotten first: our own destroy is not a death to report.
        self._forget(name)
        try:
            await asyncio.get_running_loop().run_in_executor(
                self._need(self._destroys), self._destroy_sync, domid, uuid
            )
        except LibxlError as exc:
            if domain is not None:
                self._tracked.setdefault(name, domain)
            raise BackendError("destroy", name, exc.describe()) from None
        log.info("destroyed %s (domid %d)", name, domid)

    def _destroy_sync(self, domid: int, uuid: bytes) -> None:
        if self._info_sync(domid, uuid) is None:
            return
        with self._need(self._xen).busy():
            self._need(self._xl_teardown).destroy(domid)

    async def save(self, name: str, path: Path) -> None:
        domain = await self._resolve("save", name)
        # Forgotten first: the guest's suspend is no death to report.
        self._forget(name)
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._need(self._slow), self._save_sync, domain, path)
        except LibxlError as exc:
            raise BackendError("save", name, exc.describe()) from None
        except OSError as exc:
            raise BackendError("save", name, f"{path}: {exc.strerror or exc}") from None
        log.info("saved %s (domid %d) to %s", name, domain.domid, path)

    def _save_sync(self, domain: _Domain, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            with self._need(self._xen).busy():
                if self._info_sync(domain.domid, domain.uuid) is None:
                    raise LibxlError("save", 0, "the domain is gone")
                self._need(self._xl_build).save(domain.domid, fd)
            os.fsync(fd)
        finally:
            os.close(fd)

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
        try:
            options = XenTemplateOptions.model_validate(template.options)
            spec = domain_spec(name, template, marker, options, provision)
        except ValidationError as exc:
            raise BackendError(
                "restore", name, f"template options: {describe_validation(exc)}"
            ) from None
        except ValueError as exc:
            raise BackendError("restore", name, str(exc)) from None
        # The guest waits for restore/complete (docs/guest.md): written with its new
        # identity, in the transaction that names the domain.
        spec = dataclasses.replace(
            spec,
            memory_kib=memory_mib * 1024,
            xsdata={**spec.xsdata, RESTORE_COMPLETE_KEY: "1"},
        )
        if name in self._creating:
            raise BackendError("restore", name, "a create of that name is in progress")
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._need(self._slow), self._restore_sync, spec, path)
        self._creating[name] = future
        try:
            domid, uuid = await future
        except LibxlError as exc:
            raise BackendError("restore", name, exc.describe()) from None
        except OSError as exc:
            raise BackendError("restore", name, f"{path}: {exc.strerror or exc}") from None
        finally:
            if self._creating.get(name) is future:
                del self._creating[name]
        self._owners.add(marker.owner)
        self._tracked[name] = _Domain(name, domid, uuid, marker)
        log.info("restored %s (domid %d) from %s", name, domid, path)
        return domid

    def _restore_sync(self, spec: DomainSpec, path: Path) -> tuple[int, bytes]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with self._need(self._xen).busy():
                xl = self._need(self._xl_build)
                existing = xl.name_to_domid(spec.name)
                if existing is not None:
                    raise LibxlError(
                        "restore",
                        0,
                        f"a domain named {spec.name} already exists (domid {existing})",
                    )
                domid, uuid = xl.restore(spec, fd)
                try:
                    xl.unpause(domid)
                except LibxlError:
                    xl.destroy(domid)
                    raise
                return domid, uuid
        finally:
            os.close(fd)

    async def domain_info(self, name: str) -> DomainInfo | None:
        domain = self._tracked.get(name)
        if domain is not None:
            try:
                found = await self._quick_call(self._describe_sync, domain)
            except (LibxlError, XenStoreError) as exc:
                raise BackendError("domain_info", name, str(exc)) from None
            if found is not None:
                return self._domain_info(found)
            self._gone(domain)
        found = await self._lookup("domain_info", name)
        return None if found is None else self._domain_info(found)

    def _describe_sync(self, domain: _Domain) -> _Found | None:
        info = self._info_sync(domain.domid, domain.uuid)
        if info is None:
            return None
        return _Found(info, domain.name, domain.marker, self._maxmem_sync(info))

    async def list_owned(self, owner: str) -> list[DomainInfo]:
        self._owners.add(owner)
        try:
            found = await self._quick_call(self._list_marked_sync)
        except (LibxlError, XenStoreError) as exc:
            raise BackendError("list_owned", None, str(exc)) from None
        owned = []
        for item in found:
            if item.marker is None or item.marker.owner != owner:
                continue
            domain = self._tracked.get(item.name)
            if domain is None or (domain.domid, domain.uuid) != (item.info.domid, item.info.uuid):
                domain = _Domain(item.name, item.info.domid, item.info.uuid, item.marker)
                self._tracked[item.name] = domain
            # Found paused at start-up: from now on, an unpause by someone else is news.
            domain.paused_by_backend = item.info.paused
            owned.append(self._domain_info(item))
        # Domains found dead are reported as deaths.
        self._scan_wanted.set()
        return owned

    def _list_marked_sync(self) -> list[_Found]:
        xs = self._need(self._xs)
        found = []
        for info in self._need(self._xl_ctl).list_domains():
            if info.domid == 0:
                continue
            marker = self._marker_sync(info.domid)
            if marker is None:
                continue
            name = xs.read(f"/local/domain/{info.domid}/name")
            if name is None:
                continue
            found.append(_Found(info, name, marker, self._maxmem_sync(info)))
        return found

    async def capabilities(self) -> dict[str, object]:
        """What this Xen could do for dispoold beyond the origins it uses. Domain fork
        (the seed's third alternative) is probed and reported, never used: it needs a
        libxl with the fork API, HVM guests with HAP, and a hypervisor built with memory
        sharing (Debian's Xen 4.17 has neither the API nor memory sharing), and a fork
        shares too much of its parent to be a disposable (docs/design.md)."""
        xl = self._need(self._xl_ctl)
        try:
            caps = await self._quick_call(xl.physinfo)
        except LibxlError as exc:
            return {"fork": {"available": False, "why_not": [f"physinfo: {exc.describe()}"]}}
        why_not = []
        if not xl.have_vm_fork():
            why_not.append("this libxl has no domain-fork API (LIBXL_HAVE_VM_FORK)")
        if not caps["hvm"] or not caps["hap"]:
            why_not.append(
                "forks are HVM guests with HAP; this host offers "
                + ("HVM without HAP" if caps["hvm"] else "no HVM")
            )
        return {"fork": {"available": not why_not, "why_not": why_not}, "caps": caps}

    async def free_memory_mib(self) -> int:
        try:
            kib = await self._quick_call(self._need(self._xl_ctl).free_memory_kib)
        except LibxlError as exc:
            raise BackendError("free_memory", None, exc.describe()) from None
        return kib // 1024

    async def events(self) -> AsyncIterator[DomainEvent]:
        if self._events is None:
            raise BackendError("events", None, "backend not open")
        queue = self._events
        # Deaths that happened before anyone listened are reported first.
        self._scan_wanted.set()
        while (event := await queue.get()) is not None:
            yield event

    # -- identity ---------------------------------------------------------------------

    async def _resolve(self, operation: str, name: str) -> _Domain:
        """The domain of that name that this daemon owns; raises NoSuchDomain."""
        domain = self._tracked.get(name)
        if domain is not None:
            return domain
        found = await self._lookup(operation, name)
        if found is None:
            raise NoSuchDomain(operation, name, "no such domain")
        if found.marker is None or not self._is_ours(found.marker):
            raise NoSuchDomain(
                operation,
                name,
                f"domain {found.info.domid} of that name carries no marker of this daemon; "
                "left alone",
            )
        domain = _Domain(name, found.info.domid, found.info.uuid, found.marker)
        self._tracked[name] = domain
        if found.info.shutdown or found.info.dying:
            self._scan_wanted.set()
        return domain

    async def _lookup(self, operation: str, name: str) -> _Found | None:
        try:
            return await self._quick_call(self._lookup_sync, name)
        except (LibxlError, XenStoreError) as exc:
            raise BackendError(operation, name, str(exc)) from None

    def _lookup_sync(self, name: str) -> _Found | None:
        domid = self._need(self._xl_ctl).name_to_domid(name)
        if domid is None:
            return None
        info = self._need(self._xl_ctl).domain_info(domid)
        if info is None:
            return None
        return _Found(info, name, self._marker_sync(domid), self._maxmem_sync(info))

    def _is_ours(self, marker: Marker | None) -> bool:
        # The owners are those the engine named (create, list_owned): until it has,
        # nothing is ours, whatever marker it carries.
        return marker is not None and marker.owner in self._owners

    def _marker_sync(self, domid: int) -> Marker | None:
        xs = self._need(self._xs)
        base = f"/local/domain/{domid}/{MARKER_DIR}"
        owner = xs.read(f"{base}/owner")
        if owner is None:
            return None
        values = {"owner": owner}
        for key in MARKER_KEYS[1:]:
            values[key] = xs.read(f"{base}/{key}") or ""
        return parse_marker(values)

    def _info_sync(self, domid: int, uuid: bytes) -> DomInfo | None:
        """The domain's state, or None if it is gone (or its domid now names another)."""
        info = self._need(self._xl_ctl).domain_info(domid)
        if info is None or info.uuid != uuid:
            return None
        return info

    def _maxmem_sync(self, info: DomInfo) -> int:
        """The domain's static maximum (KiB), as libxl recorded it at creation."""
        value = self._need(self._xs).read(f"/local/domain/{info.domid}/memory/static-max")
        if value is not None and value.strip().isdigit():
            return int(value)
        return info.max_memkb

    @staticmethod
    def _domain_info(found: _Found) -> DomainInfo:
        info = found.info
        return DomainInfo(
            name=found.name,
            domid=info.domid,
            paused=info.paused,
            shutdown=info.shutdown or info.dying,
            memory_mib=info.current_memkb // 1024,
            maxmem_mib=found.maxmem_kib // 1024,
            marker=found.marker,
        )

    def _forget(self, name: str) -> None:
        self._tracked.pop(name, None)

    def _gone(self, domain: _Domain) -> None:
        """The domain vanished: report it (once) and stop tracking it."""
        if self._tracked.get(domain.name) is domain:
            del self._tracked[domain.name]
            self._died(domain)

    def _died(self, domain: _Domain) -> None:
        if not domain.died.is_set():
            domain.died.set()
            self._emit(DomainEventKind.DIED, domain.name)

    # -- events -----------------------------------------------------------------------

    def _emit(self, kind: DomainEventKind, name: str) -> None:
        log.info("event: %s %s", kind.value, name)
        if self._events is not None:
            self._events.put_nowait(DomainEvent(kind, name))

    async def _monitor(self) -> None:
        interval = self.options.unpause_check_interval
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._scan_wanted.wait()
            except TimeoutError:
                if not any(d.paused_by_backend for d in self._tracked.values()):
                    continue
            self._scan_wanted.clear()
            try:
                await self._scan()
            except (LibxlError, XenStoreError) as exc:
                log.warning("domain scan failed: %s", exc)

    async def _scan(self) -> None:
        """Compare Xen's domains with ours: report deaths and foreign unpauses."""
        infos = await self._quick_call(self._need(self._xl_ctl).list_domains)
        by_domid = {info.domid: info for info in infos}
        for domain in list(self._tracked.values()):
            if self._tracked.get(domain.name) is not domain:
                continue
            info = by_domid.get(domain.domid)
            if info is None or info.uuid != domain.uuid:
                self._gone(domain)
            elif info.shutdown or info.dying:
                self._died(domain)
            elif domain.paused_by_backend and not info.paused:
                await self._confirm_foreign_unpause(domain)

    async def _confirm_foreign_unpause(self, domain: _Domain) -> None:
        # Under the domain's lock, so that our own unpause in progress is not taken
        # for someone else's.
        async with domain.lock:
            if not domain.paused_by_backend:
                return
            info = await self._quick_call(self._info_sync, domain.domid, domain.uuid)
            if info is not None and not info.paused:
                domain.paused_by_backend = False
                self._emit(DomainEventKind.UNPAUSED, domain.name)

    # -- helpers ----------------------------------------------------------------------

    async def _quick_call(self, function: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._need(self._quick), partial(function, *args))

    @staticmethod
    async def _first_of(*events: asyncio.Event) -> None:
        waiters = [asyncio.ensure_future(event.wait()) for event in events]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def _in_background(self, awaitable: Any) -> None:
        """Run a clean-up step without waiting for it (and without losing its errors)."""
        future = asyncio.ensure_future(awaitable)
        self._background.add(future)
        future.add_done_callback(self._background_done)

    def _background_done(self, future: asyncio.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.debug("clean-up step failed: %s", future.exception())

    @staticmethod
    def _key_path(domid: int, key: str) -> str:
        return key if key.startswith("/") else f"/local/domain/{domid}/{key}"

    @staticmethod
    def _need(value: T | None) -> T:
        if value is None:
            raise BackendError("xen", None, "backend not open")
        return value
