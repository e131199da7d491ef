"""Choosing a backend and a memory manager by name, including out-of-tree ones."""

from __future__ import annotations

import pytest

from dispoold.backend import BackendUnavailable, load_backend
from dispoold.config import MemorySettings
from dispoold.memory import MemoryManagerError, create_manager
from tests.doubles import FakeBackend, FakeMemory


def test_an_out_of_tree_backend_loads_by_import_path() -> None:
    backend = load_backend("tests.doubles:FakeBackend", {"host_mib": 1000})
    assert isinstance(backend, FakeBackend) and backend.options.host_mib == 1000


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("nonsense", "expected a built-in name or 'package.module:Class'"),
        ("no.such.module:X", "cannot import no.such.module"),
        ("tests.doubles:Nope", "has no 'Nope'"),
        ("tests.doubles:Call", "bad options"),
        ("tests.doubles:FakeMemory", "bad options"),
    ],
)
def test_a_bad_backend_name_says_what_is_wrong(name: str, message: str) -> None:
    with pytest.raises(BackendUnavailable, match=message):
        load_backend(name, {})


def test_bad_backend_options_are_refused() -> None:
    with pytest.raises(BackendUnavailable, match="bad options"):
        load_backend("tests.doubles:FakeBackend", {"host_mb": 1})


def test_an_out_of_tree_memory_manager_loads_by_import_path() -> None:
    backend = FakeBackend()
    manager = create_manager(MemorySettings(manager="tests.doubles:FakeMemory"), backend)
    assert isinstance(manager, FakeMemory) and manager.backend is backend
    with pytest.raises(MemoryManagerError, match="cannot import"):
        create_manager(MemorySettings(manager="nope.nope:X"), backend)
