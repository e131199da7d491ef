"""A thin, synchronous, Pythonic layer over libxl.

Every method blocks (some for seconds: a domain build), so the backend calls them from
worker threads, never from the event loop. A ``libxl_ctx`` is thread-safe (libxl.h,
"libxl memory management"), so calls may overlap; libxl takes its context lock itself.

Memory: whatever libxl allocates is disposed here, in ``finally`` blocks
(``libxl_dominfo_dispose``, ``libxl_dominfo_list_free``, ``libxl_domain_config_dispose``,
which also frees the strings, disks and bitmaps we put into the config: hence those come
from ``strdup``/``calloc``, never from cffi's own allocator).

SIGCHLD: libxl forks children during create and destroy (hotplug scripts, device
models, and on every destroy a child that runs ``xc_domain_destroy``), and must learn
when they exit. dispoold also runs children of its own through asyncio (the qrexec
readiness call), whose child watcher waits for each of its children by pid and never
handles SIGCHLD. Of libxl's modes (libxl_event.h, "Subprocess handling"):

- ``libxl_sigchld_owner_libxl`` (the default) reaps *every* child with ``wait()`` while
  libxl has one: it would steal the exit status of asyncio's children.
- ``libxl_sigchld_owner_libxl_always`` reaps every child, always: the same, worse.
- ``libxl_sigchld_owner_libxl_always_selective_reap``: libxl keeps a C SIGCHLD handler
  installed and reaps only its own children by pid. It does not fight asyncio either,
  and stays available as ``sigchld = "selective_reap"``.
- ``libxl_sigchld_owner_mainloop`` (chosen): libxl installs no handler and never touches
  SIGCHLD; the application tells it when children may have exited by calling
  ``libxl_childproc_sigchld_occurred``, which reaps libxl's own children by pid and
  nothing else. :class:`dispoold.xen.connection.XenConnection` does so from a small
  thread, every 10 ms while a create or destroy is in flight and every second
  otherwise: no signal handler runs inside the Python process at all, whoever else
  installs one, and nobody else's children are touched.

What once looked like heap corruption in this process was not ours: while the QEMU
lab's emulated CPU offered XSAVE (which Xen uses to switch vector state between
domains), dom0's processes saw corrupted data: ``xl`` alone read a valid kernel as
corrupt, processes died in memcpy wherever they were. Without XSAVE the same work runs
clean (lab/README.md, Known problems). libxl's contexts are thread-safe; calls on the
two contexts are not serialized against each other.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import Any

INVALID_DOMID = 0xFFFFFFFF

#: xentoollog levels (xentoollog.h)
LOG_LEVELS = {"debug": 1, "info": 5, "warning": 7, "error": 8, "none": 0}


class LibxlError(Exception):
    """A libxl call failed. ``rc`` is libxl's (negative) error code, or 0 when the
    failure was found by this layer; ``detail`` is the last error libxl logged."""

    def __init__(self, function: str, rc: int, detail: str = "") -> None:
        self.function = function
        self.rc = rc
        self.detail = detail
        super().__init__(self.describe())

    def describe(self) -> str:
        text = self.function
        if self.rc:
            text += f" failed: {error_name(self.rc)}"
        if self.detail:
            text += f" ({self.detail})"
        return text


_ERROR_NAMES: dict[int, str] = {}


def error_name(rc: int) -> str:
    return _ERROR_NAMES.get(rc, f"error {rc}")


@dataclass(frozen=True, slots=True)
class DomInfo:
    """What Xen says about a domain (a copy of ``libxl_dominfo``, already disposed)."""

    domid: int
    uuid: bytes
    paused: bool
    #: The guest has shut down or crashed (it lingers until destroyed).
    shutdown: bool
    #: The domain is being torn down.
    dying: bool
    shutdown_reason: int
    current_memkb: int
    max_memkb: int


@dataclass(frozen=True, slots=True)
class NicSpec:
    """A PV network interface (a vif), plugged into ``bridge`` by the backend domain's
    hotplug script (dom0's ``vif-bridge`` when ``backend`` is None)."""

    devid: int
    mac: str
    bridge: str | None = None
    backend: str | None = None


@dataclass(frozen=True, slots=True)
class DomainSpec:
    """A PV (or PVH) domain booted directly from a kernel, as dispoold creates them."""

    name: str
    kernel: str
    ramdisk: str | None
    cmdline: str
    memory_kib: int
    maxmem_kib: int
    vcpus: int
    #: Disk specifications in xl's syntax, parsed by libxlutil's ``xlu_disk_parse``.
    disks: tuple[str, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    #: Written under ``/local/domain/<domid>/`` in the same xenstore transaction that
    #: names the domain (``libxl_domain_create_info.xsdata``).
    xsdata: dict[str, str] = field(default_factory=dict)
    pvh: bool = False


class Libxl:
    """One libxl context. Create it with :meth:`open`; :meth:`close` frees it."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        self._ffi = ffi
        self._lib = lib
        self._ctx: Any = None
        self._logger: Any = None
        self.mainloop = True
        if not _ERROR_NAMES:
            for rc in range(-1, -64, -1):
                text = lib.libxl_error_to_string(rc)
                if text != ffi.NULL:
                    _ERROR_NAMES[rc] = "ERROR_" + ffi.string(text).decode().upper()

    # -- context --------------------------------------------------------------------

    def open(self, stderr_level: str = "warning", *, mainloop: bool = True) -> None:
        """Allocate the context. Raises :class:`LibxlError` (not in dom0, no toolstack)
        or :class:`RuntimeError` (a SIGCHLD handler that libxl cannot live with)."""
        handler = signal.getsignal(signal.SIGCHLD)
        if not mainloop and handler not in (signal.SIG_DFL, signal.SIG_IGN, None):
            raise RuntimeError(
                "a Python SIGCHLD handler is installed; libxl needs to own SIGCHLD "
                "(selective reaping): use asyncio's default child watcher instead"
            )
        ffi, lib = self._ffi, self._lib
        logger = lib.dispoold_logger_new(LOG_LEVELS.get(stderr_level, 7))
        if logger == ffi.NULL:
            raise LibxlError("dispoold_logger_new", 0, "out of memory")
        pctx = ffi.new("libxl_ctx **")
        lib.dispoold_clear_error()
        rc = lib.libxl_ctx_alloc(pctx, lib.LIBXL_VERSION, 0, logger)
        if rc:
            detail = self._last_error()
            lib.libxl_ctx_free(pctx[0])
            lib.dispoold_logger_free(logger)
            raise LibxlError("libxl_ctx_alloc", rc, detail)
        self._ctx = pctx[0]
        self._logger = logger
        lib.dispoold_childproc_setmode(self._ctx, 1 if mainloop else 0)
        self.mainloop = mainloop

    def sigchld_occurred(self) -> None:
        """Let libxl reap whichever of its children have exited (mainloop mode)."""
        if self._ctx is not None and self.mainloop:
            self._lib.libxl_childproc_sigchld_occurred(self._ctx)

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.libxl_ctx_free(self._ctx)
            self._ctx = None
        if self._logger is not None:
            self._lib.dispoold_logger_free(self._logger)
            self._logger = None

    @property
    def is_open(self) -> bool:
        return self._ctx is not None

    # -- queries --------------------------------------------------------------------

    def domain_info(self, domid: int) -> DomInfo | None:
        """The domain's state, or None when it does not exist."""
        ffi, lib = self._ffi, self._lib
        info = ffi.new("libxl_dominfo *")
        lib.libxl_dominfo_init(info)
        try:
            rc = self._call("libxl_domain_info", lib.libxl_domain_info, self._ctx, info, domid)
            if rc in (lib.ERROR_DOMAIN_NOTFOUND, lib.ERROR_INVAL):
                return None
            self._check("libxl_domain_info", rc)
            return self._copy(info)
        finally:
            lib.libxl_dominfo_dispose(info)

    def list_domains(self) -> list[DomInfo]:
        """Every domain, in one hypercall-sized call."""
        ffi, lib = self._ffi, self._lib
        count = ffi.new("int *")
        lib.dispoold_clear_error()
        infos = lib.libxl_list_domain(self._ctx, count)
        if infos == ffi.NULL:
            raise LibxlError("libxl_list_domain", lib.ERROR_FAIL, self._last_error())
        try:
            return [self._copy(infos[i]) for i in range(count[0])]
        finally:
            lib.libxl_dominfo_list_free(infos, count[0])

    def name_to_domid(self, name: str) -> int | None:
        domid = self._ffi.new("uint32_t *")
        rc = self._lib.libxl_name_to_domid(self._ctx, name.encode(), domid)
        return None if rc else int(domid[0])

    def free_memory_kib(self) -> int:
        memkb = self._ffi.new("uint64_t *")
        rc = self._call("libxl_get_free_memory", self._lib.libxl_get_free_memory, self._ctx, memkb)
        self._check("libxl_get_free_memory", rc)
        return int(memkb[0])

    def physinfo(self) -> dict[str, bool]:
        """What the hardware and hypervisor offer: HVM, PV, HAP."""
        ffi, lib = self._ffi, self._lib
        info = ffi.new("libxl_physinfo *")
        lib.libxl_physinfo_init(info)
        try:
            rc = self._call("libxl_get_physinfo", lib.libxl_get_physinfo, self._ctx, info)
            self._check("libxl_get_physinfo", rc)
            return {"hvm": bool(info.cap_hvm), "pv": bool(info.cap_pv), "hap": bool(info.cap_hap)}
        finally:
            lib.libxl_physinfo_dispose(info)

    def have_vm_fork(self) -> bool:
        return bool(self._lib.dispoold_have_vm_fork())

    # -- operations -----------------------------------------------------------------

    def pause(self, domid: int) -> None:
        lib = self._lib
        rc = self._call(
            "libxl_domain_pause", lib.libxl_domain_pause, self._ctx, domid, self._ffi.NULL
        )
        self._check("libxl_domain_pause", rc)

    def unpause(self, domid: int) -> None:
        lib = self._lib
        rc = self._call(
            "libxl_domain_unpause", lib.libxl_domain_unpause, self._ctx, domid, self._ffi.NULL
        )
        self._check("libxl_domain_unpause", rc)

    def destroy(self, domid: int) -> bool:
        """Destroy the domain; False if it did not exist."""
        lib = self._lib
        rc = self._call(
            "libxl_domain_destroy", lib.libxl_domain_destroy, self._ctx, domid, self._ffi.NULL
        )
        if rc in (lib.ERROR_DOMAIN_NOTFOUND, lib.ERROR_NOTFOUND):
            return False
        if rc and self.domain_info(domid) is None:
            return False
        self._check("libxl_domain_destroy", rc)
        return True

    def set_memory_target(self, domid: int, kib: int) -> None:
        """The balloon target, enforced (Xen's maxmem follows it, as ``xl mem-set`` does)."""
        lib = self._lib
        rc = self._call(
            "libxl_set_memory_target", lib.libxl_set_memory_target, self._ctx, domid, kib, 0, 1
        )
        self._check("libxl_set_memory_target", rc)

    def create(self, spec: DomainSpec) -> tuple[int, bytes]:
        """Build the domain and leave it paused (libxl creates domains paused; xl
        unpauses them afterwards unless asked not to). Returns ``(domid, uuid)``.

        On failure the half-built domain is destroyed (libxl does it for most failures;
        this makes sure) before :class:`LibxlError` is raised.
        """
        ffi, lib = self._ffi, self._lib
        config = ffi.new("libxl_domain_config *")
        lib.libxl_domain_config_init(config)
        domid = ffi.new("uint32_t *", INVALID_DOMID)
        try:
            self._fill(config, spec)
            rc = self._call(
                "libxl_domain_create_new",
                lib.libxl_domain_create_new,
                self._ctx,
                config,
                domid,
                ffi.NULL,
                ffi.NULL,
            )
            if rc:
                error = LibxlError("libxl_domain_create_new", rc, self._last_error())
                if int(domid[0]) not in (INVALID_DOMID, 0):
                    self._destroy_quietly(int(domid[0]))
                raise error
            uuid = bytes(
                ffi.buffer(lib.libxl_uuid_bytearray(ffi.addressof(config.c_info.uuid)), 16)
            )
            return int(domid[0]), uuid
        finally:
            lib.libxl_domain_config_dispose(config)

    def save(self, domid: int, fd: int) -> None:
        """Suspend the domain and write its state to ``fd`` (a libxl migration stream,
        version 2). The domain is left suspended (shut down, reason suspend): the
        caller destroys it."""
        lib = self._lib
        rc = self._call(
            "libxl_domain_suspend",
            lib.libxl_domain_suspend,
            self._ctx,
            domid,
            fd,
            0,
            self._ffi.NULL,
        )
        self._check("libxl_domain_suspend", rc)

    def restore(self, spec: DomainSpec, fd: int) -> tuple[int, bytes]:
        """Build a new domain from ``spec`` with the state read from ``fd`` (what
        :meth:`save` wrote), and leave it paused. Returns ``(domid, uuid)``; a half-built
        domain is destroyed before :class:`LibxlError` is raised."""
        ffi, lib = self._ffi, self._lib
        config = ffi.new("libxl_domain_config *")
        params = ffi.new("libxl_domain_restore_params *")
        lib.libxl_domain_config_init(config)
        lib.libxl_domain_restore_params_init(params)
        params.stream_version = 2  # what libxl_domain_suspend writes
        domid = ffi.new("uint32_t *", INVALID_DOMID)
        try:
            self._fill(config, spec)
            rc = self._call(
                "libxl_domain_create_restore",
                lib.libxl_domain_create_restore,
                self._ctx,
                config,
                domid,
                fd,
                -1,
                params,
                ffi.NULL,
                ffi.NULL,
            )
            if rc:
                error = LibxlError("libxl_domain_create_restore", rc, self._last_error())
                if int(domid[0]) not in (INVALID_DOMID, 0):
                    self._destroy_quietly(int(domid[0]))
                raise error
            uuid = bytes(
                ffi.buffer(lib.libxl_uuid_bytearray(ffi.addressof(config.c_info.uuid)), 16)
            )
            return int(domid[0]), uuid
        finally:
            lib.libxl_domain_restore_params_dispose(params)
            lib.libxl_domain_config_dispose(config)

    def rename(self, domid: int, old_name: str, new_name: str) -> None:
        """Rename the domain, checking in the same transaction that it is ``old_name``."""
        rc = self._call(
            "libxl_domain_rename",
            self._lib.libxl_domain_rename,
            self._ctx,
            domid,
            old_name.encode(),
            new_name.encode(),
        )
        self._check("libxl_domain_rename", rc)

    def check_disk(self, spec: str) -> None:
        """Parse one xl disk specification; raises ValueError saying what is wrong."""
        ffi, lib = self._ffi, self._lib
        disk = ffi.new("libxl_device_disk *")
        lib.libxl_device_disk_init(disk)
        try:
            self._parse_disk(spec, disk)
        finally:
            lib.libxl_device_disk_dispose(disk)

    # -- helpers ----------------------------------------------------------------------

    def _fill(self, config: Any, spec: DomainSpec) -> None:
        ffi, lib = self._ffi, self._lib
        kind = lib.LIBXL_DOMAIN_TYPE_PVH if spec.pvh else lib.LIBXL_DOMAIN_TYPE_PV
        c_info, b_info = config.c_info, config.b_info
        c_info.type = kind
        c_info.name = self._strdup(spec.name)
        lib.libxl_uuid_generate(ffi.addressof(c_info.uuid))
        if spec.xsdata:
            # A NULL-terminated key, value, key, value... array, freed by dispose.
            items = [s for pair in spec.xsdata.items() for s in pair]
            kvl = ffi.cast("char **", self._calloc(len(items) + 1, ffi.sizeof("char *")))
            c_info.xsdata = kvl
            for i, text in enumerate(items):
                kvl[i] = self._strdup(text)
        lib.libxl_domain_build_info_init_type(ffi.addressof(b_info), kind)
        b_info.max_vcpus = spec.vcpus
        rc = lib.libxl_bitmap_alloc(self._ctx, ffi.addressof(b_info.avail_vcpus), spec.vcpus)
        self._check("libxl_bitmap_alloc", rc)
        for cpu in range(spec.vcpus):
            lib.libxl_bitmap_set(ffi.addressof(b_info.avail_vcpus), cpu)
        b_info.max_memkb = spec.maxmem_kib
        b_info.target_memkb = spec.memory_kib
        b_info.kernel = self._strdup(spec.kernel)
        if spec.ramdisk:
            b_info.ramdisk = self._strdup(spec.ramdisk)
        if spec.cmdline:
            b_info.cmdline = self._strdup(spec.cmdline)
        if spec.disks:
            size = ffi.sizeof("libxl_device_disk")
            disks = ffi.cast("libxl_device_disk *", self._calloc(len(spec.disks), size))
            config.disks = disks
            for i, text in enumerate(spec.disks):
                lib.libxl_device_disk_init(ffi.addressof(disks[i]))
                # Counted as soon as initialised, so that dispose frees it even if a
                # later one fails to parse.
                config.num_disks = i + 1
                self._parse_disk(text, ffi.addressof(disks[i]))
        if spec.nics:
            size = ffi.sizeof("libxl_device_nic")
            nics = ffi.cast("libxl_device_nic *", self._calloc(len(spec.nics), size))
            config.nics = nics
            for i, nic in enumerate(spec.nics):
                lib.libxl_device_nic_init(ffi.addressof(nics[i]))
                config.num_nics = i + 1
                nics[i].devid = nic.devid
                octets = bytes.fromhex(nic.mac.replace(":", ""))
                if len(octets) != 6:
                    raise ValueError(f"vif {nic.devid}: {nic.mac!r} is not a MAC address")
                for k, octet in enumerate(octets):
                    nics[i].mac[k] = octet
                if nic.bridge:
                    nics[i].bridge = self._strdup(nic.bridge)
                if nic.backend:
                    nics[i].backend_domname = self._strdup(nic.backend)

    def _parse_disk(self, spec: str, disk: Any) -> None:
        ffi = self._ffi
        report = ffi.new("char[]", 1024)
        rc = self._lib.dispoold_disk_parse(spec.encode(), disk, report, len(report))
        if rc:
            why = ffi.string(report).decode(errors="replace").strip().splitlines()
            raise ValueError(f"disk {spec!r}: {why[-1] if why else os.strerror(rc)}")

    def _strdup(self, text: str) -> Any:
        if "\0" in text:
            raise ValueError(f"NUL character in {text!r}")
        pointer = self._lib.strdup(text.encode())
        if pointer == self._ffi.NULL:
            raise MemoryError
        return pointer

    def _calloc(self, count: int, size: int) -> Any:
        pointer = self._lib.calloc(count, size)
        if pointer == self._ffi.NULL:
            raise MemoryError
        return pointer

    def _destroy_quietly(self, domid: int) -> None:
        lib = self._lib
        lib.libxl_domain_destroy(self._ctx, domid, self._ffi.NULL)

    def _copy(self, info: Any) -> DomInfo:
        ffi, lib = self._ffi, self._lib
        uuid = bytes(ffi.buffer(lib.libxl_uuid_bytearray(ffi.addressof(info.uuid)), 16))
        return DomInfo(
            domid=int(info.domid),
            uuid=uuid,
            paused=bool(info.paused),
            shutdown=bool(info.shutdown),
            dying=bool(info.dying),
            shutdown_reason=int(info.shutdown_reason),
            current_memkb=int(info.current_memkb),
            max_memkb=int(info.max_memkb),
        )

    def _call(self, name: str, function: Any, *args: Any) -> int:
        if self._ctx is None:
            raise LibxlError(name, 0, "the libxl context is closed")
        self._lib.dispoold_clear_error()
        return int(function(*args))

    def _check(self, name: str, rc: int) -> None:
        if rc:
            raise LibxlError(name, rc, self._last_error())

    def _last_error(self) -> str:
        lib = self._lib
        text: str = self._ffi.string(lib.dispoold_last_error()).decode(errors="replace")
        errnoval = lib.dispoold_last_errno()
        if text and errnoval > 0:
            text += f": {os.strerror(errnoval)}"
        return text
