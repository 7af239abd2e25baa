"""The vxlan backend: pure planning (unit) and the real kernel (functional, root).

Functional tests run each in fresh network namespaces from ``overlayd.testing.netns``: "host"
has ``eth0`` 192.0.2.1/24, its veth peer sits in a second namespace as 192.0.2.2/24.  Kernel
state is read back with ``ip -j`` / ``bridge -j`` inside the namespace, not through
``overlayd.netlink``, so a bug there cannot hide itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import attrs
import pytest
from overlayd import netlink
from overlayd import plan as planmod
from overlayd.backends.vxlan import (
    VxlanBackend,
    VxlanNetwork,
    VxlanOptions,
    VxlanSettings,
    derived_mac,
)
from overlayd.config import NetworkConfig
from overlayd.errors import ConfigError, GarbledLease, PermanentError
from overlayd.model import Lease, LeaseAttrs
from overlayd.netlink import FdbEntry, MacAddress, Neighbour, Route
from overlayd.plugin import HostInfo
from overlayd.testing.netns import bridge_json, in_netns, ip_json, netns, netns_factory, run, veth

__all__ = ["netns", "netns_factory"]  # the fixtures, imported for pytest

CONFIG = NetworkConfig.from_dict({"Network": "10.44.0.0/16"})
OWN_SUBNET = IPv4Network("10.44.1.0/24")
MAC_B = "0a:00:00:00:00:0b"
MAC_C = "0a:00:00:00:00:0c"


def lease(subnet: str, public_ip: str | None, mac: Any = MAC_B, vni: Any = 1, **extra: Any) -> Lease:
    data: dict[str, Any] = {"VNI": vni, "VtepMAC": mac, **extra}
    data = {k: v for k, v in data.items() if v is not None}
    ip = IPv4Address(public_ip) if public_ip else None
    return Lease(IPv4Network(subnet), LeaseAttrs(ip, "vxlan", data), None)


OWN = lease(str(OWN_SUBNET), "192.0.2.1", mac="0a:00:00:00:00:0a")
PEER_B = lease("10.44.2.0/24", "192.0.2.2", MAC_B)
PEER_C = lease("10.44.3.0/24", "198.51.100.3", MAC_C)


# -- unit: planning, settings, peer checks (no kernel) ------------------------------------------------


def offline_network(direct_routing: bool = False, vni: int = 1) -> VxlanNetwork:
    from overlayd.backends.vxlan import DeviceSpec, Vtep

    settings = VxlanSettings(vni=vni, port=8472, mtu=0, gbp=False, direct_routing=direct_routing)
    host = HostInfo("eth0", 2, 1500, IPv4Address("192.0.2.1"), iface_addr=IPv4Address("192.0.2.1"))
    spec = DeviceSpec(f"flannel.{vni}", vni, IPv4Address("192.0.2.1"), 2, 8472, False, 1450)
    vtep = Vtep(spec, MacAddress.parse("0a:00:00:00:00:0a"))
    return VxlanNetwork(settings, host, [vtep], frozenset({IPv4Network("192.0.2.0/24")}))


def test_plan_desired_state_and_second_pass_empty() -> None:
    net = offline_network()
    garbled = lease("10.44.9.0/24", "192.0.2.9", mac="not-a-mac")
    stale_own = lease("10.44.8.0/24", "192.0.2.1", mac="0a:00:00:00:00:0a")
    desired = net.desired_state(OWN, [OWN, PEER_B, PEER_C, garbled, stale_own])
    assert desired == {
        Neighbour(IPv4Address("10.44.2.0"), MAC_B, "flannel.1"),
        FdbEntry(MAC_B, IPv4Address("192.0.2.2"), "flannel.1"),
        Route(IPv4Network("10.44.2.0/24"), "flannel.1", IPv4Address("10.44.2.0"), onlink=True),
        Neighbour(IPv4Address("10.44.3.0"), MAC_C, "flannel.1"),
        FdbEntry(MAC_C, IPv4Address("198.51.100.3"), "flannel.1"),
        Route(IPv4Network("10.44.3.0/24"), "flannel.1", IPv4Address("10.44.3.0"), onlink=True),
    }
    first = planmod.diff(desired, frozenset())
    after = planmod.simulate(frozenset(), first)
    assert planmod.diff(desired, after).empty
    # a peer's VTEP MAC changes: neighbour replaced in place, old FDB entry removed
    moved = attrs.evolve(PEER_B, attrs=attrs.evolve(PEER_B.attrs, backend_data={"VNI": 1, "VtepMAC": MAC_C}))
    plan = planmod.diff(net.desired_state(OWN, [moved]), after)
    assert Neighbour(IPv4Address("10.44.2.0"), MAC_B, "flannel.1") not in plan.removals()
    assert FdbEntry(MAC_B, IPv4Address("192.0.2.2"), "flannel.1") in plan.removals()


def test_plan_direct_routing_only_on_connected_segment() -> None:
    desired = offline_network(direct_routing=True).desired_state(OWN, [PEER_B, PEER_C])
    assert Route(IPv4Network("10.44.2.0/24"), "eth0", IPv4Address("192.0.2.2")) in desired
    assert not any(isinstance(o, Neighbour | FdbEntry) and o.dst == IPv4Address("192.0.2.2") for o in desired)
    assert FdbEntry(MAC_C, IPv4Address("198.51.100.3"), "flannel.1") in desired


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (lease("10.44.2.0/24", "192.0.2.2", mac=None), "VtepMAC"),
        (lease("10.44.2.0/24", "192.0.2.2", mac="zz:00:00:00:00:01"), "VtepMAC"),
        (lease("10.44.2.0/24", "192.0.2.2", mac="01:00:5e:00:00:01"), "unicast"),
        (lease("10.44.2.0/24", "192.0.2.2", mac=42), "VtepMAC"),
        (lease("10.44.2.0/24", "192.0.2.2", vni=2), "VNI"),
        (lease("10.44.2.0/24", "192.0.2.2", vni="1"), "VNI"),
        (lease("10.44.2.0/24", None), "PublicIP"),
    ],
)
def test_check_peer_rejects_garbled(bad: Lease, message: str) -> None:
    net = offline_network()
    with pytest.raises(GarbledLease, match=message):
        net.check_peer(bad)
    assert net.desired_state(OWN, [bad]) == frozenset()


def test_settings_config_keys_win_over_options() -> None:
    options = VxlanOptions(vni=5, port=4789)
    settings = VxlanSettings.resolve(options, {"Type": "vxlan", "vni": 7, "DirectRouting": True})
    assert (settings.vni, settings.port, settings.direct_routing, settings.device) == (7, 4789, True, "flannel.7")
    assert VxlanSettings.resolve(VxlanOptions(), {"Port": 0}).port == 8472
    for bad in ({"VNI": "1"}, {"VNI": 1 << 24}, {"GBP": "yes"}, {"MTU": 20}):
        with pytest.raises(ConfigError):
            VxlanSettings.resolve(VxlanOptions(), bad)
    assert VxlanOptions(gbp="true", vni="3").gbp is True  # type: ignore[arg-type]


def test_plan_over_an_ipv6_underlay_uses_public_ipv6() -> None:
    from overlayd.backends.vxlan import DeviceSpec, Vtep, vxlan_mtu

    local6 = IPv6Address("2001:db8::1")
    settings = VxlanSettings(vni=1, port=8472, mtu=0, gbp=False, direct_routing=True)
    host = HostInfo("eth0", 2, 1500, None, public_ipv6=local6)
    spec = DeviceSpec("flannel.1", 1, local6, 2, 8472, False, vxlan_mtu(1500, ipv6_underlay=True))
    net = VxlanNetwork(settings, host, [Vtep(spec, MacAddress.parse("0a:00:00:00:00:0a"))], frozenset())
    assert net.mtu == 1430
    peer = attrs.evolve(PEER_B, attrs=attrs.evolve(PEER_B.attrs, public_ipv6=IPv6Address("2001:db8::2")))
    assert FdbEntry(MAC_B, IPv6Address("2001:db8::2"), "flannel.1") in net.desired_state(OWN, [peer])
    with pytest.raises(GarbledLease, match="PublicIPv6"):
        net.check_peer(PEER_B)


def test_offline_network_plans_without_touching_anything() -> None:
    host = HostInfo("", 0, 1500, IPv4Address("192.0.2.1"))
    net = VxlanBackend(VxlanOptions()).offline(CONFIG, host, OWN)
    assert isinstance(net, VxlanNetwork) and net.offline
    assert net.backend_data == {"VNI": 1, "VtepMAC": "0a:00:00:00:00:0a"}
    assert len(net.desired_state(OWN, [PEER_B, PEER_C])) == 6
    with pytest.raises(PermanentError, match="dry run"):
        net.apply(planmod.Plan(add=frozenset({Route(IPv4Network("10.44.2.0/24"), "flannel.1")})))


def test_mtu_above_the_underlay_limit_is_a_config_error() -> None:
    host = HostInfo("eth0", 0, 1500, IPv4Address("192.0.2.1"))
    too_big = NetworkConfig.from_dict({"Network": "10.44.0.0/16", "Backend": {"Type": "vxlan", "MTU": 1451}})
    with pytest.raises(ConfigError, match="at most 1450"):
        VxlanBackend(VxlanOptions()).offline(too_big, host, OWN)
    assert VxlanBackend(VxlanOptions(mtu=1450)).offline(CONFIG, host, OWN).mtu == 1450


def test_describe_gives_the_vtep_mac_column() -> None:
    from overlayd.backends.alloc import AllocBackend

    assert VxlanBackend.describe(PEER_B) == {"VtepMAC": MAC_B}
    assert VxlanBackend.describe(lease("10.44.2.0/24", "192.0.2.2", mac=None)) == {"VtepMAC": "-"}
    assert AllocBackend.describe(PEER_B) == {}


def test_derived_mac_is_stable_unicast_and_local() -> None:
    mac = derived_mac(1, IPv4Address("192.0.2.1"))
    assert mac == derived_mac(1, IPv4Address("192.0.2.1")) != derived_mac(1, IPv4Address("192.0.2.2"))
    assert mac.is_unicast and mac.packed[0] & 0x02


# -- functional: real kernel in namespaces -------------------------------------------------------------


@attrs.frozen
class Host:
    ns: str
    peer_ns: str
    info: HostInfo


@pytest.fixture
def host(netns_factory: Callable[..., str]) -> Host:
    ns, peer = netns_factory("h"), netns_factory("p")
    probe = run(ns, "ip", "link", "add", "probe0", "type", "vxlan", "id", "1", "dstport", "0", check=False)
    if probe.returncode != 0:
        pytest.skip(f"this kernel cannot make VXLAN devices: {probe.stderr.strip()}")
    run(ns, "ip", "link", "del", "probe0")
    veth(ns, "eth0", peer, "eth0", "192.0.2.1/24", "192.0.2.2/24")
    index = ip_json(ns, "link", "show", "eth0")[0]["ifindex"]
    ip = IPv4Address("192.0.2.1")
    return Host(ns, peer, HostInfo("eth0", index, 1500, ip, iface_addr=ip))


def prepare(host: Host, config: NetworkConfig = CONFIG, **options: Any) -> VxlanNetwork:
    mac = options.pop("mac", None)
    with in_netns(host.ns):
        net = VxlanBackend(VxlanOptions(**options)).prepare(config, host.info, mac=mac)
    assert isinstance(net, VxlanNetwork)
    return net


def up(host: Host, own: Lease = OWN, **options: Any) -> VxlanNetwork:
    net = prepare(host, **options)
    with in_netns(host.ns):
        net.activate(own)
    return net


def reconcile(host: Host, net: VxlanNetwork, peers: Sequence[Lease], own: Lease = OWN) -> planmod.Plan[Any]:
    with in_netns(host.ns):
        plan = planmod.diff(net.desired_state(own, peers), net.actual_state())
        net.apply(plan)
    return plan


def device(ns: str, name: str = "flannel.1") -> dict[str, Any]:
    links = ip_json(ns, "-d", "link", "show")
    matches = [link for link in links if link["ifname"] == name]
    assert matches, f"{name} not in {ns}"
    result: dict[str, Any] = matches[0]
    return result


def neighbours(ns: str) -> set[tuple[str, str]]:
    return {
        (n["dst"], n["lladdr"])
        for n in ip_json(ns, "neigh", "show", "dev", "flannel.1")
        if "PERMANENT" in n.get("state", [])
    }


def fdb(ns: str) -> set[tuple[str, str]]:
    return {
        (e["mac"], e["dst"])
        for e in bridge_json(ns, "fdb", "show", "dev", "flannel.1")
        if e.get("state") == "permanent" and "dst" in e
    }


def routes(ns: str) -> dict[str, dict[str, Any]]:
    return {r["dst"]: r for r in ip_json(ns, "route", "show")}


def our_routes(ns: str) -> set[tuple[str, str | None, str, bool]]:
    return {
        (dst, r.get("gateway"), r["dev"], "onlink" in r.get("flags", []))
        for dst, r in routes(ns).items()
        if r.get("protocol") in ("79", "overlayd")
    }


VXLAN_B = {("10.44.2.0/24", "10.44.2.0", "flannel.1", True)}


@pytest.mark.root
def test_device_created_as_specified(host: Host) -> None:
    net = up(host)
    link = device(host.ns)
    data = link["linkinfo"]["info_data"]
    assert link["linkinfo"]["info_kind"] == "vxlan"
    assert (data["id"], data["local"], data["port"], data["learning"], data["link"]) == (
        1,
        "192.0.2.1",
        8472,
        False,
        "eth0",
    )
    assert link["mtu"] == 1450 == net.mtu
    assert "UP" in link["flags"]
    assert link["address"] == net.backend_data["VtepMAC"]
    assert dict(net.backend_data) == {"VNI": 1, "VtepMAC": link["address"]}
    addrs = ip_json(host.ns, "addr", "show", "dev", "flannel.1")[0]["addr_info"]
    assert [(a["local"], a["prefixlen"]) for a in addrs if a["family"] == "inet"] == [("10.44.1.0", 32)]


@pytest.mark.root
def test_config_backend_keys_shape_the_device(host: Host) -> None:
    config = NetworkConfig.from_dict(
        {"Network": "10.44.0.0/16", "Backend": {"Type": "vxlan", "VNI": 7, "Port": 4789, "GBP": True, "MTU": 1400}}
    )
    net = prepare(host, config, vni=3)
    link = device(host.ns, "flannel.7")
    data = link["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data.get("gbp"), link["mtu"]) == (7, 4789, True, 1400)
    assert net.backend_data["VNI"] == 7 and net.mtu == 1400


@pytest.mark.root
def test_stale_address_removed_on_activate(host: Host) -> None:
    prepare(host)
    run(host.ns, "ip", "addr", "add", "10.44.77.0/32", "dev", "flannel.1")
    net = prepare(host)
    with in_netns(host.ns):
        net.activate(OWN)
    addrs = ip_json(host.ns, "addr", "show", "dev", "flannel.1")[0]["addr_info"]
    assert [a["local"] for a in addrs if a["family"] == "inet"] == ["10.44.1.0"]


@pytest.mark.root
def test_peer_entries_programmed_and_idempotent(host: Host) -> None:
    net = up(host)
    first = reconcile(host, net, [OWN, PEER_B, PEER_C])
    assert len(first.add) == 6 and not first.remove
    assert neighbours(host.ns) == {("10.44.2.0", MAC_B), ("10.44.3.0", MAC_C)}
    assert fdb(host.ns) == {(MAC_B, "192.0.2.2"), (MAC_C, "198.51.100.3")}
    assert our_routes(host.ns) == VXLAN_B | {("10.44.3.0/24", "10.44.3.0", "flannel.1", True)}
    assert reconcile(host, net, [OWN, PEER_B, PEER_C]).empty


@pytest.mark.root
def test_drift_is_repaired(host: Host) -> None:
    net = up(host)
    reconcile(host, net, [PEER_B, PEER_C])
    run(host.ns, "ip", "route", "del", "10.44.2.0/24")
    run(host.ns, "ip", "neigh", "del", "10.44.3.0", "dev", "flannel.1")
    run(host.ns, "bridge", "fdb", "del", MAC_B, "dev", "flannel.1", "dst", "192.0.2.2")
    # a stray entry (all-zeros flood MAC: may hold several remotes), and a wrong neighbour MAC
    run(host.ns, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "flannel.1", "dst", "203.0.113.9")
    run(host.ns, "bridge", "fdb", "append", "00:00:00:00:00:00", "dev", "flannel.1", "dst", "203.0.113.10")
    wrong = ("10.44.2.0", "lladdr", "0a:00:00:00:00:ee", "dev", "flannel.1", "nud", "permanent")
    run(host.ns, "ip", "neigh", "replace", *wrong)
    plan = reconcile(host, net, [PEER_B, PEER_C])
    assert len(plan.add) == 4 and len(plan.remove) == 3
    assert neighbours(host.ns) == {("10.44.2.0", MAC_B), ("10.44.3.0", MAC_C)}
    assert fdb(host.ns) == {(MAC_B, "192.0.2.2"), (MAC_C, "198.51.100.3")}
    assert "10.44.2.0/24" in routes(host.ns)
    assert reconcile(host, net, [PEER_B, PEER_C]).empty


@pytest.mark.root
def test_removed_peer_is_unprogrammed_and_foreign_routes_untouched(host: Host) -> None:
    run(host.ns, "ip", "route", "add", "10.44.200.0/24", "via", "192.0.2.2", "dev", "eth0")
    run(host.ns, "ip", "route", "add", "10.44.201.0/24", "via", "192.0.2.2", "dev", "eth0", "proto", "boot")
    net = up(host)
    reconcile(host, net, [PEER_B, PEER_C])
    plan = reconcile(host, net, [PEER_B])
    assert len(plan.removals()) == 3 and not plan.add
    assert neighbours(host.ns) == {("10.44.2.0", MAC_B)}
    assert fdb(host.ns) == {(MAC_B, "192.0.2.2")}
    assert our_routes(host.ns) == VXLAN_B
    reconcile(host, net, [])
    with in_netns(host.ns):
        net.teardown()
    left = routes(host.ns)
    assert {"10.44.200.0/24", "10.44.201.0/24"} <= left.keys()
    assert left["10.44.201.0/24"].get("protocol", "boot") == "boot"  # ip -j omits the default
    assert not [link for link in ip_json(host.ns, "link", "show") if link["ifname"] == "flannel.1"]


@pytest.mark.root
def test_direct_routing_for_peers_on_the_segment(host: Host) -> None:
    net = up(host, direct_routing=True)
    reconcile(host, net, [PEER_B, PEER_C])
    assert our_routes(host.ns) == {
        ("10.44.2.0/24", "192.0.2.2", "eth0", False),
        ("10.44.3.0/24", "10.44.3.0", "flannel.1", True),
    }
    assert neighbours(host.ns) == {("10.44.3.0", MAC_C)}
    assert fdb(host.ns) == {(MAC_C, "198.51.100.3")}
    assert reconcile(host, net, [PEER_B, PEER_C]).empty
    with in_netns(host.ns):
        net.teardown()
    assert our_routes(host.ns) == set()


@pytest.mark.root
def test_compatible_device_kept_with_its_mac(host: Host) -> None:
    first = prepare(host)
    index = device(host.ns)["ifindex"]
    again = prepare(host, mac="0a:00:00:00:00:99")  # a preferred MAC only applies on creation
    assert first.created and not again.created
    assert again.backend_data == first.backend_data
    assert device(host.ns)["ifindex"] == index


@pytest.mark.root
def test_given_mac_used_on_creation(host: Host) -> None:
    net = prepare(host, mac="0A:00:00:00:00:99")
    assert net.created
    assert device(host.ns)["address"] == "0a:00:00:00:00:99" == net.backend_data["VtepMAC"]


@pytest.mark.root
@pytest.mark.parametrize(
    "existing",
    [
        ("type", "vxlan", "id", "9", "dstport", "4789", "dev", "eth0"),
        ("type", "vxlan", "id", "1", "dstport", "8472", "dev", "eth0", "local", "192.0.2.1"),  # learning on
        ("type", "bridge"),
    ],
)
def test_incompatible_device_replaced(host: Host, existing: tuple[str, ...]) -> None:
    run(host.ns, "ip", "link", "add", "flannel.1", *existing)
    assert prepare(host).created
    data = device(host.ns)["linkinfo"]["info_data"]
    assert (data["id"], data["port"], data["local"], data["learning"]) == (1, 8472, "192.0.2.1", False)


@pytest.mark.root
def test_deleted_device_is_recreated_with_same_mac(host: Host) -> None:
    net = up(host)
    reconcile(host, net, [PEER_B])
    run(host.ns, "ip", "link", "del", "flannel.1")
    plan = reconcile(host, net, [PEER_B])
    assert len(plan.add) == 3
    assert device(host.ns)["address"] == net.backend_data["VtepMAC"]
    assert our_routes(host.ns) == VXLAN_B and fdb(host.ns) == {(MAC_B, "192.0.2.2")}


@pytest.mark.root
def test_copycat_vtep_mac_does_not_take_host1s_traffic(host: Host) -> None:
    """Issue 10 item 4 on the real kernel: host 1's FDB entry survives a lease copying its MAC."""
    from overlayd.peers import valid_peers

    net = up(host)
    own = lease(str(OWN_SUBNET), "192.0.2.1", mac=str(net.mac))  # what this host publishes
    host1 = attrs.evolve(PEER_B, created_revision=5)
    copycat = attrs.evolve(lease("10.44.10.0/24", "198.51.100.9", MAC_B), created_revision=9, revision=9)
    thief = attrs.evolve(lease("10.44.11.0/24", "198.51.100.10", str(net.mac)), created_revision=1)
    reports: list[tuple[str, int, str]] = []
    for seen in ([host1], [host1, copycat, thief]):  # the copycats appear after host 1 was programmed
        peers = valid_peers(CONFIG, net, own, seen, lambda *r: reports.append(r))
        reconcile(host, net, peers, own=own)
    assert fdb(host.ns) == {(MAC_B, "192.0.2.2")}
    assert our_routes(host.ns) == VXLAN_B
    assert str(net.mac) not in {mac for mac, _ in fdb(host.ns)}
    assert sorted(key for key, _, _ in reports) == [copycat.key, thief.key]


def _counters(ns: str) -> tuple[int, int]:
    stats = ip_json(ns, "-s", "link", "show", "flannel.1")[0]["stats64"]
    return stats["tx"]["packets"], stats["rx"]["packets"]


@pytest.mark.root
def test_two_hosts_ping_across_the_overlay(netns_factory: Callable[..., str]) -> None:
    a, b = netns_factory("a"), netns_factory("b")
    veth(a, "eth0", b, "eth0", "192.0.2.1/24", "192.0.2.2/24")
    hosts, leases, nets = {}, {}, {}
    for ns, ip, subnet in ((a, "192.0.2.1", "10.44.1.0/24"), (b, "192.0.2.2", "10.44.2.0/24")):
        index = ip_json(ns, "link", "show", "eth0")[0]["ifindex"]
        hosts[ns] = Host(ns, "", HostInfo("eth0", index, 1500, IPv4Address(ip), iface_addr=IPv4Address(ip)))
        nets[ns] = prepare(hosts[ns])
        leases[ns] = Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(ip), "vxlan", nets[ns].backend_data), None)
    for ns in (a, b):
        with in_netns(ns):
            nets[ns].activate(leases[ns])
        reconcile(hosts[ns], nets[ns], list(leases.values()), own=leases[ns])
    # the overlay is reachable only through flannel.1: the underlay has no 10.x route at all
    assert ip_json(a, "route", "get", "10.44.2.0")[0]["dev"] == "flannel.1"
    tx_a, _ = _counters(a)
    _, rx_b = _counters(b)
    run(a, "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.44.2.0")
    assert _counters(a)[0] >= tx_a + 3 and _counters(b)[1] >= rx_b + 3
    # without the FDB entry the encapsulated frame has nowhere to go
    run(a, "bridge", "fdb", "del", str(nets[b].backend_data["VtepMAC"]), "dev", "flannel.1", "dst", "192.0.2.2")
    assert run(a, "ping", "-c", "1", "-W", "1", "10.44.2.0", check=False).returncode != 0
    reconcile(hosts[a], nets[a], list(leases.values()), own=leases[a])
    run(a, "ping", "-c", "1", "-W", "2", "10.44.2.0")


def test_netlink_mac_parsing() -> None:
    assert str(MacAddress.parse("AA-BB-CC-DD-EE-FF")) == "aa:bb:cc:dd:ee:ff"
    for bad in ("aa:bb", "aa:bb:cc:dd:ee:gg", "", None, "aabb.ccdd.eeff"):
        with pytest.raises(ValueError):
            MacAddress.parse(bad)
    assert netlink.RTPROT_OVERLAYD == 79


# -- the namespace fixtures themselves -------------------------------------------------------------------


@pytest.mark.root
def test_netns_fixtures_segment_and_isolation(netns: str, netns_factory: Callable[..., str]) -> None:
    from overlayd.testing.netns import RUN_PREFIX, Segment, call_in_netns, delete_netns

    assert netns.startswith(RUN_PREFIX)
    segment = Segment(netns_factory("sw"))
    b = netns_factory("b")
    segment.attach(netns, "eth0", "203.0.113.1/24")
    segment.attach(b, "eth0", "203.0.113.2/24")
    run(netns, "ping", "-c", "1", "-W", "2", "203.0.113.2")

    def names() -> set[str]:
        with netlink.iproute() as ipr:
            return set(netlink.link_names(ipr).values())

    before = os.stat("/proc/thread-self/ns/net").st_ino
    assert call_in_netns(netns, names) == {"lo", "eth0"}
    assert os.stat("/proc/thread-self/ns/net").st_ino == before  # back where we started
    with pytest.raises(ValueError, match="refusing"):
        delete_netns("default")


# -- netlink.apply_plan ordering and errno handling (recording fake, no kernel) ------------------------------


class RecordingIPRoute:
    """Just enough of pyroute2's IPRoute for apply_plan: records calls, raises on demand."""

    def __init__(self, fail: dict[tuple[str, str], int] | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail = fail or {}

    def _call(self, what: str, command: str) -> list[Any]:
        from pyroute2.netlink.exceptions import NetlinkError

        self.calls.append((what, command))
        if (what, command) in self.fail:
            raise NetlinkError(self.fail[(what, command)])
        return []

    def link(self, command: str, **kwargs: Any) -> list[Any]:
        return [{"index": 7, "ifname": kwargs.get("ifname"), "flags": 1, "mtu": 1450}]

    def neigh(self, command: str, **kwargs: Any) -> list[Any]:
        return self._call("neigh", command)

    def fdb(self, command: str, **kwargs: Any) -> list[Any]:
        return self._call("fdb", command)

    def route(self, command: str, **kwargs: Any) -> list[Any]:
        return self._call("route", command)


def _mixed_plan() -> planmod.Plan[Any]:
    net = offline_network()
    return planmod.Plan(add=net.desired_state(OWN, [PEER_B]), remove=net.desired_state(OWN, [PEER_C]))


def test_apply_plan_orders_adds_and_removals() -> None:
    ipr = RecordingIPRoute()
    netlink.apply_plan(ipr, _mixed_plan())
    assert ipr.calls == [
        ("neigh", "replace"),
        ("fdb", "replace"),
        ("route", "replace"),
        ("route", "del"),
        ("fdb", "del"),
        ("neigh", "del"),
    ]


def test_apply_plan_errno_handling() -> None:
    import errno

    from overlayd.errors import KernelError

    gone = {("route", "del"): errno.ESRCH, ("fdb", "del"): errno.ENOENT, ("neigh", "del"): errno.ENODEV}
    netlink.apply_plan(RecordingIPRoute(gone), _mixed_plan())  # already gone counts as done
    with pytest.raises(KernelError, match=r"FDB entry .* lacks VXLAN FDB entries"):
        netlink.apply_plan(RecordingIPRoute({("fdb", "replace"): errno.EOPNOTSUPP}), _mixed_plan())
    with pytest.raises(KernelError, match=r"route .*\(errno 1\).*CAP_NET_ADMIN"):
        netlink.apply_plan(RecordingIPRoute({("route", "replace"): errno.EPERM}), _mixed_plan())


# -- dual stack: planning and settings (the kernel side is in tests/test_dualstack_kernel.py) ------------

DUAL = NetworkConfig.from_dict({"Network": "10.44.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00::/48"})
DUAL_HOST = HostInfo("eth0", 0, 1500, IPv4Address("192.0.2.1"), IPv6Address("2001:db8::1"), IPv4Address("192.0.2.1"))


def test_dual_stack_offline_network_has_one_device_per_family() -> None:
    from overlayd.backends.vxlan import device_name, vxlan_mtu

    own = attrs.evolve(OWN, ipv6_subnet=IPv6Network("fd00:0:0:1::/64"))
    net = VxlanBackend(VxlanOptions(vni=4)).offline(DUAL, DUAL_HOST, own)
    assert isinstance(net, VxlanNetwork)
    assert net.owned_devices() == ("flannel.4", "flannel-v6.4") == (device_name(4, 4), device_name(4, 6))
    assert [v.spec.mtu for v in net.vteps.values()] == [1450, 1430] and net.mtu == 1430 == vxlan_mtu(1500, True)
    assert net.backend_v6_data == {"VNI": 4, "VtepMAC": str(derived_mac(4, IPv6Address("2001:db8::1")))}
    assert net.vteps[6].spec.local == IPv6Address("2001:db8::1") and net.vteps[6].spec.family == 6
    scope = net.kernel_cache()
    assert scope is None  # planning only
    v6only = NetworkConfig.from_dict({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00::/48"})
    only6 = VxlanBackend(VxlanOptions()).offline(v6only, DUAL_HOST, own.only(6))
    assert isinstance(only6, VxlanNetwork) and only6.owned_devices() == ("flannel-v6.1",)
    assert only6.backend_data == {} and only6.device == "flannel-v6.1"


def test_dual_stack_mtu_and_address_errors_name_the_v6_device() -> None:
    own = attrs.evolve(OWN, ipv6_subnet=IPv6Network("fd00:0:0:1::/64"))
    mtu1450 = NetworkConfig.from_dict({**DUAL.to_dict(), "Backend": {"Type": "vxlan", "MTU": 1450}})
    with pytest.raises(ConfigError, match=r"MTU 1450 does not fit flannel-v6\.1 .* at most 1430"):
        VxlanBackend(VxlanOptions()).offline(mtu1450, DUAL_HOST, own)
    small = attrs.evolve(DUAL_HOST, iface_mtu=1300)
    with pytest.raises(ConfigError, match=r"below IPv6's minimum of 1280.*at least 1350"):
        VxlanBackend(VxlanOptions()).offline(DUAL, small, own)
    with pytest.raises(ConfigError, match=r"no global IPv6 address.*--public-ipv6"):
        VxlanBackend(VxlanOptions()).offline(DUAL, attrs.evolve(DUAL_HOST, public_ipv6=None), own)


def test_dual_stack_direct_routing_and_describe() -> None:
    from overlayd.backends.vxlan import DeviceSpec, Vtep

    settings = VxlanSettings(vni=1, port=8472, mtu=0, gbp=False, direct_routing=True)
    spec4 = DeviceSpec("flannel.1", 1, IPv4Address("192.0.2.1"), 2, 8472, False, 1450)
    spec6 = DeviceSpec("flannel-v6.1", 1, IPv6Address("2001:db8::1"), 2, 8472, False, 1430, family=6)
    vteps = [Vtep(spec4, MacAddress.parse("0a:00:00:00:00:0a")), Vtep(spec6, MacAddress.parse("0a:00:00:00:06:0a"))]
    connected = frozenset({IPv4Network("192.0.2.0/24"), IPv6Network("2001:db8::/64")})
    net = VxlanNetwork(settings, DUAL_HOST, vteps, connected)
    near = Lease(
        None,
        LeaseAttrs(None, "vxlan", {}, IPv6Address("2001:db8::2"), {"VNI": 1, "VtepMAC": MAC_B}),
        None,
        ipv6_subnet=IPv6Network("fd00:0:0:2::/64"),
    )
    far = attrs.evolve(near, ipv6_subnet=IPv6Network("fd00:0:0:3::/64"))
    far = attrs.evolve(far, attrs=attrs.evolve(far.attrs, public_ipv6=IPv6Address("2001:db8:1::3")))
    own = attrs.evolve(OWN, ipv6_subnet=IPv6Network("fd00:0:0:1::/64"))
    assert net.desired_state(own, [near]) == {Route(IPv6Network("fd00:0:0:2::/64"), "eth0", IPv6Address("2001:db8::2"))}
    assert FdbEntry(MAC_B, IPv6Address("2001:db8:1::3"), "flannel-v6.1") in net.desired_state(own, [far])
    merged = attrs.evolve(near, subnet=IPv4Network("10.44.2.0/24"))
    merged = attrs.evolve(merged, attrs=attrs.evolve(merged.attrs, backend_data={"VtepMAC": MAC_C}))
    assert VxlanBackend.describe(merged) == {"VtepMAC": f"{MAC_C} {MAC_B}"}
    assert VxlanBackend.describe(near) == {"VtepMAC": MAC_B}
    assert VxlanBackend.probe_address(near) == IPv6Address("fd00:0:0:2::")
    assert VxlanBackend.probe_address(merged) == IPv4Address("10.44.2.0")
