"""Lease formats: byte-compatible with flannel's etcd values and keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from overlayd.errors import GarbledLease
from overlayd.model import EventKind, Lease, LeaseAttrs, diff_lease_lists, key_to_subnet, parse_lease, subnet_to_key

FLANNEL_VALUE = (
    '{"PublicIP":"192.0.2.3","PublicIPv6":null,"BackendType":"vxlan",'
    '"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}}'
)


def test_value_matches_flannel_exactly() -> None:
    attrs = LeaseAttrs.from_json(FLANNEL_VALUE)
    assert attrs.public_ip == IPv4Address("192.0.2.3")
    assert attrs.backend_data == {"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}
    assert attrs.to_json() == FLANNEL_VALUE


def test_keys() -> None:
    assert subnet_to_key(IPv4Network("10.244.3.0/24")) == "10.244.3.0-24"
    assert key_to_subnet("/coreos.com/network/subnets/10.244.3.0-24") == IPv4Network("10.244.3.0/24")
    assert key_to_subnet("fd00:1::-64") == IPv6Network("fd00:1::/64")


@pytest.mark.parametrize("key", ["10.244.3.0", "10.244.3.0-abc", "10.244.3.1-24", "banana-24", "10.244.3.0-40"])
def test_bad_keys(key: str) -> None:
    with pytest.raises(GarbledLease):
        key_to_subnet(key)


@pytest.mark.parametrize(
    "value",
    [
        "{",
        "[]",
        '{"PublicIP": "300.1.1.1"}',
        '{"PublicIP": "fd00::1"}',
        '{"PublicIP": "192.0.2.1", "BackendData": [1]}',
        '{"PublicIP": "192.0.2.1", "BackendType": 5}',
    ],
)
def test_garbled_values(value: str) -> None:
    with pytest.raises(GarbledLease):
        LeaseAttrs.from_json(value)


def test_parse_lease_family_must_match_prefix() -> None:
    with pytest.raises(GarbledLease, match="wrong address family"):
        parse_lease("fd00::-64", FLANNEL_VALUE, expiration=None)
    lease = parse_lease("10.244.3.0-24", FLANNEL_VALUE, expiration=datetime.now(UTC), revision=7)
    assert lease.key == "10.244.3.0-24" and lease.revision == 7 and not lease.is_reservation


def test_diff_between_snapshots() -> None:
    a = LeaseAttrs.from_json(FLANNEL_VALUE)
    one = Lease(IPv4Network("10.244.1.0/24"), a, None, revision=1)
    two = Lease(IPv4Network("10.244.2.0/24"), a, None, revision=2)
    two_changed = Lease(IPv4Network("10.244.2.0/24"), a, None, revision=5)
    three = Lease(IPv4Network("10.244.3.0/24"), a, None, revision=6)
    events = diff_lease_lists([one, two], [two_changed, three], revision=6)
    got = sorted((e.kind.value, str(e.subnet)) for e in events)
    assert got == [("added", "10.244.2.0/24"), ("added", "10.244.3.0/24"), ("removed", "10.244.1.0/24")]
    assert {e.kind for e in events} <= set(EventKind)
    assert json.loads(a.to_json())["PublicIPv6"] is None
