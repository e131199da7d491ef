"""What both memory managers share: the factory, the preferred size, the give-up rule."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispoold.config import MemorySettings, TemplateSettings
from dispoold.memory import (
    Balancer,
    MemoryManagerError,
    Progress,
    QmemmanClient,
    create_manager,
    preferred_mib,
)
from dispoold.memory.rules import (
    MIB,
    QmemmanRules,
    parse_qubes_size,
    start_overhead_mib,
    start_request_bytes,
)
from dispoold.xen.backend import xen_target_kib
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


def test_the_sample_shows_the_defaults_the_code_has() -> None:
    for name, value in sample_defaults("memory").items():
        default = MemorySettings.model_fields[name].default
        assert value == (str(default) if isinstance(default, Path) else default), name
    # Qubes' preload-dispvm-threshold defaults to 0, and so does dispoold's.
    assert sample_defaults("pool")["threshold_mib"] == 0


@pytest.mark.parametrize(
    ("max_memkb", "balloon_kib", "target_kib"),
    [
        (401 * 1024, 400 * 1024, 400 * 1024),  # libxl: maxmem = target + 1 MiB, balloon = target
        (326 * 1024, 309 * 1024, 325 * 1024),  # qmemman: balloon 16 MiB below its target
        (4001 * 1024, 400 * 1024, 400 * 1024),  # maxmem changed alone: the balloon's is all
        (401 * 1024, None, None),
    ],
)
def test_the_xen_target_is_the_one_the_toolstack_set(
    max_memkb: int, balloon_kib: int | None, target_kib: int | None
) -> None:
    assert xen_target_kib(max_memkb, balloon_kib, 8000 * 1024) == target_kib


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("200M", 200_000_000),  # decimal, as qubes.utils.parse_size: 190.7 MiB
        ("200MiB", 200 * MIB),
        ("200Mi", 200 * MIB),
        ("1G", 10**9),
        ("512K", 512_000),
        ("209715200", 200 * MIB),
    ],
)
def test_qmemman_sizes_are_read_as_qubes_reads_them(text: str, size: int) -> None:
    assert parse_qubes_size(text) == size
    with pytest.raises(ValueError, match="not a size"):
        parse_qubes_size(text + "x")


def test_qmemman_rules_come_from_its_file(tmp_path: Path) -> None:
    missing = QmemmanRules.read(tmp_path / "nope.conf")
    assert (missing.min_prefmem, missing.cache_factor) == (200 * MIB, 1.3)
    conf = tmp_path / "qmemman.conf"
    conf.write_text("[global]\nvm-min-mem = 200M\ncache-margin-factor = 1.5\n")
    rules = QmemmanRules.read(conf)
    assert rules.preferred_mib(100, 4000) == 190  # the floor: 190.7 MiB
    assert rules.preferred_mib(1000, 4000) == 1500
    assert rules.preferred_mib(100, 150) == 190  # qmemman lets the floor win over maxmem
    assert "190.7 MiB" in rules.describe() and str(conf) in rules.describe()
    conf.write_text("[global]\nvm-min-mem = lots\n")
    with pytest.raises(ValueError, match=r"qmemman.conf: vm-min-mem: 'lots' is not a size"):
        QmemmanRules.read(conf)


@pytest.mark.parametrize(
    ("template", "request_bytes"),
    [
        (None, 400 * MIB + 4 * MIB + 3 * MIB // 2),
        (TemplateSettings(memory=400, vcpus=4), 400 * MIB + 4 * MIB + 4 * 3 * MIB // 2),
        (
            TemplateSettings(memory=400, maxmem=4000, vcpus=2, options={"type": "pvh"}),
            400 * MIB + 4 * MIB + 2 * 3 * MIB // 2 + 4000 * 8 * 1024,
        ),
    ],
)
def test_a_start_asks_for_what_qubesd_asks_for(
    template: TemplateSettings | None, request_bytes: int
) -> None:
    assert start_request_bytes(400, template) == request_bytes
    assert start_overhead_mib(400, template) * MIB >= request_bytes - 400 * MIB
