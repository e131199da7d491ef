"""The rules dispoold shares with qmemman and qubesd: how much memory a start asks
for, the preferred size of a domain, and when to give up on memory that should keep
moving (see docs/design.md, "Memory").

Two sets of preferred-size settings exist. Under dispoold's own balancer, dispoold's
``[memory] preferred_factor`` and ``preferred_floor_mib`` govern (:func:`preferred_mib`).
Under qmemman, qmemman's own ``qmemman.conf`` does (``vm-min-mem``,
``cache-margin-factor``: :class:`QmemmanRules`), and dispoold reads it only to know what
qmemman will do.
"""

from __future__ import annotations

import collections
import configparser
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from dispoold.config import MemorySettings, TemplateSettings

MIB: Final = 1024 * 1024
KIB: Final = 1024
#: What Xen needs per domain on top of the guest's memory, as qubesd asks qmemman for it
#: (Qubes core-admin, qubes/vm/qubesvm.py, request_memory: OpenStack's measured overhead
#: plus 1 MiB for rounding): 4 MiB, plus 1.5 MiB per vCPU...
MEM_OVERHEAD_BASE: Final = 4 * MIB
MEM_OVERHEAD_PER_VCPU: Final = 3 * MIB // 2
#: ...plus, for a guest that is not PV (PVH, HVM), the shadow memory libxl sizes from its
#: maxmem: 8 KiB per MiB (libxl_get_required_shadow_memory).
SHADOW_PER_MAXMEM_MIB: Final = 8 * KIB
#: The overhead of a one-vCPU PV guest, rounded up to whole MiB (what dispoold's own
#: balancer adds when it is not told the domain's shape).
DOMAIN_OVERHEAD_MIB: Final = 6


def start_request_bytes(memory_mib: int, template: TemplateSettings | None = None) -> int:
    """What a start of a ``memory_mib`` MiB guest asks the memory balancer for, in
    bytes, as qubesd sizes it. ``template`` gives the vCPUs, the guest type (the Xen
    backend's template option ``type``: ``pv`` unless it says otherwise) and maxmem;
    without it, one vCPU and PV."""
    vcpus = 1 if template is None else template.vcpus
    needed = memory_mib * MIB + MEM_OVERHEAD_BASE + vcpus * MEM_OVERHEAD_PER_VCPU
    if template is not None and template.options.get("type", "pv") != "pv":
        needed += template.max_memory * SHADOW_PER_MAXMEM_MIB
    return needed


def start_overhead_mib(memory_mib: int, template: TemplateSettings | None = None) -> int:
    """The overhead of :func:`start_request_bytes`, rounded up to whole MiB."""
    return math.ceil(start_request_bytes(memory_mib, template) / MIB) - memory_mib


def preferred_mib(used_mib: int, maxmem_mib: int, settings: MemorySettings) -> int:
    """qmemman's preferred size: ``used x factor``, at least the floor, at most maxmem.

    (qmemman lets the floor win over maxmem; a target above maxmem cannot be set, so
    here maxmem wins.)"""
    wanted = max(math.ceil(used_mib * settings.preferred_factor), settings.preferred_floor_mib)
    return max(1, min(wanted, maxmem_mib))


class Progress:
    """qmemman's give-up rule for something that should keep going down (a domain's
    actual size while it shrinks, the shortfall of free memory while domains give some
    back): after ``check_period`` seconds, give up when the last ``check_window`` seconds
    moved less than ``check_mib_s`` MiB per second."""

    def __init__(self, settings: MemorySettings, started: float) -> None:
        self._check_period = settings.check_period
        self._min_rate = settings.check_mib_s
        self._window = settings.check_window
        self._started = started
        self._samples: collections.deque[tuple[float, float]] = collections.deque()

    def stalled(self, now: float, level: float) -> bool:
        """Record ``level`` (MiB, lower is better) at ``now``; True when it is time to
        give up."""
        self._samples.append((now, level))
        # Keep the newest sample that is at least a window old: it is the baseline.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self._window:
            self._samples.popleft()
        if now - self._started < self._check_period:
            return False
        then, baseline = self._samples[0]
        if now - then < self._window * 0.999:
            return False  # not a whole window of history yet
        moved = baseline - level
        return moved <= 0 or moved < self._min_rate * self._window


def parse_qubes_size(text: str) -> int:
    """A size in qmemman.conf, read as Qubes' ``qubes.utils.parse_size`` reads it:
    digits are bytes; K, M, G (KB, MB, GB) are powers of 1000, so ``200M`` is
    200,000,000 bytes (190.7 MiB); Ki, Mi, Gi (KiB, MiB, GiB) are powers of 1024.
    Raises ValueError."""
    units = [
        ("KIB", 1024),
        ("MIB", 1024**2),
        ("GIB", 1024**3),
        ("KI", 1024),
        ("MI", 1024**2),
        ("GI", 1024**3),
        ("KB", 1000),
        ("MB", 1000**2),
        ("GB", 1000**3),
        ("K", 1000),
        ("M", 1000**2),
        ("G", 1000**3),
    ]
    size = text.strip().upper()
    if size.isdigit():
        return int(size)
    for unit, multiplier in units:
        number = size.removesuffix(unit).strip()
        if number != size and number.isdigit():
            return int(number) * multiplier
    raise ValueError(f"{text!r} is not a size")


@dataclass(frozen=True, slots=True)
class QmemmanRules:
    """qmemman's preferred-size settings: what it sets a domain to on ``<domid>:0``."""

    #: vm-min-mem, bytes. qmemman's default when its file does not say (200 MiB).
    min_prefmem: int = 200 * MIB
    #: cache-margin-factor.
    cache_factor: float = 1.3
    #: Where they were read from (None: qmemman's built-in defaults).
    source: Path | None = None

    @classmethod
    def read(cls, path: Path) -> QmemmanRules:
        """The settings in ``path`` (``[global]``); qmemman's defaults if the file does
        not exist. Raises ValueError (naming the file and the key) when it is not what
        qmemman would accept."""
        parser = configparser.ConfigParser()
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
        try:
            parser.read_string(text, source=str(path))
        except configparser.Error as exc:
            raise ValueError(f"{path}: {exc}") from None
        if not parser.has_section("global"):
            return cls(source=path)
        section = parser["global"]
        try:
            min_prefmem = parse_qubes_size(section.get("vm-min-mem", str(200 * MIB)))
        except ValueError as exc:
            raise ValueError(f"{path}: vm-min-mem: {exc}") from None
        try:
            factor = float(section.get("cache-margin-factor", "1.3"))
        except ValueError:
            raise ValueError(f"{path}: cache-margin-factor is not a number") from None
        return cls(min_prefmem=min_prefmem, cache_factor=factor, source=path)

    def preferred_mib(self, used_mib: int, maxmem_mib: int) -> int:
        """qmemman's pref_mem for a guest: max(min(used x factor, maxmem), vm-min-mem)
        (the floor wins over maxmem), in whole MiB."""
        used = used_mib * MIB * self.cache_factor
        return int(max(min(used, maxmem_mib * MIB), self.min_prefmem)) // MIB

    def describe(self) -> str:
        where = f"from {self.source}" if self.source else "qmemman's defaults"
        return (
            f"vm-min-mem {self.min_prefmem / MIB:.1f} MiB, cache-margin-factor "
            f"{self.cache_factor:g} ({where})"
        )
