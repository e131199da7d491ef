"""Each disposable's identity: addresses derived from the dispid never collide."""

from __future__ import annotations

import re

import pytest

from dispoold.config import DISPIDS, InterfaceSettings, TemplateSettings
from dispoold.identity import MAX_INTERFACES, identity, interface, mac_address


def test_no_two_disposables_of_a_daemon_share_a_mac() -> None:
    macs = {
        mac_address("dispoold", devid, dispid)
        for devid in range(MAX_INTERFACES)
        for dispid in range(DISPIDS)
    }
    assert len(macs) == MAX_INTERFACES * DISPIDS
    assert all(re.fullmatch(r"00:16:3e(:[0-9a-f]{2}){3}", mac) for mac in list(macs)[:100])


def test_the_instance_moves_the_whole_range() -> None:
    assert mac_address("dispoold", 0, 1) != mac_address("lab", 0, 1)


@pytest.mark.parametrize(("devid", "dispid"), [(-1, 0), (16, 0), (0, -1), (0, 16384)])
def test_out_of_range_is_refused(devid: int, dispid: int) -> None:
    with pytest.raises(ValueError, match="no MAC"):
        mac_address("dispoold", devid, dispid)


def test_addresses_follow_the_dispid_within_the_subnet() -> None:
    settings = InterfaceSettings.model_validate(
        {"subnet": "10.138.0.0/18", "gateway": "10.138.0.1", "dns": ["10.139.1.1"]}
    )
    first = interface(settings, "dispoold", 0, 0)
    last = interface(settings, "dispoold", 0, DISPIDS - 1)
    assert str(first.address) == "10.138.0.2/18"
    assert str(last.address) == "10.138.39.17/18"  # 2 + 9999 = 10001 = 39 * 256 + 17
    addresses = {interface(settings, "dispoold", 0, d).address for d in range(DISPIDS)}
    assert len(addresses) == DISPIDS
    assert first.gateway == "10.138.0.1" and first.dns == ("10.139.1.1",)


def test_a_template_without_interfaces_gets_a_name_and_a_seed_only() -> None:
    one, two = (identity("disp1", TemplateSettings(), "dispoold", 1) for _ in range(2))
    assert one.interfaces == () and one.name == "disp1" and one.generation == 1
    assert len(one.seed) == 64 and one.seed != two.seed
