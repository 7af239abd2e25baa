"""Incremental planning equals the full diff: over random sequences of lease changes and kernel drift,
applying only the plans for touched slots keeps the (simulated) kernel equal to the full desired
state, with the vxlan backend's real ``desired_state`` (contested FDB slots included)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from overlayd import plan
from overlayd.backends.vxlan import DeviceSpec, VxlanNetwork, VxlanSettings
from overlayd.incremental import DesiredIndex, SlotSet, full_plan, incremental_plan
from overlayd.model import Lease, LeaseAttrs
from overlayd.netlink import MacAddress, Route
from overlayd.plugin import HostInfo

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
    return VxlanNetwork(
        settings_, host, spec, MacAddress.parse("0a:00:00:00:00:0a"), frozenset({IPv4Network("192.0.2.0/24")})
    )


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
            kernel = plan.apply_plan(kernel, plan.Plan(add=frozenset({stray})))
            touched = frozenset({stray.key}) if before.get(stray.key) != stray else frozenset()
        change = incremental_plan(desired, SlotSet(kernel), touched)
        kernel = plan.apply_plan(kernel, change)
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
