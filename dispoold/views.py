"""What the engine answers with, as typed values: a hand-out and a snapshot of the pools.

Each shape is declared once, here. The engine builds these; :mod:`dispoold.protocol`
uses the same models as the results of its operations, so the server sends them and the
client checks what it receives against them. They know nothing of frames or sockets.

Read leniently (``extra="ignore"``): a client checking a newer daemon's answer keeps
working when that daemon adds a field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

#: Where a handed-out disposable came from (see :mod:`dispoold.origins`).
HandoutOrigin = Literal["preload", "restore", "fresh"]
#: What a disposable in the books is for: one of those, or preparing a savefile.
OriginName = Literal["preload", "restore", "fresh", "prepare"]


class View(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class Handout(View):
    """The answer to a request: a disposable that is now its caller's."""

    name: str
    domid: int
    dispid: int
    template: str
    origin: HandoutOrigin
    paused: bool
    #: How long the request waited, from its arrival at the engine to the hand-over.
    waited_ms: float


class DisposableView(View):
    name: str
    domid: int | None
    #: As the protocol names stages (:attr:`dispoold.lifecycle.Stage.wire`).
    stage: str
    since: float
    memory_mib: int | None
    origin: OriginName
    #: Something an operator should know (a failed shrink), when there is something.
    note: str | None = None


class VolumeView(View):
    """One disk of the template's disposables."""

    vdev: str
    role: str
    #: The storage pool and its driver; None for a shared read-only image.
    pool: str | None = None
    driver: str | None = None
    #: MiB the template's disposables' copies of this volume use, as last measured.
    used_mib: float | None = None


class SavefileView(View):
    """A template's savefile (:mod:`dispoold.savefile`)."""

    #: ``absent``, ``preparing``, ``ready`` or ``invalid``.
    state: str
    #: The template fingerprint it was made from.
    made_from: str | None = None
    #: Seconds since it was made.
    age: float | None = None
    size_mib: float | None = None
    memory_mib: int | None = None
    vcpus: int | None = None
    prepare_seconds: float | None = None
    #: Why the last preparation or restore failed.
    error: str | None = None


class TemplateView(View):
    name: str
    max: int
    threshold_gap: int
    disposables: list[DisposableView]
    volumes: list[VolumeView] = []
    savefile: SavefileView = SavefileView(state="absent")


class ProcessView(View):
    """The daemon process's own footprint."""

    pid: int
    rss_mib: float
    cpu_seconds: float
    open_fds: int
    threads: int


class PoolView(View):
    """The ``status`` answer: every template's pool, the memory figures, and the
    daemon's own footprint."""

    templates: list[TemplateView]
    #: The memory manager's figures (their keys depend on the manager) and the engine's
    #: ``threshold_mib``.
    memory: dict[str, Any]
    #: Absent from a daemon that does not report it.
    process: ProcessView | None = None
    #: What the hypervisor can do that dispoold might use (Xen's domain fork).
    hypervisor: dict[str, Any] = {}
