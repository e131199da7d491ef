"""Errors the pool engine raises to its callers.

Each subsystem keeps its own errors (:mod:`dispoold.backend`, :mod:`dispoold.memory`,
these); :mod:`dispoold.rpc` turns them into wire replies, in one place.
"""

from __future__ import annotations


class PoolError(Exception):
    """A request to the pool engine cannot be served; the message says why."""


class BadRequest(PoolError):
    """An argument is out of range or malformed."""


class InvalidTarget(BadRequest):
    """The target is not ``@dispvm``, ``@dispvm:NAME`` or ``@dispvm:@tag:TAG``."""


class NoSuchTemplate(PoolError):
    """No template of that name (or carrying that tag), or no default one is configured."""


class NotADispvmTemplate(PoolError):
    """The template exists but is not a disposable template."""


class NotFound(PoolError):
    """No handed-out disposable of that name."""


class RequestTimeout(PoolError):
    """No disposable could be handed out within the request's timeout."""


class ShuttingDown(PoolError):
    """The daemon is stopping and takes no new work."""


class DispidsExhausted(PoolError):
    """Every dispid is in use or was freed too recently to be reused."""
