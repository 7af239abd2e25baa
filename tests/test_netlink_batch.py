"""Batched netlink writes (``netlink.apply_batch``) in a real namespace (root): what the kernel holds
afterwards is read back independently through pyroute2 (``netlink.read_*``), and the errno rules
and error messages are those of the one-at-a-time ``apply_plan``."""

from __future__ import annotations

import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network

import pytest
from overlayd import netlink
from overlayd.errors import KernelError
from overlayd.netlink import FdbEntry, MacAddress, Neighbour, Route
from overlayd.plan import Plan
from overlayd.testing.netns import call_in_netns, netns_factory, run, veth

pytestmark = pytest.mark.root

__all__ = ["netns_factory"]

DEV = "flannel.1"


def objects(i: int) -> list[netlink.KernelObject]:
    mac = MacAddress(bytes([2, 0, 0, 0, i >> 8, i & 0xFF]))
    gw = IPv4Address(f"10.{80 + (i >> 8)}.{i & 0xFF}.0")
    return [
        Neighbour(dst=gw, lladdr=mac, dev=DEV),
        FdbEntry(lladdr=mac, dst=IPv4Address(f"198.51.100.{i % 250 + 1}"), dev=DEV),
        Route(dst=IPv4Network(f"{gw}/24"), gateway=gw, dev=DEV, onlink=True),
    ]


def full_read() -> frozenset[object]:
    with netlink.iproute() as ipr:
        return netlink.read_routes(ipr) | netlink.read_neighbours(ipr, DEV) | netlink.read_fdb(ipr, DEV)


@pytest.fixture
def host(netns_factory: Callable[..., str]) -> str:
    netns, other = netns_factory("nb"), netns_factory("nbpeer")
    veth(netns, "eth0", other, "eth0", "192.0.2.1/24", "192.0.2.2/24")
    run(netns, "ip", "link", "add", DEV, "type", "vxlan", "id", "1", "local", "192.0.2.1", "dev", "eth0")
    run(netns, "ip", "link", "set", DEV, "up")
    return netns


def test_many_objects_in_few_round_trips_then_removed(host: str) -> None:
    want = frozenset(obj for i in range(1, 1201) for obj in objects(i))
    started = time.monotonic()
    sent = call_in_netns(host, netlink.apply_batch, Plan(add=want, remove=frozenset()))
    elapsed = time.monotonic() - started
    assert sent == len(want) == 3600
    assert call_in_netns(host, full_read) == want
    assert elapsed < 2.0, elapsed  # one by one through pyroute2 this took seconds
    # a changed remote replaces in place; removing a peer deletes its three objects
    moved = FdbEntry(lladdr=MacAddress(bytes([2, 0, 0, 0, 0, 1])), dst=IPv4Address("198.51.100.99"), dev=DEV)
    gone = frozenset(objects(2))
    old_fdb = objects(1)[1]
    call_in_netns(host, netlink.apply_batch, Plan(add=frozenset({moved}), remove=gone | {old_fdb}))
    assert call_in_netns(host, full_read) == (want - gone - {old_fdb}) | {moved}
    # deleting what is already gone counts as done (ENOENT/ESRCH)
    call_in_netns(host, netlink.apply_batch, Plan(add=frozenset(), remove=gone))
    call_in_netns(host, netlink.apply_batch, Plan(add=frozenset(), remove=want | {moved}))
    assert call_in_netns(host, full_read) == frozenset()


def test_a_failure_names_its_object_and_the_others_still_apply(host: str) -> None:
    good = frozenset(objects(7))
    # a gateway that is not reachable on the device (no onlink): the kernel refuses the route
    bad = Route(dst=IPv4Network("10.98.0.0/24"), gateway=IPv4Address("10.98.0.1"), dev=DEV)
    with pytest.raises(KernelError, match=r"setting route 10\.98\.0\.0/24 via 10\.98\.0\.1 dev flannel\.1 .*failed"):
        call_in_netns(host, netlink.apply_batch, Plan(add=good | {bad}, remove=frozenset()))
    assert call_in_netns(host, full_read) == good
    # a device that does not exist: named, and the rest is applied
    lost = Route(dst=IPv4Network("10.99.0.0/24"), gateway=IPv4Address("10.99.0.0"), dev="nosuch0", onlink=True)
    more = frozenset(objects(8))
    with pytest.raises(KernelError, match=r"setting route 10\.99\.0\.0/24 .*nosuch0.*does not exist"):
        call_in_netns(host, netlink.apply_batch, Plan(add=more | {lost}, remove=frozenset()))
    assert call_in_netns(host, full_read) == good | more
    # an onlink route through a device that is down: ENETDOWN, with the hint
    run(host, "ip", "link", "set", DEV, "down")
    with pytest.raises(KernelError, match=r"setting route 10\.80\.9\.0/24.*errno 100.*device is down"):
        call_in_netns(host, netlink.apply_batch, Plan(add=frozenset(objects(9)[2:]), remove=frozenset()))
