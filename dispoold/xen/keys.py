"""The xenstore keys of a domain, as dispoold writes and reads them (docs/guest.md).

Everything is under ``/local/domain/<domid>/``. The daemon's keys are in ``dispoold/``,
written by libxl in the transaction that names the domain (``c_info.xsdata``): owned by
dom0, readable by the guest, which can neither change nor forge them. The guest writes
only under its ``data/`` directory, and whatever it writes is untrusted.
"""

from __future__ import annotations

from collections.abc import Mapping

from dispoold.backend import Marker
from dispoold.identity import Identity
from dispoold.savefile import MAX_PRERUN_BYTES

#: The daemon's directory in the domain's area.
MARKER_DIR = "dispoold"
MARKER_KEYS = ("owner", "template", "dispid")
IDENTITY_DIR = f"{MARKER_DIR}/identity"
#: This boot prepares a savefile; the prerun script it runs first.
SAVE_REQUEST_KEY = f"{MARKER_DIR}/save/request"
SAVE_PRERUN_KEY = f"{MARKER_DIR}/save/prerun"
#: Written on a restored domain once its new identity is in place.
RESTORE_COMPLETE_KEY = f"{MARKER_DIR}/restore/complete"
#: Where the guest reports its used memory (KiB) after a save request's prerun.
USED_MEM_KEY = "data/used-mem"


def marker_keys(marker: Marker) -> dict[str, str]:
    """The marker: which daemon made the domain, from which template, with which dispid."""
    return {
        f"{MARKER_DIR}/owner": marker.owner,
        f"{MARKER_DIR}/template": marker.template,
        f"{MARKER_DIR}/dispid": str(marker.dispid),
    }


def parse_marker(values: Mapping[str, str | None]) -> Marker | None:
    """A marker from its three xenstore values, or None if they do not form one."""
    owner, template, dispid = (values.get(key) for key in MARKER_KEYS)
    if not owner or not template or dispid is None or not dispid.isdigit():
        return None
    return Marker(owner=owner, template=template, dispid=int(dispid))


def identity_keys(identity: Identity) -> dict[str, str]:
    """The guest's identity: name, generation, seed, and per interface its MAC, address,
    gateway and resolvers."""
    keys = {
        f"{IDENTITY_DIR}/name": identity.name,
        f"{IDENTITY_DIR}/generation": str(identity.generation),
        f"{IDENTITY_DIR}/seed": identity.seed,
    }
    for interface in identity.interfaces:
        base = f"{IDENTITY_DIR}/net/{interface.devid}"
        keys[f"{base}/mac"] = interface.mac
        if interface.address is not None:
            keys[f"{base}/ip"] = str(interface.address)
        if interface.gateway is not None:
            keys[f"{base}/gateway"] = interface.gateway
        if interface.dns:
            keys[f"{base}/dns"] = " ".join(interface.dns)
    return keys


def save_request_keys(prerun: str | None) -> dict[str, str]:
    """What asks a guest to prepare for a save (R3.2's qubes_save_request)."""
    keys = {SAVE_REQUEST_KEY: "1"}
    if prerun:
        if len(prerun.encode()) > MAX_PRERUN_BYTES:
            raise ValueError(f"the prerun script is over {MAX_PRERUN_BYTES} bytes")
        keys[SAVE_PRERUN_KEY] = prerun
    return keys


def parse_kib(untrusted_value: str | None, ceiling_kib: int) -> int | None:
    """A KiB figure written by the guest, checked: digits only, clamped to the ceiling."""
    if untrusted_value is None:
        return None
    untrusted_value = untrusted_value.strip()
    if not untrusted_value.isdigit() or len(untrusted_value) > 15:
        return None
    return min(int(untrusted_value), ceiling_kib)
