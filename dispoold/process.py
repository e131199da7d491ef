"""The daemon's own footprint, as ``status`` reports it: memory, CPU, descriptors.

An operator watching a long-running daemon wants to see it is not growing (a leak of
descriptors or memory would show here long before it hurts). Read with psutil, from
/proc, in a few tens of microseconds.
"""

from __future__ import annotations

import psutil

from dispoold.views import ProcessView

_MIB = 1024 * 1024
_self = psutil.Process()


def figures() -> ProcessView:
    with _self.oneshot():
        times = _self.cpu_times()
        return ProcessView(
            pid=_self.pid,
            rss_mib=round(_self.memory_info().rss / _MIB, 1),
            cpu_seconds=round(times.user + times.system, 2),
            open_fds=_self.num_fds(),
            threads=_self.num_threads(),
        )
