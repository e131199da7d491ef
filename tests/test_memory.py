"""What both memory managers share: the factory, the preferred size, the give-up rule."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispoold.config import MemorySettings
from dispoold.memory import (
    Balancer,
    MemoryManagerError,
    Progress,
    QmemmanClient,
    create_manager,
    preferred_mib,
)
from tests.doubles import FakeBackend

QUBES = MemorySettings()  # qmemman's own numbers: 1.3, 200 MiB, 1.1, 3 s, 100 MiB/s


def test_factory_maps_names_to_the_shipped_managers(tmp_path: Path) -> None:
    backend = FakeBackend()
    assert isinstance(create_manager(MemorySettings(manager="qmemman"), backend), QmemmanClient)
    assert isinstance(create_manager(MemorySettings(manager="balancer"), backend), Balancer)
    sock = tmp_path / "qmemman.sock"
    auto = MemorySettings(manager="auto", qmemman_socket=sock)
    assert isinstance(create_manager(auto, backend), Balancer)
    sock.touch()
    assert isinstance(create_manager(auto, backend), QmemmanClient)
    with pytest.raises(MemoryManagerError, match="nosuch"):
        create_manager(MemorySettings(manager="nosuch"), backend)


@pytest.mark.parametrize(
    ("used", "maxmem", "preferred"),
    [
        (1000, 4000, 1300),  # used x 1.3
        (100, 4000, 200),  # the floor
        (3500, 4000, 4000),  # maxmem
        (100, 150, 150),  # maxmem wins over the floor: no target above maxmem
        (0, 4000, 200),
    ],
)
def test_preferred_size_follows_qmemman(used: int, maxmem: int, preferred: int) -> None:
    assert preferred_mib(used, maxmem, QUBES) == preferred


@given(st.integers(0, 1 << 20), st.integers(1, 1 << 20))
def test_preferred_size_is_always_settable(used: int, maxmem: int) -> None:
    preferred = preferred_mib(used, maxmem, QUBES)
    assert 1 <= preferred <= maxmem
    assert preferred >= min(maxmem, used * 1.3, 200) - 1


def feed(progress: Progress, levels: list[float], step: float = 0.1) -> int | None:
    """Feed one level per poll; the index of the poll that gave up, if any."""
    for i, level in enumerate(levels):
        if progress.stalled(i * step, level):
            return i
    return None


def test_no_give_up_before_the_check_period() -> None:
    # Not moving at all, but qmemman waits 3 s before judging.
    assert feed(Progress(QUBES, 0.0), [1000.0] * 30) is None
    assert feed(Progress(QUBES, 0.0), [1000.0] * 31) == 30


def test_give_up_when_the_last_second_moved_too_little() -> None:
    slow = [1000.0 - 9.0 * i for i in range(40)]  # 90 MiB/s < 100
    assert feed(Progress(QUBES, 0.0), slow) == 30
    fast = [4000.0 - 11.0 * i for i in range(100)]  # 110 MiB/s: keeps going
    assert feed(Progress(QUBES, 0.0), fast) is None


def test_only_the_last_second_counts() -> None:
    # Fast for 2.5 s, then stuck: given up one second after it stopped, not before.
    levels = [3000.0 - 400.0 * i for i in range(25)] + [-6600.0] * 20
    gave_up = feed(Progress(QUBES, 0.0), levels)
    assert gave_up is not None
    assert 30 <= gave_up <= 35


def test_zero_rate_still_gives_up_on_no_movement() -> None:
    lazy = QUBES.model_copy(update={"check_mib_s": 0})
    assert feed(Progress(lazy, 0.0), [1000.0] * 40) == 30
    assert feed(Progress(lazy, 0.0), [1000.0 - i for i in range(40)]) is None


def sample_defaults(table: str) -> dict[str, object]:
    """The defaults etc/dispoold.toml shows (commented out) in ``[table]``."""
    sample = (Path(__file__).parent.parent / "etc" / "dispoold.toml").read_text()
    section = sample.split(f"\n[{table}]\n", 1)[1].split("\n[", 1)[0]
    shown = "\n".join(line[1:] for line in section.splitlines() if re.match(r"^#[a-z_]+ = ", line))
    return tomllib.loads(shown)


@pytest.mark.xfail(strict=True, reason="issue 14: the sample showed a threshold of 1024")
def test_the_sample_shows_the_defaults_the_code_has() -> None:
    for name, value in sample_defaults("memory").items():
        default = MemorySettings.model_fields[name].default
        assert value == (str(default) if isinstance(default, Path) else default), name
    # Qubes' preload-dispvm-threshold defaults to 0, and so does dispoold's.
    assert sample_defaults("pool")["threshold_mib"] == 0
