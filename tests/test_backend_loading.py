"""Choosing a backend and a memory manager by name (dispoold.loader), out-of-tree ones
included: every axis fails the same way, with a message and no traceback."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from dispoold.backend import BACKENDS, Backend, BackendUnavailable, load_backend
from dispoold.config import MemorySettings
from dispoold.loader import Axis, import_from_string, port_members, resolve
from dispoold.memory import MANAGERS, MemoryManager, MemoryManagerError, create_manager
from tests.doubles import FakeBackend, FakeMemory

#: Plug-in modules written for these tests, each showing one way a name can be wrong.
PLUGINS = {
    "plugin_needs_dependency": "import dispoold_test_no_such_package\n",
    "plugin_fails_on_import": "raise RuntimeError('half configured')\n",
    "plugin_bits": """
        NOT_A_CLASS = 42

        class Incomplete:
            async def open(self) -> None: ...

        class RefusesOptions:
            # Has every member of both ports, but refuses what it is given.
            def __init__(self, *args: object) -> None:
                raise ValueError("port must be a number")

        class OwnError:
            def __init__(self, *args: object) -> None:
                from dispoold.backend import BackendUnavailable
                from dispoold.memory import MemoryManagerError
                raise (BackendUnavailable("load", None, "no hypervisor here")
                       if len(args) == 1 else MemoryManagerError("no qmemman here"))
        """,
}


@pytest.fixture(autouse=True)
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, text in PLUGINS.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    for name in PLUGINS:
        sys.modules.pop(name, None)


def complete(port: type[Any], cls: str) -> None:
    """Give ``plugin_bits.<cls>`` every member of ``port``, so that only its constructor
    is tested."""
    module = __import__("plugin_bits")
    for member in port_members(port):
        setattr(getattr(module, cls), member, lambda *a: None)


def load_as_backend(name: str) -> object:
    return load_backend(name, {})


def load_as_manager(name: str) -> object:
    return create_manager(MemorySettings(manager=name), FakeBackend())


@dataclass(frozen=True)
class Case:
    kind: str
    load: Callable[[str], object]
    error: type[Exception]
    port: type[Any]


AXES = [
    Case("backend", load_as_backend, BackendUnavailable, Backend),
    Case("memory manager", load_as_manager, MemoryManagerError, MemoryManager),
]


@pytest.mark.parametrize("axis", AXES, ids=[a.kind for a in AXES])
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nonsense", r"'nonsense': expected a built-in name or 'package.module:Class'"),
        ("no.such.module:X", r"cannot import no\.such\.module"),
        ("tests.doubles:Nope", r"module tests\.doubles has no 'Nope'"),
        (
            "plugin_needs_dependency:X",
            r"plugin_needs_dependency needs the Python package "
            r"'dispoold_test_no_such_package', which is not installed",
        ),
        (
            "plugin_fails_on_import:X",
            r"importing plugin_fails_on_import failed: RuntimeError: half configured",
        ),
        ("plugin_bits:NOT_A_CLASS", r"'plugin_bits:NOT_A_CLASS' is a int, not a class"),
        ("plugin_bits:Incomplete", r"does not implement the \w+ port \(missing: [a-z_, ]*close, "),
        ("tests.doubles:Call", r"does not implement the \w+ port \(missing: "),
    ],
)
def test_every_axis_says_what_is_wrong_with_a_name(axis: Case, name: str, message: str) -> None:
    with pytest.raises(axis.error, match=message) as raised:
        axis.load(name)
    assert f"{axis.kind} " in str(raised.value)
    # No chained traceback for a person to wade through.
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None or raised.value.__suppress_context__


@pytest.mark.parametrize("axis", AXES, ids=[a.kind for a in AXES])
def test_a_constructor_that_refuses_its_options_is_a_clear_error(axis: Case) -> None:
    complete(axis.port, "RefusesOptions")
    with pytest.raises(axis.error, match=r"'plugin_bits:RefusesOptions': bad options: port must"):
        axis.load("plugin_bits:RefusesOptions")


@pytest.mark.parametrize("axis", AXES, ids=[a.kind for a in AXES])
def test_the_axis_own_errors_pass_through_unchanged(axis: Case) -> None:
    complete(axis.port, "OwnError")
    with pytest.raises(axis.error, match=r"no (hypervisor|qmemman) here") as raised:
        axis.load("plugin_bits:OwnError")
    assert "bad options" not in str(raised.value)


def test_the_memory_double_is_no_backend_and_the_backend_double_no_manager() -> None:
    with pytest.raises(BackendUnavailable, match=r"FakeMemory.*missing: .*create"):
        load_backend("tests.doubles:FakeMemory", {})
    with pytest.raises(MemoryManagerError, match=r"FakeBackend.*missing: .*allocation"):
        create_manager(MemorySettings(manager="tests.doubles:FakeBackend"), FakeBackend())


def test_an_out_of_tree_backend_loads_by_import_path() -> None:
    backend = load_backend("tests.doubles:FakeBackend", {"host_mib": 1000})
    assert isinstance(backend, FakeBackend) and backend.options.host_mib == 1000


def test_bad_backend_options_are_refused() -> None:
    with pytest.raises(BackendUnavailable, match="bad options"):
        load_backend("tests.doubles:FakeBackend", {"host_mb": 1})


def test_an_out_of_tree_memory_manager_loads_by_import_path() -> None:
    backend = FakeBackend()
    manager = create_manager(MemorySettings(manager="tests.doubles:FakeMemory"), backend)
    assert isinstance(manager, FakeMemory) and manager.backend is backend


def test_the_built_in_tables_name_classes_that_implement_their_ports() -> None:
    axes: list[Axis[Any]] = [BACKENDS, MANAGERS]
    for axis in axes:
        for name in axis.builtins:
            if name == "xen":
                continue  # its module loads; its bindings are tests/test_xen_host.py's
            assert resolve(axis, name).__name__ in axis.builtins[name]
    assert import_from_string(BACKENDS.builtins["xen"]).__name__ == "XenBackend"
