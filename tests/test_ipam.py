"""Subnet choice."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

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


# -- IPv6: the same functions with version=6 ---------------------------------------------------

V6 = NetworkConfig.from_dict(
    {
        "EnableIPv6": True,
        "Network": "10.10.0.0/24",
        "SubnetLen": 28,
        "IPv6Network": "fd00:10::/32",  # 2**32 /64s: enumerating them is not an option
        "IPv6SubnetMin": "fd00:10:0:100::",
        "IPv6SubnetMax": "fd00:10:0:1ff::",
    }
)


def v6_lease(subnet: str, ip6: str, reserved: bool = False) -> Lease:
    attrs = LeaseAttrs(None, "vxlan", public_ipv6=IPv6Address(ip6))
    return Lease(None, attrs, None if reserved else datetime.now(UTC), ipv6_subnet=IPv6Network(subnet))


def test_v6_own_lease_is_found_by_public_ipv6() -> None:
    mine = v6_lease("fd00:10:0:1a0::/64", "2001:db8::1")
    leases = [lease("10.10.0.16/28", "192.0.2.1"), mine, v6_lease("fd00:10:0:1b0::/64", "2001:db8::2")]
    assert find_own_lease(V6, leases, IPv6Address("2001:db8::1"), 6) == mine
    assert find_own_lease(V6, leases, IPv4Address("192.0.2.1"), 6) is None
    outside = v6_lease("fd00:10:0:2a0::/64", "2001:db8::3")  # above IPv6SubnetMax
    assert find_own_lease(V6, [outside], IPv6Address("2001:db8::3"), 6) is None


def test_v6_own_lease_of_a_merged_lease_is_its_v6_part() -> None:
    merged = Lease(
        IPv4Network("10.10.0.16/28"),
        LeaseAttrs(IPv4Address("192.0.2.1"), "vxlan", public_ipv6=IPv6Address("2001:db8::1")),
        None,
        ipv6_subnet=IPv6Network("fd00:10:0:1a0::/64"),
    )
    own = find_own_lease(V6, [merged], IPv6Address("2001:db8::1"), 6)
    assert own is not None and own.families == (6,)


def test_v6_free_subnet_in_a_huge_range_respects_min_max_and_preference() -> None:
    rng = random.Random(7)
    span = V6.range_of(6)
    assert span is not None and span.count() == 256
    huge = NetworkConfig.from_dict({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00::/16"})
    assert huge.range_of(6).count() == 2**48 - 1  # type: ignore[union-attr]
    got = choose_free_subnet(huge, [], version=6, rng=rng)  # instant: nothing is enumerated
    assert isinstance(got, IPv6Network) and huge.contains_of(6, got)
    for _ in range(50):
        subnet = choose_free_subnet(V6, [], version=6, rng=rng)
        assert V6.contains_of(6, subnet)
    wanted = IPv6Network("fd00:10:0:1ee::/64")
    assert choose_free_subnet(V6, [], version=6, prefer=[IPv4Network("10.10.0.32/28"), wanted]) == wanted
    assert choose_free_subnet(V6, [], version=4, prefer=[wanted, IPv4Network("10.10.0.32/28")]) == IPv4Network(
        "10.10.0.32/28"
    )


def test_v6_nearly_full_range_finds_the_last_free_subnet() -> None:
    span = V6.range_of(6)
    assert span is not None
    last = span.nth(123)
    taken = [v6_lease(str(span.nth(i)), "2001:db8::9") for i in range(span.count()) if i != 123]
    for seed in range(5):
        assert choose_free_subnet(V6, taken, version=6, rng=random.Random(seed)) == last
    with pytest.raises(SubnetExhausted, match=r"IPv6 network fd00:10::/32 is exhausted: all 256 /64 subnets"):
        choose_free_subnet(V6, [*taken, v6_lease(str(last), "2001:db8::9")], version=6)
