"""Loading the compiled bindings, or saying plainly why they cannot be loaded."""

from __future__ import annotations

import importlib
from typing import Any

from dispoold.backend import BackendUnavailable
from dispoold.xen import build

MODULE = build.MODULE
BUILD_COMMAND = "python -m dispoold.xen.build"


def load() -> tuple[Any, Any]:
    """The ``(ffi, lib)`` pair of :mod:`dispoold.xen._xenlight`.

    Raises :class:`BackendUnavailable` with what to do about it: build the module, install
    the headers first, or rebuild against the Xen libraries this host has.
    """
    try:
        module = importlib.import_module(MODULE)
    except ImportError as exc:
        raise BackendUnavailable("load", None, why_unavailable(exc)) from None
    return module.ffi, module.lib


def why_unavailable(exc: ImportError) -> str:
    if exc.name == MODULE or (exc.name is None and MODULE in str(exc)):
        missing = build.missing_headers()
        if missing:
            return (
                f"Xen bindings not built: {missing[0]} was not found; install the Xen "
                "development headers (Debian/Ubuntu: libxen-dev; Fedora/Qubes dom0: "
                f"xen-devel) and run {BUILD_COMMAND}"
            )
        return f"Xen bindings not built: run {BUILD_COMMAND} (as the user owning dispoold)"
    # Built, but the shared libraries it was linked against are not here (or differ).
    return (
        f"Xen bindings cannot be loaded: {exc}; is this a Xen host? If Xen was "
        f"upgraded, rebuild them with {BUILD_COMMAND}"
    )
