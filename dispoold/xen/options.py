"""The Xen backend's settings: ``[backend.options]`` and each template's ``options``.

Both refuse unknown keys, like the rest of the configuration (:mod:`dispoold.config`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

#: A xenstore path: relative ones are taken under the domain's own area
#: (``/local/domain/<domid>/``), where the guest may write ``data/...``.
XenstoreKey = Annotated[
    str, Field(pattern=r"^/?[A-Za-z0-9_@-]+(/[A-Za-z0-9_@-]+)*$", max_length=256)
]

DEFAULT_QREXEC_COMMAND = (
    "/usr/lib/qubes/qrexec-client",
    "-d",
    "{name}",
    "DEFAULT:QUBESRPC qubes.WaitForRunningSystem dom0",
)


class XenBackendOptions(BaseModel):
    """``[backend.options]`` for ``name = "xen"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: How a guest says its system is up: a xenstore key it writes (plain Xen), or the
    #: qrexec call ``qubes.WaitForRunningSystem`` succeeding (Qubes).
    readiness: Literal["xenstore", "qrexec"] = "xenstore"
    #: Watched until the guest writes a value other than "" or "0".
    ready_key: XenstoreKey = "data/ready"
    #: Where the guest reports the memory it uses, in KiB (Qubes' meminfo-writer:
    #: ``memory/meminfo``).
    meminfo_key: XenstoreKey = "data/meminfo"
    #: Seconds between checks that a preload paused by the backend is still paused
    #: (one libxl_list_domain call for all of them; nothing runs while none is paused).
    unpause_check_interval: Annotated[float, Field(gt=0, le=60)] = 1.0
    #: The readiness call for ``readiness = "qrexec"``; ``{name}`` and ``{domid}`` are
    #: replaced. Exit status 0 means ready.
    qrexec_command: tuple[str, ...] = Field(DEFAULT_QREXEC_COMMAND, min_length=1)
    #: libxl's own messages at this level and above go to stderr (the journal).
    libxl_log_level: Literal["debug", "info", "warning", "error", "none"] = "warning"
    #: ``separate``: a libxl context for the quick operations (pause, unpause, domain
    #: info, memory) and one for destroys, so that neither queues behind a domain build
    #: holding the first context's lock for seconds. ``shared``: one for everything.
    control_context: Literal["shared", "separate"] = "separate"
    #: How libxl learns that its children exited (see dispoold/xen/libxl.py, "SIGCHLD").
    sigchld: Literal["mainloop", "selective_reap"] = "mainloop"
    #: Threads for domain builds, saves and restores (destroys and quick operations
    #: have their own).
    build_threads: Annotated[int, Field(ge=1, le=64)] = 4


class XenTemplateOptions(BaseModel):
    """A template's ``options`` table, read by the Xen backend."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: The guest type. Both boot the template's kernel directly.
    type: Literal["pv", "pvh"] = "pv"
