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
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_CONFIG_PATH = Path("/etc/dispoold/dispoold.toml")

#: A template's name is also a path component and a journal key: keep it to what
#: Qubes allows for qube names.
TemplateName = Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")]
Mib = Annotated[int, Field(ge=0)]


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
    socket: Path = Path("/run/dispoold/dispoold.sock")
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
    #: Disk specifications in xl's disk syntax, e.g. ``format=raw, vdev=xvda, target=/x``.
    disks: tuple[str, ...] = ()
    memory: Annotated[int, Field(ge=16)] = 400
    maxmem: Annotated[int, Field(ge=16)] | None = None
    vcpus: Annotated[int, Field(ge=1, le=128)] = 1
    #: Backend-specific settings, passed through unchanged.
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _maxmem_covers_memory(self) -> TemplateSettings:
        if self.maxmem is not None and self.maxmem < self.memory:
            raise ValueError(f"maxmem ({self.maxmem}) is below memory ({self.memory})")
        return self

    @property
    def max_memory(self) -> int:
        return self.maxmem if self.maxmem is not None else self.memory

    def files(self) -> list[Path]:
        """The files a disposable is built from; a change to any of them outdates preloads."""
        paths = [p for p in (self.kernel, self.ramdisk) if p is not None]
        for disk in self.disks:
            for part in disk.split(","):
                key, _, value = part.strip().partition("=")
                if key.strip() == "target" and value.strip():
                    paths.append(Path(value.strip()))
        return paths

    def fingerprint(self) -> str:
        """Identifies this definition and the on-disk state of its files.

        Two preloads with the same fingerprint were made from the same thing; a preload
        whose fingerprint differs from the template's current one is outdated.
        """
        digest = hashlib.sha256(self.model_dump_json().encode())
        for path in self.files():
            try:
                st = path.stat()
            except OSError:
                digest.update(f"{path}:missing".encode())
            else:
                digest.update(f"{path}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}".encode())
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
        return self


def parse(data: Mapping[str, Any], path: Path | str = "<config>") -> Config:
    """Validate a decoded configuration; raises :class:`ConfigError`."""
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(path, _describe(exc)) from None


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


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"{where}: {error['msg']}")
    return "; ".join(lines)
