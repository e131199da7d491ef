"""The Xen tier: tests that run inside the Xen lab's dom0, never on the host.

    lab/labctl run -- /opt/dispoold/venv/bin/python -m pytest tests/xen

Outside a Xen dom0 the whole session stops with an error instead of skipping: a tier that
skips everything looks green while it tested nothing. The host tier leaves this directory
out (``pytest --ignore=tests/xen``) or deselects it (``-m "not xen"``): every test here
carries the ``xen`` marker.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
CAPABILITIES = Path("/proc/xen/capabilities")


def in_xen_dom0() -> bool:
    """True in a Xen control domain (dom0), whose xenfs lists ``control_d``."""
    try:
        return "control_d" in CAPABILITIES.read_text()
    except OSError:
        return False


def _ours(item: pytest.Item) -> bool:
    return HERE in item.path.resolve().parents


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _ours(item):
            item.add_marker(pytest.mark.xen)


def pytest_collection_finish(session: pytest.Session) -> None:
    selected = [item for item in session.items if _ours(item)]
    if selected and not in_xen_dom0():
        pytest.exit(
            f"{len(selected)} test(s) of tests/xen were selected, but this is not a Xen dom0 "
            f"({CAPABILITIES} does not list control_d). This tier runs inside the Xen lab: "
            "lab/labctl run -- /opt/dispoold/venv/bin/python -m pytest tests/xen "
            '(and the host tier runs with --ignore=tests/xen or -m "not xen").',
            returncode=pytest.ExitCode.USAGE_ERROR,
        )
