"""Incremental planning equals the full diff: over random sequences of lease changes and kernel drift,
applying only the plans for touched slots keeps the (simulated) kernel equal to the full desired
state, with the vxlan backend's real ``desired_state`` (contested FDB slots included)."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from overlayd import netlink, plan
from overlayd.backends.vxlan import DeviceSpec, Vtep, VxlanBackend, VxlanNetwork, VxlanOptions, VxlanSettings
from overlayd.config import NetworkConfig
from overlayd.incremental import DesiredIndex, Reconciler, SlotSet, full_plan, incremental_plan
from overlayd.kernelcache import KernelCache
from overlayd.model import Lease, LeaseAttrs
from overlayd.netlink import MacAddress, Route
from overlayd.plugin import HostInfo
from overlayd.testing.netns import in_netns, ip_json, netns_factory, run, veth

__all__ = ["netns_factory"]  # the fixture, re-exported for pytest

OWN = Lease(
    IPv4Network("10.44.1.0/24"),
    LeaseAttrs(IPv4Address("192.0.2.1"), "vxlan", {"VNI": 1, "VtepMAC": "0a:00:00:00:00:0a"}),
    None,
)
MACS = ["0a:00:00:00:00:0b", "0a:00:00:00:00:0c", "0a:00:00:00:00:0d", "not-a-mac"]
IPS = ["192.0.2.1", "192.0.2.2", "198.51.100.3", "203.0.113.4"]  # .1 is our own: a stale lease


def network() -> VxlanNetwork:
    settings_ = VxlanSettings(vni=1, port=8472, mtu=0, gbp=False, direct_routing=True)
    host = HostInfo("eth0", 2, 1500, IPv4Address("192.0.2.1"), iface_addr=IPv4Address("192.0.2.1"))
    spec = DeviceSpec("flannel.1", 1, IPv4Address("192.0.2.1"), 2, 8472, False, 1450)
    vtep = Vtep(spec, MacAddress.parse("0a:00:00:00:00:0a"))
    return VxlanNetwork(settings_, host, [vtep], frozenset({IPv4Network("192.0.2.0/24")}))


def lease(n: int, mac: str, ip: str) -> Lease:
    return Lease(IPv4Network(f"10.44.{n}.0/24"), LeaseAttrs(IPv4Address(ip), "vxlan", {"VNI": 1, "VtepMAC": mac}), None)


put = st.tuples(st.just("put"), st.integers(1, 8), st.sampled_from(MACS), st.sampled_from(IPS))
delete = st.tuples(st.just("delete"), st.integers(1, 8))
drift_remove = st.tuples(st.just("drift-remove"), st.integers(0, 50))
drift_add = st.tuples(st.just("drift-add"), st.integers(1, 8), st.sampled_from(IPS))
events = st.lists(st.one_of(put, delete, drift_remove, drift_add), max_size=40)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events)
@example([("put", 3, MACS[0], IPS[3]), ("put", 2, MACS[0], IPS[2]), ("drift-remove", 0), ("delete", 2)])
def test_incremental_plans_end_where_the_full_diff_does(sequence: list[tuple[Any, ...]]) -> None:
    net = network()
    leases: dict[str, Lease] = {}
    desired: DesiredIndex[Any] = DesiredIndex()
    kernel: frozenset[Any] = frozenset()
    for event in sequence:
        touched: frozenset[Any]
        if event[0] == "put":
            new = lease(event[1], event[2], event[3])
            leases[new.key] = new
            touched = desired.set_peer(new.key, net.desired_state(OWN, [new]))
        elif event[0] == "delete":
            key = f"10.44.{event[1]}.0-24"
            leases.pop(key, None)
            touched = desired.drop_peer(key)
        elif event[0] == "drift-remove":
            if not kernel:
                continue
            victim = sorted(kernel, key=str)[event[1] % len(kernel)]
            kernel = kernel - {victim}
            touched = frozenset({victim.key})  # what the kernel cache reports
        else:
            stray = Route(dst=IPv4Network(f"10.44.{event[1]}.0/24"), dev="eth0", gateway=IPv4Address(event[2]))
            before = {obj.key: obj for obj in kernel}
            kernel = plan.simulate(kernel, plan.Plan(add=frozenset({stray})))
            touched = frozenset({stray.key}) if before.get(stray.key) != stray else frozenset()
        change = incremental_plan(desired, SlotSet(kernel), touched)
        kernel = plan.simulate(kernel, change)
        want = net.desired_state(OWN, list(leases.values()))
        assert desired.objects() == want
        assert kernel == want
        assert full_plan(desired, SlotSet(kernel)).empty


def test_contested_slot_passes_to_the_next_claimant() -> None:
    net = network()
    desired: DesiredIndex[Any] = DesiredIndex()
    first, second = lease(2, MACS[0], "198.51.100.3"), lease(3, MACS[0], "203.0.113.4")  # one VtepMAC, one FDB slot
    desired.set_peer(first.key, net.desired_state(OWN, [first]))
    desired.set_peer(second.key, net.desired_state(OWN, [second]))
    assert desired.objects() == net.desired_state(OWN, [first, second])
    touched = desired.drop_peer(first.key)
    assert ("fdb", "flannel.1", MacAddress.parse(MACS[0])) in touched
    assert desired.objects() == net.desired_state(OWN, [second])


def test_rebuild_reports_only_slots_that_changed() -> None:
    net = network()
    desired: DesiredIndex[Any] = DesiredIndex()
    a, b = lease(2, MACS[0], "198.51.100.3"), lease(3, MACS[1], "203.0.113.4")
    for one in (a, b):
        desired.set_peer(one.key, net.desired_state(OWN, [one]))
    moved = lease(3, MACS[1], "203.0.113.9")
    changed = desired.rebuild({a.key: net.desired_state(OWN, [a]), moved.key: net.desired_state(OWN, [moved])})
    assert changed == {("fdb", "flannel.1", MacAddress.parse(MACS[1]))}
    assert desired.objects() == net.desired_state(OWN, [a, moved])


# -- functional: the reconciler over the real kernel-state cache (root) ---------------------------------


@pytest.mark.root
def test_reconciler_on_the_real_kernel_repairs_drift_touching_only_what_changed(
    netns_factory: Callable[..., str],
) -> None:
    ns, other = netns_factory("inc"), netns_factory("incpeer")
    veth(ns, "eth0", other, "eth0", "192.0.2.1/24", "192.0.2.2/24")
    index = ip_json(ns, "link", "show", "eth0")[0]["ifindex"]
    host = HostInfo("eth0", index, 1500, IPv4Address("192.0.2.1"), iface_addr=IPv4Address("192.0.2.1"))
    config = NetworkConfig.from_dict({"Network": "10.44.0.0/16"})
    with in_netns(ns):
        net = VxlanBackend(VxlanOptions()).prepare(config, host)
        assert isinstance(net, VxlanNetwork)
        net.activate(OWN)
        cache = KernelCache(net.device)
        cache.open()

    def apply(change: plan.Plan[Any]) -> None:
        with in_netns(ns):
            net.apply(change)

    def kernel() -> frozenset[Any]:
        with in_netns(ns), netlink.iproute() as ipr:
            return (
                netlink.read_routes(ipr) | netlink.read_neighbours(ipr, net.device) | netlink.read_fdb(ipr, net.device)
            )

    try:
        peers = {p.key: p for p in (lease(n, f"0a:00:00:00:01:{n:02x}", "198.51.100.9") for n in range(2, 32))}
        rec: Reconciler[Any] = Reconciler(cache, apply)
        rec.set_peers({key: net.desired_state(OWN, [p]) for key, p in peers.items()})
        assert len(rec.run()) == 90
        cache.drain()
        assert rec.run().empty, "our own changes, echoed back, need nothing"
        assert kernel() == cache.objects() == net.desired_state(OWN, list(peers.values()))

        victim = Route(dst=IPv4Network("10.44.7.0/24"), dev="flannel.1", gateway=IPv4Address("10.44.7.0"), onlink=True)
        run(ns, "ip", "route", "del", "10.44.7.0/24", "proto", "79")
        cache.drain()
        assert rec.run().add == {victim}, "only the drifted slot was planned"

        gone = peers.pop("10.44.9.0-24")
        rec.set_peers({gone.key: ()})
        assert len(rec.run().remove) == 3
        cache.drain()
        assert kernel() == cache.objects() == net.desired_state(OWN, list(peers.values()))

        run(ns, "ip", "link", "del", "flannel.1")  # the device removed behind our back
        cache.drain()
        assert len(rec.run().add) == 3 * len(peers)
        cache.drain()
        assert rec.run().empty
        assert kernel() == cache.objects() == net.desired_state(OWN, list(peers.values()))
        assert rec.run(full=True).empty, "the audit agrees"
    finally:
        cache.close()
