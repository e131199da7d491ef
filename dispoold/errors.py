"""The one family of errors the engine raises to its callers.

Every failure a caller of :class:`dispoold.pool.Pool` can see is a :class:`DispooldError`.
The engine wraps what its ports raise (the backend's ``BackendError``, the memory
manager's ``MemoryManagerError``) into these; :mod:`dispoold.protocol` maps exactly this
family to wire codes, in one table. Anything else that escapes is a bug: the server logs
it and answers "internal error".
"""

from __future__ import annotations


class DispooldError(Exception):
    """A request cannot be served; the message says why, in words a person can act on."""


class BadRequest(DispooldError):
    """An argument is out of range or malformed."""


class InvalidTarget(BadRequest):
    """The target is not ``@dispvm``, ``@dispvm:NAME`` or ``@dispvm:@tag:TAG``."""


class NoSuchTemplate(DispooldError):
    """No template of that name (or carrying that tag), or no default one is configured."""


class NotADispvmTemplate(DispooldError):
    """The template exists but is not a disposable template."""


class NotFound(DispooldError):
    """No handed-out disposable of that name."""


class RequestTimeout(DispooldError):
    """No disposable could be handed out within the request's timeout."""


class ShuttingDown(DispooldError):
    """The daemon is stopping and takes no new work."""


class NoMemory(DispooldError):
    """The host cannot spare the memory a new disposable needs."""


class StartFailed(DispooldError):
    """A disposable could not be made: its domain failed to build, boot or hand over."""


class HypervisorError(DispooldError):
    """The hypervisor or the memory manager failed an operation the request needed."""


class DispidsExhausted(DispooldError):
    """Every dispid is in use or was freed too recently to be reused."""
