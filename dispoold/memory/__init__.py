"""Memory negotiation: how much the host can spare, and shrinking preloads before pause.

The pool engine talks to a :class:`MemoryManager` (:mod:`dispoold.memory.port`). Two
implementations ship, chosen by ``[memory] manager``: the qmemman client
(:mod:`dispoold.memory.qmemman`, on Qubes, where qmemman balances memory) and the
daemon's own balancer (:mod:`dispoold.memory.balancer`, plain Xen). ``auto`` picks
qmemman when its socket exists. Both follow the rules in :mod:`dispoold.memory.rules`;
docs/design.md ("Memory") says which settings govern under which manager.
"""

from __future__ import annotations

from dispoold.backend import Backend
from dispoold.config import MemorySettings
from dispoold.loader import Axis, load
from dispoold.memory.balancer import Balancer
from dispoold.memory.port import MemoryManager, MemoryManagerError, NoMemory, ShrinkResult
from dispoold.memory.qmemman import QmemmanClient
from dispoold.memory.rules import DOMAIN_OVERHEAD_MIB, MIB, Progress, preferred_mib

__all__ = [
    "DOMAIN_OVERHEAD_MIB",
    "MANAGERS",
    "MIB",
    "Balancer",
    "MemoryManager",
    "MemoryManagerError",
    "NoMemory",
    "Progress",
    "QmemmanClient",
    "ShrinkResult",
    "create_manager",
    "preferred_mib",
]

#: The managers that ship, by configuration name. Each is called as
#: ``cls(settings, backend)``; so is an out-of-tree ``package.module:Class``.
MANAGERS: Axis[MemoryManager] = Axis(
    kind="memory manager",
    builtins={
        "qmemman": "dispoold.memory.qmemman:QmemmanClient",
        "balancer": "dispoold.memory.balancer:Balancer",
    },
    port=MemoryManager,
    error=MemoryManagerError,
    own_errors=(MemoryManagerError,),
)


def create_manager(settings: MemorySettings, backend: Backend) -> MemoryManager:
    """The manager ``settings.manager`` names; ``auto`` means qmemman when its socket
    exists, else the daemon's own balancer. Raises :class:`MemoryManagerError`."""
    name = settings.manager
    if name == "auto":
        name = "qmemman" if settings.qmemman_socket.exists() else "balancer"
    return load(MANAGERS, name, settings, backend)
