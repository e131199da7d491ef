"""Each disposable's identity: its name, its network addresses, a seed for its RNG.

Addresses are derived from the dispid (the R3.2 idea), so that two disposables of one
daemon never share one while their dispids differ, without any allocation to keep:

- MAC: Xen's OUI ``00:16:3e``, then 24 bits: 6 bits from a hash of the daemon's instance
  name (two daemons on one host rarely meet; configure different instances), 4 bits
  for the interface (0-15), 14 bits for the dispid (0-9999).
- IPv4: the interface's subnet's network address + ``first_address`` + dispid (the
  configuration checks that every dispid fits).

The seed is fresh randomness, new for every creation and every restore: a guest mixes it
into its RNG, so that two disposables never share a random state (docs/guest.md).
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field
from ipaddress import IPv4Interface

from dispoold.config import InterfaceSettings, TemplateSettings

XEN_OUI = (0x00, 0x16, 0x3E)
MAX_INTERFACES = 16
DISPID_BITS = 14


@dataclass(frozen=True, slots=True)
class Interface:
    """One network interface of one disposable: where it plugs in, and who it is."""

    devid: int
    mac: str
    bridge: str | None
    #: The domain serving it (a driver domain); None: dom0.
    backend: str | None
    #: Address with prefix length (``10.137.0.23/16``); None: no address configured.
    address: IPv4Interface | None = None
    gateway: str | None = None
    dns: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Identity:
    name: str
    #: Grows whenever the identity changes (a restore, a named disposable's start).
    generation: int
    seed: str = field(default_factory=lambda: secrets.token_hex(32))
    interfaces: tuple[Interface, ...] = ()


def mac_address(instance: str, devid: int, dispid: int) -> str:
    """The MAC of interface ``devid`` of disposable ``dispid`` of daemon ``instance``."""
    if not (0 <= devid < MAX_INTERFACES) or not (0 <= dispid < 1 << DISPID_BITS):
        raise ValueError(f"no MAC for interface {devid} of dispid {dispid}")
    salt = hashlib.sha256(instance.encode()).digest()[0] & 0x3F
    value = (salt << 18) | (devid << DISPID_BITS) | dispid
    octets = (*XEN_OUI, value >> 16 & 0xFF, value >> 8 & 0xFF, value & 0xFF)
    return ":".join(f"{octet:02x}" for octet in octets)


def interface(settings: InterfaceSettings, instance: str, devid: int, dispid: int) -> Interface:
    address = None
    if settings.subnet is not None:
        host = settings.subnet.network_address + settings.first_address + dispid
        address = IPv4Interface(f"{host}/{settings.subnet.prefixlen}")
    bridge = settings.bridge
    if bridge is None and settings.backend is None:
        bridge = "xenbr0"
    return Interface(
        devid=devid,
        mac=mac_address(instance, devid, dispid),
        bridge=bridge,
        backend=settings.backend,
        address=address,
        gateway=None if settings.gateway is None else str(settings.gateway),
        dns=tuple(str(server) for server in settings.dns),
    )


def identity(
    name: str, template: TemplateSettings, instance: str, dispid: int, generation: int = 1
) -> Identity:
    """A new disposable's identity, with a fresh seed."""
    return Identity(
        name=name,
        generation=generation,
        interfaces=tuple(
            interface(settings, instance, devid, dispid)
            for devid, settings in enumerate(template.interfaces)
        ),
    )
