"""dispoold's configuration: one TOML file, validated once, at load time.

Every table forbids unknown keys, so a typo is an error that names the file and the
field instead of a setting that silently does nothing. Values an operator changes at
run time (``set_max``, ``set_threshold``) are not written back here: they live in the
journal as overrides of what this file says (see :mod:`dispoold.journal`).
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from collections.abc import Callable, Mapping
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dispoold import DEFAULT_SOCKET

DEFAULT_CONFIG_PATH = Path("/etc/dispoold/dispoold.toml")

#: A template's name is also a path component and a journal key: keep it to what
#: Qubes allows for qube names.
TemplateName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")]
Mib = Annotated[int, Field(ge=0)]
#: dispids run from 0 to this, less one (``disp0`` to ``disp9999``, as in Qubes).
DISPIDS = 10_000


class ConfigError(Exception):
    """The configuration file cannot be used. The message names the file and the field."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = Path(path)


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonSettings(_Table):
    #: Written on every domain this daemon creates; two daemons with different
    #: instance names never touch each other's domains.
    instance: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,32}$")] = "dispoold"
    socket: Path = DEFAULT_SOCKET
    #: Members of this group may request, release and watch; only root may change limits.
    #: Empty: root only (TOML has no null).
    group: str = "qubes"
    socket_mode: int = Field(0o660, ge=0, le=0o777)
    state_dir: Path = Path("/var/lib/dispoold")
    #: How long SIGTERM waits for in-flight requests before cutting them short.
    drain_timeout: float = Field(10.0, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class BackendSettings(_Table):
    #: ``xen``, or ``package.module:Class`` naming an out-of-tree backend.
    name: str = "xen"
    #: Passed to the backend, which validates them itself.
    options: dict[str, Any] = Field(default_factory=dict)


class MemorySettings(_Table):
    """``[memory]``. Which settings govern under which manager: docs/design.md, "Memory"."""

    #: ``qmemman`` (Qubes), ``balancer`` (plain Xen), ``auto`` (qmemman when its socket
    #: exists), or ``package.module:Class``.
    manager: str = "auto"
    # -- qmemman --
    qmemman_socket: Path = Path("/var/run/qubes/qmemman.sock")
    qmemman_avail_file: Path = Path("/var/run/qubes/qmemman-avail-mem")
    #: qmemman's own settings (vm-min-mem, cache-margin-factor): read, never written, to
    #: know the sizes qmemman sets.
    qmemman_config: Path = Path("/etc/qubes/qmemman.conf")
    qmemman_connect_timeout: float = Field(5.0, gt=0)
    #: A qmemman that has not answered within this long is busy (another client holds
    #: it): an allocation is a shortage for now, a shrink is skipped.
    qmemman_answer_timeout: float = Field(60.0, gt=0)
    #: A request qmemman has still not answered after this long: qmemman is hung.
    qmemman_busy_limit: float = Field(300.0, gt=0)
    #: After a shrink, qmemman is held (no balance may regrow the preload) until the
    #: engine says the pause has returned, at most this long.
    qmemman_hold_timeout: float = Field(5.0, gt=0)
    #: A shrink qmemman answered OK without acting on is tried again this often, after
    #: this long (its watcher may not have recorded the guest's report yet).
    qmemman_retries: int = Field(2, ge=0, le=20)
    qmemman_retry_delay: float = Field(1.0, gt=0)
    #: How often the client checks that paused preloads keep their targets (Qubes
    #: #11121) and whether a qmemman that was down or busy is back.
    qmemman_check_interval: float = Field(2.0, gt=0)
    # -- dispoold's own balancer --
    #: preferred = clamp(used * factor, floor, maxmem)  (qmemman: 1.3 and 200 MiB)
    preferred_factor: float = Field(1.3, ge=1.0)
    preferred_floor_mib: Mib = 200
    #: A domain has converged when actual / target <= this (qmemman: 1.1).
    convergence_ratio: float = Field(1.1, ge=1.0)
    #: After check_period seconds, give up on a shrink when the last check_window seconds
    #: moved less than check_mib_s MiB per second (qmemman: 3 s, 1 s, 100 MiB/s).
    check_period: float = Field(3.0, gt=0)
    check_window: float = Field(1.0, gt=0)
    check_mib_s: Mib = 100
    #: How often a shrinking domain's size is read (qmemman: 0.1 s).
    poll_interval: float = Field(0.1, gt=0)
    #: Memory dom0 and the host keep for themselves; the balancer never hands it out.
    host_reserve_mib: Mib = 0


class PoolSettings(_Table):
    #: The system-wide default disposable template (Qubes: dom0's ``default_dispvm``).
    default_dispvm: TemplateName | None = None
    #: Global ``preload-dispvm-max``: applies to ``default_dispvm`` only, and wins over the
    #: template's own value whenever it is set, even to 0.
    max: Annotated[int, Field(ge=0)] | None = None
    #: Free memory (MiB) that preloading never uses (``preload-dispvm-threshold``).
    threshold_mib: Mib | None = None
    #: Seconds between a hand-out and the refill it triggers (Qubes #10230). Negative: no
    #: refill while the template still has preloads.
    refill_delay: float = 3.0
    #: Preloads starting at once; while several templates want preloads, one template
    #: never holds the last slot (see :class:`dispoold.limits.StartSlots`).
    max_concurrent_starts: int = Field(2, ge=1, le=64)
    #: How long a guest may take to report readiness.
    startup_timeout: float = Field(60.0, gt=0)
    #: Default and ceiling for a request's ``timeout``.
    request_timeout: float = Field(90.0, gt=0)
    max_request_timeout: float = Field(3600.0, gt=0)
    #: How often template files are checked for changes (refresh on change).
    refresh_check_interval: float = Field(5.0, gt=0)
    #: How often a memory gap is retried when nothing else frees memory.
    gap_retry_interval: float = Field(10.0, gt=0)
    #: A template whose preloads keep failing is retried after this back-off, doubling up
    #: to ``failure_backoff_max``, so one broken template cannot keep the host busy.
    failure_backoff: float = Field(5.0, gt=0)
    failure_backoff_max: float = Field(300.0, gt=0)
    #: dispids freed this recently are not handed out again.
    dispid_quarantine_days: float = Field(7.0, ge=0)


#: A storage pool's name, as ``[storage.NAME]`` declares it and volumes refer to it.
PoolName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")]
#: A Xen-style virtual disk name.
Vdev = Annotated[str, Field(pattern=r"^xvd[a-z]{1,2}$")]


class StorageSettings(BaseModel):
    """A storage pool: ``driver`` (``lvm_thin``, ``file`` or ``package.module:Class``) and
    the driver's own settings beside it, which the driver checks when the daemon starts."""

    model_config = ConfigDict(extra="allow", frozen=True)

    driver: str

    def driver_options(self) -> dict[str, Any]:
        """Every key of the table but ``driver``."""
        return dict(self.model_extra or {})


VolumeRole = Literal["root", "private", "volatile", "read-only"]
#: The roles whose volume belongs to one disposable and goes with it.
WRITABLE_ROLES: frozenset[str] = frozenset({"root", "private", "volatile"})


class VolumeSettings(_Table):
    """One disk of the template's disposables.

    - ``root``: a writable snapshot of ``source`` (the template's root volume) in ``pool``;
    - ``private``: a writable snapshot of ``source`` (the disposable template's private
      volume) in ``pool``;
    - ``volatile``: a new, empty volume of ``size_mib`` in ``pool`` (swap and scratch);
    - ``read-only``: the image at ``source`` (a path), shared by every disposable as it is.

    Every writable volume belongs to one disposable: nothing it writes reaches the
    template or another disposable, and it is removed with its disposable.
    """

    role: VolumeRole
    vdev: Vdev
    #: The storage pool (``[storage.NAME]``); default: the template's ``storage``.
    pool: PoolName | None = None
    #: root, private: the template's volume in the pool (lvm_thin: a thin volume's name
    #: in the pool's volume group; file: a path). read-only: the image's path.
    source: str | None = None
    #: volatile: its size.
    size_mib: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="after")
    def _fits_its_role(self) -> VolumeSettings:
        if self.role in ("root", "private") and not self.source:
            raise ValueError(f"a {self.role} volume needs a source (the volume it snapshots)")
        if self.role == "volatile" and self.size_mib is None:
            raise ValueError("a volatile volume needs size_mib")
        if self.role == "read-only" and (not self.source or not self.source.startswith("/")):
            raise ValueError("a read-only volume needs a source: the image's absolute path")
        if self.role == "read-only" and self.pool is not None:
            raise ValueError("a read-only volume is an image shared as it is, in no pool")
        if self.role != "volatile" and self.size_mib is not None:
            raise ValueError(f"size_mib is for volatile volumes, not {self.role}")
        return self


class InterfaceSettings(_Table):
    """A network interface of every disposable of the template, each with an identity of
    its own: a MAC address, and an address in ``subnet``, both derived from the dispid
    (so that no two disposables of this daemon ever share one)."""

    #: The bridge in the backend domain the interface is plugged into. Default:
    #: ``xenbr0``, unless ``backend`` names a driver domain (its own default then).
    bridge: str | None = None
    #: The domain that serves the interface (a driver domain, e.g. ``sys-net``); none:
    #: dom0.
    backend: str | None = None
    #: Addresses are ``subnet``'s network address + ``first_address`` + dispid; the subnet
    #: must hold every dispid (10,000 addresses, a /18 or larger). None: no address.
    subnet: IPv4Network | None = None
    first_address: Annotated[int, Field(ge=1)] = 2
    gateway: IPv4Address | None = None
    dns: tuple[IPv4Address, ...] = ()

    @model_validator(mode="after")
    def _addresses_fit(self) -> InterfaceSettings:
        if self.subnet is None:
            if self.gateway is not None or self.dns:
                raise ValueError("gateway and dns need a subnet")
            return self
        last = self.first_address + DISPIDS - 1
        if last >= self.subnet.num_addresses - 1:
            raise ValueError(
                f"subnet {self.subnet} is too small: addresses are network + {self.first_address}"
                f" + dispid (0-{DISPIDS - 1}), which needs a /18 or larger"
            )
        if self.gateway is not None and self.gateway not in self.subnet:
            raise ValueError(f"gateway {self.gateway} is not in {self.subnet}")
        return self


class SavefileSettings(_Table):
    """Where savefiles are kept, and how long their work may take (``[savefile]``)."""

    #: RAM-backed by default (R3.2 copied its savefile to /dev/shm): a restore reads the
    #: whole image. A savefile takes about the memory its domain was saved with.
    directory: Path = Path("/run/dispoold/savefiles")
    #: How long a request waits for a restore before falling through to a fresh start.
    restore_timeout: float = Field(60.0, gt=0)
    #: How long preparing a savefile (boot, prerun, shrink, save) may take.
    prepare_timeout: float = Field(900.0, gt=0)


class TemplateSavefile(_Table):
    """A template's savefile (``[templates.NAME.savefile]``): disposables restored from a
    saved, booted domain instead of booted (Qubes R3.2's method)."""

    enabled: bool = False
    #: A shell script the guest runs before it is saved, to warm its caches; at most
    #: 3072 bytes. Its content is part of what the savefile is made from.
    prerun: Path | None = None
    #: Make the template's preloads by restoring too (faster than a boot), not only the
    #: disposables requests get when the pool is empty.
    refill: bool = True


class TemplateSettings(_Table):
    """A disposable template: what every disposable made from it looks like."""

    #: Qubes' ``template_for_dispvms``; ``@dispvm:NAME`` needs it.
    dispvm_template: bool = True
    #: The template's own ``preload-dispvm-max``.
    preload_max: Annotated[int, Field(ge=0, le=1000)] = 0
    tags: frozenset[str] = frozenset()
    kernel: Path | None = None
    ramdisk: Path | None = None
    cmdline: str = ""
    #: The storage pool of volumes that name none.
    storage: PoolName | None = None
    volumes: tuple[VolumeSettings, ...] = ()
    interfaces: Annotated[tuple[InterfaceSettings, ...], Field(max_length=16)] = ()
    savefile: TemplateSavefile = TemplateSavefile()
    memory: Annotated[int, Field(ge=16)] = 400
    maxmem: Annotated[int, Field(ge=16)] | None = None
    vcpus: Annotated[int, Field(ge=1, le=128)] = 1
    #: Backend-specific settings, passed through unchanged.
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _no_shared_disks(cls, data: Any) -> Any:
        if isinstance(data, dict) and "disks" in data:
            raise ValueError(
                "disks: describe each disk as a [[volumes]] entry instead: a writable one"
                ' as a snapshot per disposable (role = "root", "private" or "volatile", in'
                ' a [storage] pool), a shared image with role = "read-only". A writable'
                " disk that every disposable of the template shared would be corrupted"
                " (and Xen refuses a second writer)"
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> TemplateSettings:
        if self.maxmem is not None and self.maxmem < self.memory:
            raise ValueError(f"maxmem ({self.maxmem}) is below memory ({self.memory})")
        vdevs = [v.vdev for v in self.volumes]
        if len(set(vdevs)) != len(vdevs):
            raise ValueError(f"volumes: each needs a vdev of its own ({', '.join(vdevs)})")
        for index, volume in enumerate(self.volumes):
            if volume.role in WRITABLE_ROLES and volume.pool is None and self.storage is None:
                raise ValueError(f"volumes.{index}: no pool, and the template has no storage")
        return self

    @property
    def max_memory(self) -> int:
        return self.maxmem if self.maxmem is not None else self.memory

    def pool_of(self, volume: VolumeSettings) -> str | None:
        """The storage pool ``volume`` lives in; None for a read-only image."""
        if volume.role not in WRITABLE_ROLES:
            return None
        return volume.pool or self.storage

    def files(self) -> list[Path]:
        """The files a disposable is built from; a change to any of them outdates preloads.
        (The sources of its volumes are for their storage driver to identify.)"""
        paths = [p for p in (self.kernel, self.ramdisk, self.savefile.prerun) if p is not None]
        paths += [Path(v.source) for v in self.volumes if v.role == "read-only" and v.source]
        return paths

    def file_states(self) -> tuple[str, ...]:
        """The on-disk state of :meth:`files`, cheap to read (a stat each): what a request
        compares against the last fingerprint's to notice a change at once."""
        states = []
        for path in self.files():
            try:
                st = path.stat()
            except OSError:
                states.append(f"{path}:missing")
            else:
                states.append(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}")
        return tuple(states)

    def fingerprint(self, identify: Callable[[str, str], str] | None = None) -> str:
        """Identifies this definition and the on-disk state of its files and volumes.

        Two preloads with the same fingerprint were made from the same thing; a preload
        whose fingerprint differs from the template's current one is outdated.
        ``identify(pool, source)`` names the current state of a volume's source (its
        storage driver knows how); without it, only the definition counts for them.
        Blocking (it reads the disk): call it in a thread.
        """
        digest = hashlib.sha256(self.model_dump_json().encode())
        for state in self.file_states():
            digest.update(state.encode())
        if identify is not None:
            for volume in self.volumes:
                pool = self.pool_of(volume)
                if pool is not None and volume.source:
                    digest.update(
                        f"{pool}:{volume.source}:{identify(pool, volume.source)}".encode()
                    )
        return digest.hexdigest()[:16]


class SourceSettings(_Table):
    """A calling qube, as far as target resolution cares."""

    #: This qube's ``default_dispvm``; empty string: it has none (``@dispvm`` is refused).
    default_dispvm: TemplateName | Literal[""] | None = None


class Config(_Table):
    daemon: DaemonSettings = DaemonSettings()
    backend: BackendSettings = BackendSettings()
    memory: MemorySettings = MemorySettings()
    pool: PoolSettings = PoolSettings()
    savefile: SavefileSettings = SavefileSettings()
    storage: dict[PoolName, StorageSettings] = Field(default_factory=dict)
    templates: dict[TemplateName, TemplateSettings] = Field(default_factory=dict)
    sources: dict[str, SourceSettings] = Field(default_factory=dict)

    @field_validator("templates")
    @classmethod
    def _tags_are_words(cls, value: dict[str, TemplateSettings]) -> dict[str, TemplateSettings]:
        for name, template in value.items():
            for tag in template.tags:
                if not tag or any(c.isspace() or c == ":" for c in tag):
                    raise ValueError(f"template {name!r}: tag {tag!r} must be one word")
        return value

    @model_validator(mode="after")
    def _references_exist(self) -> Config:
        default = self.pool.default_dispvm
        if default is not None and default not in self.templates:
            raise ValueError(f"pool.default_dispvm: no template named {default!r}")
        for source, settings in self.sources.items():
            target = settings.default_dispvm
            if target and target not in self.templates:
                raise ValueError(f"sources.{source}.default_dispvm: no template named {target!r}")
        for name, template in self.templates.items():
            for index, volume in enumerate(template.volumes):
                pool = template.pool_of(volume)
                if pool is not None and pool not in self.storage:
                    where = f"templates.{name}.volumes.{index}"
                    raise ValueError(f"{where}: no storage pool named {pool!r} ([storage.{pool}])")
        return self


def parse(data: Mapping[str, Any], path: Path | str = "<config>") -> Config:
    """Validate a decoded configuration; raises :class:`ConfigError`."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, describe_validation(exc)) from None


def load(path: Path | str | None = None) -> Config:
    """Read and validate the TOML file at ``path`` (default: $DISPOOLD_CONFIG or /etc)."""
    if path is None:
        path = Path(os.environ.get("DISPOOLD_CONFIG", DEFAULT_CONFIG_PATH))
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "no such file") from None
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"not valid TOML: {exc}") from None
    return parse(data, path)


def describe_validation(exc: ValidationError, *, prefix: str = "") -> str:
    """A validation failure in words a person can act on, naming each field:
    ``field: problem; field: problem``. Used for the configuration, the backend's
    options and the wire's arguments alike."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in (prefix, *error["loc"]) if part != "")
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        elif error["type"] == "missing":
            message = "required"
        parts.append(f"{where or '(top level)'}: {message}")
    return "; ".join(parts)
