"""``overlayd check``'s pure classification; the real thing runs on a cluster in
tests/e2e/test_observability.py."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from overlayd.check import (
    MAC_MISMATCH,
    MTU_BLACKHOLE,
    NOT_PROGRAMMED,
    OK,
    PORT_BLOCKED,
    UNREACHABLE,
    Probe,
    diagnose,
    kernel_problem,
)
from overlayd.kernel import FdbEntry, Neighbour, Route

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
