"""One loader for every swappable part: backends, memory managers, storage drivers.

Each part is an *axis*: a port (a ``runtime_checkable`` Protocol), a table of the
implementations that ship (configuration name -> ``package.module:Class``), and the
error its users already catch. The configuration names an implementation either by a
key of that table or by an import path, so an out-of-tree one plugs in the same way
(uvicorn's choice: ``HTTP_PROTOCOLS = {"h11": "...:H11Protocol"}``).

Whatever the axis, a name that cannot be used fails the same way, with a message a
person can act on and no traceback: an unknown name, a module that is not there, a
module that needs a Python package that is not installed, a missing attribute, something
that is not a class, a class that does not implement the port (naming what it lacks),
and a constructor that refuses its arguments. Nothing is constructed before the class
has been checked, so a bad name leaves no state behind.

The axes themselves are declared beside their ports (:data:`dispoold.backend.BACKENDS`,
:data:`dispoold.memory.MANAGERS`): this module imports nothing of the project, so any
port module can use it.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")

#: Protocol machinery that every Protocol carries; not part of any port.
_NOT_MEMBERS = frozenset({"__init__", "__class_getitem__", "__init_subclass__"})


@dataclass(frozen=True, slots=True)
class Axis(Generic[T]):
    """A swappable part of the daemon."""

    #: What the part is called in messages ("backend", "memory manager").
    kind: str
    #: The implementations that ship: configuration name -> ``package.module:Class``.
    builtins: Mapping[str, str]
    #: The port: a ``runtime_checkable`` Protocol the loaded class must implement.
    port: type[Any]
    #: Builds the error this axis raises, from a message that names the axis.
    error: Callable[[str], Exception]
    #: Errors of the axis's own family that a constructor may raise; they pass through
    #: unchanged (a Xen backend saying that its bindings are not built, for instance).
    own_errors: tuple[type[Exception], ...] = field(default=())


def import_from_string(path: str) -> Any:
    """Resolve ``package.module:Attribute``.

    Raises :class:`ImportError` whose message names what was asked for and why it failed
    (including a missing dependency of the module, named as such).
    """
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ImportError(f"{path!r}: expected a built-in name or 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and missing != module_name and not module_name.startswith(missing + "."):
            raise ImportError(
                f"{path!r}: {module_name} needs the Python package {missing!r}, which is "
                "not installed"
            ) from None
        raise ImportError(f"{path!r}: cannot import {module_name}: {exc}") from None
    except ImportError as exc:
        raise ImportError(f"{path!r}: cannot import {module_name}: {exc}") from None
    except Exception as exc:  # a plug-in's own import-time failure, whatever it is
        raise ImportError(
            f"{path!r}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ImportError(f"{path!r}: module {module_name} has no {attribute!r}") from None


def port_members(port: type[Any]) -> list[str]:
    """The names a class must have to implement ``port`` (methods and attributes)."""
    names: set[str] = set()
    for klass in port.__mro__:
        if klass is object or klass.__module__ == "typing":
            continue
        names.update(name for name in vars(klass) if not name.startswith("_"))
        names.update(name for name in getattr(klass, "__annotations__", {}) if name[:1] != "_")
    return sorted(names - _NOT_MEMBERS)


def resolve(axis: Axis[T], name: str) -> type[Any]:
    """The class ``name`` stands for on ``axis``, checked against its port.

    Raises ``axis.error(...)`` with a message naming the axis and the name.
    """
    path = axis.builtins.get(name, name)
    try:
        found = import_from_string(path)
    except ImportError as exc:
        raise axis.error(f"{axis.kind} {exc}") from None
    if not inspect.isclass(found):
        raise axis.error(f"{axis.kind} {path!r} is a {type(found).__name__}, not a class")
    missing = [member for member in port_members(axis.port) if not hasattr(found, member)]
    if missing:
        raise axis.error(
            f"{axis.kind} {path!r} does not implement the {axis.port.__name__} port "
            f"(missing: {', '.join(missing)})"
        )
    return found


def load(axis: Axis[T], name: str, *args: Any) -> T:
    """Construct the implementation ``name`` names on ``axis`` with ``args``.

    Raises ``axis.error(...)`` for every way the name can be wrong, and lets the axis's
    own errors from the constructor through.
    """
    cls = resolve(axis, name)
    try:
        instance = cls(*args)
    except axis.own_errors:
        raise
    except (TypeError, ValueError) as exc:
        raise axis.error(f"{axis.kind} {name!r}: bad options: {exc}") from None
    if not isinstance(instance, axis.port):
        raise axis.error(f"{axis.kind} {name!r} does not implement the {axis.port.__name__} port")
    result: T = instance
    return result
