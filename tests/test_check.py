"""``overlayd check``'s pure classification, per family; the real thing runs on clusters in
tests/e2e/test_observability.py (IPv4) and tests/e2e/test_check_dual_stack.py (dual-stack, IPv6-only)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from overlayd.check import (
    ICMP_OVERHEAD,
    MAC_MISMATCH,
    MTU_BLACKHOLE,
    NOT_PROGRAMMED,
    OK,
    PORT_BLOCKED,
    UNREACHABLE,
    Probe,
    diagnose,
    kernel_problem,
    own_lease,
)
from overlayd.errors import UserError
from overlayd.kernel import FdbEntry, Neighbour, Route
from overlayd.model import Lease, LeaseAttrs
from overlayd.plugin import Backend
from overlayd.probe import ping
from overlayd.testing.netns import in_netns, netns_factory, run

__all__ = ["netns_factory"]  # the fixture, imported for pytest

MAC = "02:00:00:00:00:01"
PEER = IPv4Address("192.0.2.11")
ROUTE = Route(dst=IPv4Network("10.244.1.0/24"), dev="flannel.1", gateway=IPv4Address("10.244.1.0"), onlink=True)
NEIGH = Neighbour(IPv4Address("10.244.1.0"), MAC, "flannel.1")
FDB = FdbEntry(MAC, PEER, "flannel.1")
DESIRED = frozenset({ROUTE, NEIGH, FDB})
UP, DOWN = Probe(True, 0.3), Probe(False)


def test_a_programmed_peer_has_no_kernel_problem() -> None:
    assert kernel_problem(DESIRED, DESIRED | {Route(dst=IPv4Network("10.244.2.0/24"), dev="flannel.1")}) is None


def test_a_missing_fdb_entry_means_not_programmed() -> None:
    problem = kernel_problem(DESIRED, {ROUTE, NEIGH})
    assert problem is not None and problem.startswith(NOT_PROGRAMMED)
    assert MAC in problem


def test_another_mac_in_the_kernel_is_a_mac_mismatch() -> None:
    other = "02:00:00:00:00:99"
    by_neigh = kernel_problem(DESIRED, {ROUTE, FDB, Neighbour(IPv4Address("10.244.1.0"), other, "flannel.1")})
    by_fdb = kernel_problem(DESIRED, {ROUTE, NEIGH, FdbEntry(other, PEER, "flannel.1")})
    for problem in (by_neigh, by_fdb):
        assert problem is not None and problem.startswith(MAC_MISMATCH) and other in problem


def test_diagnosis() -> None:
    assert diagnose(None, UP, UP, UP) == (True, OK)
    assert diagnose(None, UP, DOWN, DOWN) == (False, PORT_BLOCKED)
    assert diagnose(None, UP, UP, DOWN) == (False, MTU_BLACKHOLE)
    assert diagnose(None, DOWN, DOWN, DOWN) == (False, UNREACHABLE)
    assert diagnose(None, DOWN, UP, UP) == (True, OK)  # ICMP filtered on the underlay only
    assert diagnose("peer not programmed here: x", UP, UP, UP) == (False, "peer not programmed here: x")


# -- IPv6: the same classification, the family is only a parameter -----------------------------------

PEER6 = IPv6Address("2001:db8::11")
VTEP6 = IPv6Address("fd00:0:0:1::")
ROUTE6 = Route(dst=IPv6Network("fd00:0:0:1::/64"), dev="flannel-v6.1", gateway=VTEP6, onlink=True)
NEIGH6 = Neighbour(VTEP6, MAC, "flannel-v6.1")
FDB6 = FdbEntry(MAC, PEER6, "flannel-v6.1")
DESIRED6 = frozenset({ROUTE6, NEIGH6, FDB6})


def test_ipv6_objects_are_compared_like_ipv4_ones() -> None:
    both = DESIRED | DESIRED6
    assert kernel_problem(DESIRED6, both) is None
    missing = kernel_problem(DESIRED6, both - {FDB6})
    assert missing is not None and missing.startswith(NOT_PROGRAMMED) and "flannel-v6.1" in missing
    other = "02:00:00:00:00:99"
    wrong = kernel_problem(DESIRED6, (both - {NEIGH6}) | {Neighbour(VTEP6, other, "flannel-v6.1")})
    assert wrong is not None and wrong.startswith(MAC_MISMATCH) and other in wrong
    assert kernel_problem(DESIRED, both - {FDB6}) is None  # the IPv4 path does not see an IPv6 fault


ATTRS = LeaseAttrs(public_ip=PEER, public_ipv6=PEER6, backend_type="vxlan")
LATER = datetime(2030, 1, 1, tzinfo=UTC)
V4 = Lease(IPv4Network("10.244.1.0/24"), ATTRS, LATER)
V6 = Lease(None, ATTRS, LATER, ipv6_subnet=IPv6Network("fd00:0:0:1::/64"))
OTHER = Lease(IPv4Network("10.244.2.0/24"), ATTRS, LATER)


def test_the_own_lease_is_merged_from_the_subnet_files_subnets_of_both_families() -> None:
    own = own_lease([OTHER, V6, V4], [V4.subnet, V6.ipv6_subnet], "subnet.env")  # type: ignore[list-item]
    assert own.families == (4, 6)
    assert (own.subnet, own.ipv6_subnet) == (V4.subnet, V6.ipv6_subnet)
    assert own_lease([V6], [V6.ipv6_subnet], "subnet.env").families == (6,)  # type: ignore[list-item]
    with pytest.raises(UserError, match="fd00:0:0:1::/64"):
        own_lease([V4], [V4.subnet, V6.ipv6_subnet], "subnet.env")  # type: ignore[list-item]


def test_the_default_probe_address_of_an_ipv6_lease_is_its_first_address() -> None:
    assert Backend.probe_address(V4) == IPv4Address("10.244.1.1")
    assert Backend.probe_address(V6) == IPv6Address("fd00:0:0:1::1")


@pytest.mark.root
def test_the_full_size_probe_fills_the_mtu_exactly_for_each_family(netns_factory: Callable[..., str]) -> None:
    """``ping -M do`` to the loopback of each family in a namespace of our own whose ``lo`` has MTU
    1400: a payload of the MTU less the family's headers (``ICMP_OVERHEAD``) passes, one more byte
    does not fit."""
    ns = netns_factory("mtu")
    run(ns, "ip", "link", "set", "lo", "mtu", "1400")
    for dst in (IPv4Address("127.0.0.1"), IPv6Address("::1")):
        size = 1400 - ICMP_OVERHEAD[dst.version]
        with in_netns(ns):
            assert ping(dst, count=1, size=size, df=True).ok, dst
            assert not ping(dst, count=1, size=size + 1, df=True).ok, dst
