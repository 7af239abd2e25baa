"""Lease formats: byte-compatible with flannel's etcd values and keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from overlayd.decode import DecodeError, load_json
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


# -- bounded decoding (issue 10, item 1) --------------------------------------------------------

DEEP = "[" * 1100 + "]" * 1100  # ~2 KB; plain json.loads raises RecursionError on it


@pytest.mark.parametrize(
    "value",
    [
        DEEP,
        '{"PublicIP": "192.0.2.1", "BackendData": {"x": ' + DEEP + "}}",
        '{"PublicIP": "192.0.2.1", "BackendData": {"x": "' + "a" * 70_000 + '"}}',
        b'{"PublicIP": "192.0.2.1\xff"}',
        '{"PublicIP": 1' + "0" * 5000 + "}",
    ],
)
def test_unusable_values_are_garbled_never_a_crash(value: str | bytes) -> None:
    with pytest.raises(GarbledLease):
        LeaseAttrs.from_json(value)


def test_depth_limit_ignores_brackets_inside_strings() -> None:
    value = json.dumps({"PublicIP": "192.0.2.1", "BackendData": {"note": "[" * 500}})
    assert LeaseAttrs.from_json(value).backend_data == {"note": "[" * 500}


def test_long_keys_are_garbled() -> None:
    with pytest.raises(GarbledLease, match="characters long"):
        key_to_subnet("1" * 100_000 + "-24")


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300), _json.map(json.dumps), st.integers(0, 3000)))
def test_lease_values_parse_or_are_garbled(raw: str | bytes | int) -> None:
    if isinstance(raw, int):  # nesting of any depth, in arrays or objects
        raw = '{"a":' * raw + "1" + "}" * raw if raw % 2 else "[" * raw + "]" * raw
    try:
        attrs = LeaseAttrs.from_json(raw)
    except GarbledLease:
        return
    assert LeaseAttrs.from_json(attrs.to_json()) == attrs


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_keys_parse_or_are_garbled(key: str) -> None:
    try:
        subnet = key_to_subnet(key)
    except GarbledLease:
        return
    assert key_to_subnet(subnet_to_key(subnet)) == subnet


@settings(max_examples=200, deadline=None)
@given(_json, st.integers(1, 40))
def test_bounded_decoder_agrees_with_json_within_the_limits(doc: object, depth: int) -> None:
    text = json.dumps(doc)
    try:
        got = load_json(text, what="x", max_bytes=1 << 20, max_depth=depth)
    except DecodeError as exc:
        assert "nested more than" in str(exc) and _depth(doc) > depth
        return
    assert _depth(doc) <= depth and got == json.loads(text)


def _depth(doc: object) -> int:
    if isinstance(doc, list):
        return 1 + max((_depth(x) for x in doc), default=0)
    if isinstance(doc, dict):
        return 1 + max((_depth(x) for x in doc.values()), default=0)
    return 0


def test_created_revision_defaults_and_parses() -> None:
    lease = parse_lease("10.244.3.0-24", FLANNEL_VALUE, expiration=None, revision=9, created_revision=4)
    assert (lease.revision, lease.created_revision) == (9, 4)
    assert Lease(None, lease.attrs, None, ipv6_subnet=IPv6Network("fd00::/64")).created_revision == 0


def test_a_dual_stack_lease_splits_into_one_lease_per_store_key() -> None:
    from ipaddress import IPv4Network as V4
    from ipaddress import IPv6Address as A6
    from ipaddress import IPv6Network as V6

    from overlayd.model import Lease, LeaseAttrs

    attrs_ = LeaseAttrs(
        None, "vxlan", {"VtepMAC": "02:00:00:00:00:01"}, A6("2001:db8::3"), {"VtepMAC": "02:00:00:00:00:02"}
    )
    both = Lease(V4("10.244.3.0/24"), attrs_, None, ipv6_subnet=V6("fd00:0:0:3::/64"))
    assert both.families == (4, 6)
    assert both.keys == ("10.244.3.0-24", "fd00:0:0:3::-64")
    assert both.only(6).families == (6,) and both.only(6).key == "fd00:0:0:3::-64"
    assert both.only(4).subnet_of(4) == V4("10.244.3.0/24") and both.only(4).subnet_of(6) is None
    assert attrs_.public_ip_of(6) == A6("2001:db8::3") and attrs_.public_ip_of(4) is None
    assert attrs_.backend_data_of(6) == {"VtepMAC": "02:00:00:00:00:02"}
