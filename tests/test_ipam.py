"""Subnet choice."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network

import pytest
from overlayd.config import NetworkConfig
from overlayd.errors import SubnetExhausted
from overlayd.ipam import choose_free_subnet, find_own_lease
from overlayd.model import Lease, LeaseAttrs

CONFIG = NetworkConfig.from_dict({"Network": "10.10.0.0/24", "SubnetLen": 28})


def lease(subnet: str, ip: str, reserved: bool = False) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), "vxlan"), None if reserved else datetime.now(UTC))


def test_own_lease_found_by_public_ip_reservation_first() -> None:
    leases = [lease("10.10.0.16/28", "192.0.2.1"), lease("10.10.0.48/28", "192.0.2.1", reserved=True)]
    own = find_own_lease(CONFIG, leases, IPv4Address("192.0.2.1"))
    assert own is not None and own.subnet == IPv4Network("10.10.0.48/28")
    assert find_own_lease(CONFIG, leases, IPv4Address("192.0.2.2")) is None


def test_own_lease_outside_the_network_is_ignored() -> None:
    assert find_own_lease(CONFIG, [lease("10.99.0.16/28", "192.0.2.1")], IPv4Address("192.0.2.1")) is None


def test_prefers_then_random_free() -> None:
    taken = [lease("10.10.0.16/28", "192.0.2.1")]
    assert choose_free_subnet(CONFIG, taken, prefer=[IPv4Network("10.10.0.32/28")]) == IPv4Network("10.10.0.32/28")
    # a taken or foreign preference is ignored
    got = choose_free_subnet(
        CONFIG, taken, prefer=[IPv4Network("10.10.0.16/28"), IPv4Network("10.99.0.0/28")], rng=random.Random(1)
    )
    assert got != IPv4Network("10.10.0.16/28") and CONFIG.contains_subnet(got)


def test_exhaustion_names_the_network_and_size() -> None:
    taken = [lease(str(s), "192.0.2.1") for s in CONFIG.subnets()]
    with pytest.raises(SubnetExhausted, match=r"10\.10\.0\.0/24 is exhausted: all 15 /28 subnets"):
        choose_free_subnet(CONFIG, taken)
