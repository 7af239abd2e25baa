"""Dual stack and IPv6-only on the real kernel: vxlan's two devices, host-gw's v6 routes, the cache.

Three namespaces ("hosts") share one L2 segment (a bridge in a fourth namespace); each host's
``eth0`` has an IPv4 underlay address from 192.0.2.0/24 and an IPv6 one from 2001:db8::/64
(``nodad``, so they are usable at once).  Each host builds its own merged lease (both subnets,
both backend data) by hand, as the daemon will; the peers arrive per family, as the store gives
them (one lease per key, same attrs).  Kernel objects are read back with ``ip -j`` / ``bridge
-j`` inside the namespace, not through ``overlayd.netlink``, and traffic is proven with ping
between overlay addresses (fd00::/48, 10.44/16) across hosts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import attrs
import pytest
from overlayd import plan as planmod
from overlayd.backends.host_gw import HostGwBackend
from overlayd.backends.vxlan import VxlanBackend, VxlanNetwork, VxlanOptions, derived_mac
from overlayd.config import NetworkConfig
from overlayd.kernelcache import KernelCache
from overlayd.model import Lease, LeaseAttrs
from overlayd.netlink import FdbEntry, Neighbour, Route
from overlayd.peers import valid_peers
from overlayd.plugin import HostInfo, Network, NoOptions
from overlayd.routenet import RouteNetwork
from overlayd.testing.netns import Segment, bridge_json, in_netns, ip_json, netns_factory, run

__all__ = ["netns_factory"]  # the fixture, imported for pytest

DUAL = NetworkConfig.from_dict({"Network": "10.44.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00::/48"})
V6ONLY = NetworkConfig.from_dict({"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00::/48"})
HOSTGW_DUAL = NetworkConfig.from_dict(
    {"Network": "10.44.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00::/48", "Backend": {"Type": "host-gw"}}
)


def v4(i: int) -> IPv4Address:
    return IPv4Address(f"192.0.2.{i}")


def v6(i: int) -> IPv6Address:
    return IPv6Address(f"2001:db8::{i}")


def subnet4(i: int) -> IPv4Network:
    return IPv4Network(f"10.44.{i}.0/24")


def subnet6(i: int) -> IPv6Network:
    return IPv6Network(f"fd00:0:0:{i}::/64")


@attrs.frozen
class Host:
    i: int
    ns: str
    info: HostInfo


def _cluster(netns_factory: Callable[..., str], count: int, families: Sequence[int]) -> list[Host]:
    switch = Segment(netns_factory("sw"))
    hosts = []
    for i in range(1, count + 1):
        ns = netns_factory(f"h{i}")
        if run(ns, "sysctl", "-n", "net.ipv6.conf.all.disable_ipv6").stdout.strip() != "0":
            pytest.skip("IPv6 is disabled in new network namespaces here")
        switch.attach(ns, "eth0", f"{v4(i)}/24" if 4 in families else None)
        run(ns, "ip", "-6", "addr", "add", f"{v6(i)}/64", "dev", "eth0", "nodad")
        index = ip_json(ns, "link", "show", "eth0")[0]["ifindex"]
        ip4 = v4(i) if 4 in families else None
        hosts.append(Host(i, ns, HostInfo("eth0", index, 1500, ip4, public_ipv6=v6(i), iface_addr=ip4)))
    return hosts


@pytest.fixture
def dual(netns_factory: Callable[..., str]) -> list[Host]:
    probe_ns = netns_factory("probe")
    probe = run(probe_ns, "ip", "link", "add", "probe0", "type", "vxlan", "id", "1", "dstport", "0", check=False)
    if probe.returncode != 0:
        pytest.skip(f"this kernel cannot make VXLAN devices: {probe.stderr.strip()}")
    return _cluster(netns_factory, 3, (4, 6))


@pytest.fixture
def v6only(netns_factory: Callable[..., str]) -> list[Host]:
    return _cluster(netns_factory, 2, (6,))


def own_lease(host: Host, net: Network, config: NetworkConfig) -> Lease:
    """The merged lease this host holds (what the daemon acquires and activates with)."""
    attrs_ = LeaseAttrs(
        host.info.public_ip,
        config.backend_type,
        dict(net.backend_data),
        public_ipv6=host.info.public_ipv6,
        backend_v6_data=net.backend_v6_data,
    )
    return Lease(
        subnet4(host.i) if 4 in config.families else None,
        attrs_,
        None,
        ipv6_subnet=subnet6(host.i) if 6 in config.families else None,
    )


def per_key(leases: Sequence[Lease]) -> list[Lease]:
    """The leases as the store hands them to peers: one per key (family), same attrs."""
    return [lease.only(v) for lease in leases for v in lease.families]


def bring_up(hosts: Sequence[Host], config: NetworkConfig, backend: Any) -> tuple[list[Network], list[Lease]]:
    nets, owns = [], []
    for host in hosts:
        with in_netns(host.ns):
            net = backend.prepare(config, host.info)
        owns.append(own_lease(host, net, config))
        with in_netns(host.ns):
            net.activate(owns[-1])
        nets.append(net)
    return nets, owns


def reconcile(host: Host, net: Network, config: NetworkConfig, own: Lease, leases: Sequence[Lease]) -> Any:
    skipped: list[tuple[str, str]] = []
    peers = valid_peers(config, net, own, per_key(leases), lambda key, _rev, why: skipped.append((key, why)))
    assert not skipped, skipped
    with in_netns(host.ns):
        change = planmod.diff(net.desired_state(own, peers), net.actual_state())
        net.apply(change)
        assert planmod.diff(net.desired_state(own, peers), net.actual_state()).empty
    return change


def ping(ns: str, dst: str, src: str | None = None, count: int = 3) -> float:
    """Average RTT in ms of a ping that must succeed."""
    args = ["ping", "-n", "-q", "-c", str(count), "-i", "0.2", "-W", "2"]
    if ":" in dst:
        args.insert(1, "-6")
    if src:
        args += ["-I", src]
    proc = run(ns, *args, dst, check=False)
    assert proc.returncode == 0, f"ping {dst} from {ns} failed: {proc.stdout}{proc.stderr}"
    found = re.search(r"= [\d.]+/([\d.]+)/", proc.stdout)
    assert found, proc.stdout
    return float(found.group(1))


def link(ns: str, name: str) -> dict[str, Any] | None:
    found = [entry for entry in ip_json(ns, "-d", "link", "show") if entry["ifname"] == name]
    return found[0] if found else None


def routes6(ns: str) -> set[tuple[str, str | None, str, bool]]:
    return {
        (r["dst"], r.get("gateway"), r["dev"], "onlink" in r.get("flags", []))
        for r in ip_json(ns, "-6", "route", "show")
        if r.get("protocol") in ("79", "overlayd")
    }


def routes4(ns: str) -> set[tuple[str, str | None, str, bool]]:
    return {
        (r["dst"], r.get("gateway"), r["dev"], "onlink" in r.get("flags", []))
        for r in ip_json(ns, "-4", "route", "show")
        if r.get("protocol") in ("79", "overlayd")
    }


def neigh6(ns: str, dev: str) -> set[tuple[str, str]]:
    return {
        (n["dst"], n["lladdr"])
        for n in ip_json(ns, "-6", "neigh", "show", "dev", dev)
        if "PERMANENT" in n.get("state", [])
    }


def fdb(ns: str, dev: str) -> set[tuple[str, str]]:
    return {
        (e["mac"], e["dst"])
        for e in bridge_json(ns, "fdb", "show", "dev", dev)
        if e.get("state") == "permanent" and "dst" in e
    }


def addresses(ns: str, dev: str, family: str) -> list[tuple[str, int]]:
    info = ip_json(ns, "addr", "show", "dev", dev)[0]["addr_info"]
    return [(a["local"], a["prefixlen"]) for a in info if a["family"] == family and a.get("scope") != "link"]


# -- vxlan, dual stack ----------------------------------------------------------------------------------


@pytest.mark.root
def test_vxlan_dual_stack_two_devices_and_pings_across_hosts(dual: list[Host]) -> None:
    nets, owns = bring_up(dual, DUAL, VxlanBackend(VxlanOptions()))
    h1, h2, h3 = dual
    for host, net in zip(dual, nets, strict=True):
        assert isinstance(net, VxlanNetwork) and net.owned_devices() == ("flannel.1", "flannel-v6.1")
        dev6 = link(host.ns, "flannel-v6.1")
        assert dev6 is not None
        data = dev6["linkinfo"]["info_data"]
        assert (data["id"], data["local6"], data["port"], data["learning"], data["link"]) == (
            1,
            str(v6(host.i)),
            8472,
            False,
            "eth0",
        )
        assert dev6["mtu"] == 1430  # 1500 - 70 over an IPv6 underlay (flannel's 50 would be wrong)
        dev4 = link(host.ns, "flannel.1")
        assert dev4 is not None and dev4["mtu"] == 1450 and dev4["linkinfo"]["info_data"]["local"] == str(v4(host.i))
        assert net.mtu == 1430  # the containers' one MTU: the smaller of the two
        mac6 = derived_mac(1, v6(host.i))
        assert dev6["address"] == str(mac6) != dev4["address"]
        assert net.backend_v6_data == {"VNI": 1, "VtepMAC": str(mac6)}
        assert net.backend_data == {"VNI": 1, "VtepMAC": dev4["address"]}
        assert addresses(host.ns, "flannel-v6.1", "inet6") == [(f"fd00:0:0:{host.i}::", 128)]
        assert addresses(host.ns, "flannel.1", "inet") == [(f"10.44.{host.i}.0", 32)]
        assert "UP" in dev6["flags"]

    for host, net, own in zip(dual, nets, owns, strict=True):
        change = reconcile(host, net, DUAL, own, owns)
        assert len(change.add) == 12  # 2 peers x 2 families x (route, neighbour, FDB entry)

    others = [h for h in dual if h is not h1]
    assert routes6(h1.ns) == {(str(subnet6(h.i)), f"fd00:0:0:{h.i}::", "flannel-v6.1", True) for h in others}
    assert routes4(h1.ns) == {(str(subnet4(h.i)), f"10.44.{h.i}.0", "flannel.1", True) for h in others}
    macs6 = {h.i: str(derived_mac(1, v6(h.i))) for h in dual}
    assert neigh6(h1.ns, "flannel-v6.1") == {(f"fd00:0:0:{h.i}::", macs6[h.i]) for h in others}
    assert fdb(h1.ns, "flannel-v6.1") == {(macs6[h.i], str(v6(h.i))) for h in others}
    assert {dst for _mac, dst in fdb(h1.ns, "flannel.1")} == {str(v4(h.i)) for h in others}

    # overlay to overlay, both families: VTEP to VTEP, and to a "container" address behind h3
    run(h3.ns, "ip", "link", "add", "cni0", "type", "veth", "peer", "name", "cni0p")
    run(h3.ns, "ip", "addr", "add", "10.44.3.1/24", "dev", "cni0")
    run(h3.ns, "ip", "-6", "addr", "add", "fd00:0:0:3::1/64", "dev", "cni0", "nodad")
    run(h3.ns, "ip", "link", "set", "cni0", "up")
    run(h3.ns, "ip", "link", "set", "cni0p", "up")
    rtt6 = ping(h1.ns, "fd00:0:0:2::", count=10)
    rtt4 = ping(h1.ns, "10.44.2.0", count=10)
    ping(h1.ns, "fd00:0:0:3::1", src="fd00:0:0:1::")
    ping(h2.ns, "10.44.3.1", src="10.44.2.0")
    print(f"overlay ping RTT h1->h2: IPv6 {rtt6:.3f} ms, IPv4 {rtt4:.3f} ms")


@pytest.mark.root
def test_vxlan_dual_stack_cache_restart_and_teardown(dual: list[Host]) -> None:
    backend = VxlanBackend(VxlanOptions())
    nets, owns = bring_up(dual[:2], DUAL, backend)
    h1, net = dual[0], nets[0]
    assert isinstance(net, VxlanNetwork)
    reconcile(h1, net, DUAL, owns[0], owns)
    reconcile(dual[1], nets[1], DUAL, owns[1], owns)
    # the kernel cache covers both devices and both families, and sees drift on the v6 device
    scope = net.kernel_cache()
    assert scope is not None and scope.devices == ("flannel.1", "flannel-v6.1")
    with in_netns(h1.ns):
        cache = KernelCache(scope.devices, protocol=scope.protocol, table=scope.table)
        with cache, KernelCache(scope.devices, strict=False) as loose:
            assert cache.strict and cache.objects() == net.actual_state() == loose.objects()
            assert len(cache.objects()) == 6
            v6_objects = {o for o in cache.objects() if o.dev == "flannel-v6.1" or str(o).startswith("fd00")}
            assert {type(o) for o in v6_objects} == {Route, Neighbour, FdbEntry}
            cache.take_changes()
            run(h1.ns, "ip", "-6", "route", "del", str(subnet6(2)))
            run(h1.ns, "ip", "-6", "neigh", "del", "fd00:0:0:2::", "dev", "flannel-v6.1")
            run(h1.ns, "bridge", "fdb", "del", str(derived_mac(1, v6(2))), "dev", "flannel-v6.1", "dst", str(v6(2)))
            assert cache.drain()
            changed = cache.take_changes()
            assert ("route", 254, subnet6(2), 0) in changed and (
                "neigh",
                "flannel-v6.1",
                IPv6Address("fd00:0:0:2::"),
            ) in changed
            assert cache.objects() == net.actual_state()
            assert len(cache.objects()) == 3
    change = reconcile(h1, net, DUAL, owns[0], owns)  # drift repaired
    assert len(change.add) == 3

    # a restart keeps both devices and their MACs; an incompatible v6 device is recreated
    before = {name: link(h1.ns, name) for name in ("flannel.1", "flannel-v6.1")}
    with in_netns(h1.ns):
        again = backend.prepare(DUAL, h1.info)
    assert not again.created and again.backend_v6_data == net.backend_v6_data
    after = {name: link(h1.ns, name) for name in ("flannel.1", "flannel-v6.1")}
    assert {n: (d or {}).get("ifindex") for n, d in before.items()} == {
        n: (d or {}).get("ifindex") for n, d in after.items()
    }
    run(h1.ns, "ip", "link", "del", "flannel-v6.1")
    run(h1.ns, "ip", "-6", "addr", "add", "2001:db8::99/64", "dev", "eth0", "nodad")
    stale = ("type", "vxlan", "id", "1", "dstport", "8472", "dev", "eth0", "local", "2001:db8::99", "nolearning")
    run(h1.ns, "ip", "link", "add", "flannel-v6.1", *stale)
    with in_netns(h1.ns):
        third = backend.prepare(DUAL, h1.info)
    assert third.created and third.backend_v6_data == net.backend_v6_data  # derived: the same MAC again
    dev6 = link(h1.ns, "flannel-v6.1")
    assert dev6 is not None and dev6["linkinfo"]["info_data"]["local6"] == str(v6(1))

    # a deleted v6 device is recreated by the next apply, with its MAC and address
    with in_netns(h1.ns):
        third.activate(owns[0])
    reconcile(h1, third, DUAL, owns[0], owns)
    run(h1.ns, "ip", "link", "del", "flannel-v6.1")
    reconcile(h1, third, DUAL, owns[0], owns)
    assert addresses(h1.ns, "flannel-v6.1", "inet6") == [("fd00:0:0:1::", 128)]
    ping(h1.ns, "fd00:0:0:2::")

    with in_netns(h1.ns):
        third.teardown()
    assert link(h1.ns, "flannel.1") is None and link(h1.ns, "flannel-v6.1") is None
    assert routes6(h1.ns) == set() and routes4(h1.ns) == set()


@pytest.mark.root
def test_vxlan_ipv6_only_has_only_the_v6_device(v6only: list[Host]) -> None:
    nets, owns = bring_up(v6only, V6ONLY, VxlanBackend(VxlanOptions()))
    h1, _h2 = v6only
    for host, net, own in zip(v6only, nets, owns, strict=True):
        assert link(host.ns, "flannel.1") is None and link(host.ns, "flannel-v6.1") is not None
        assert net.backend_data == {} and net.backend_v6_data is not None
        assert net.mtu == 1430
        reconcile(host, net, V6ONLY, own, owns)
    assert routes6(h1.ns) == {(str(subnet6(2)), "fd00:0:0:2::", "flannel-v6.1", True)}
    assert fdb(h1.ns, "flannel-v6.1") == {(str(derived_mac(1, v6(2))), str(v6(2)))}
    assert VxlanBackend.probe_address(owns[1]) == IPv6Address("fd00:0:0:2::")
    assert VxlanBackend.describe(owns[1]) == {"VtepMAC": str(derived_mac(1, v6(2)))}
    ping(h1.ns, "fd00:0:0:2::")
    # a dual-stack config afterwards would need an IPv4 address; an IPv6-only restart keeps it all
    with in_netns(h1.ns):
        again = VxlanBackend(VxlanOptions()).prepare(V6ONLY, h1.info)
    assert not again.created


# -- host-gw, dual stack ----------------------------------------------------------------------------------


@pytest.mark.root
def test_host_gw_dual_stack_routes_via_public_ipv6(dual: list[Host]) -> None:
    nets, owns = bring_up(dual, HOSTGW_DUAL, HostGwBackend(NoOptions()))
    h1, h2, _h3 = dual
    for host, net, own in zip(dual, nets, owns, strict=True):
        assert isinstance(net, RouteNetwork) and net.backend_v6_data == {}
        reconcile(host, net, HOSTGW_DUAL, own, owns)
    others = [h for h in dual if h is not h1]
    assert routes6(h1.ns) == {(str(subnet6(h.i)), str(v6(h.i)), "eth0", False) for h in others}
    assert routes4(h1.ns) == {(str(subnet4(h.i)), str(v4(h.i)), "eth0", False) for h in others}
    for host in dual:
        run(host.ns, "ip", "link", "add", "cni0", "type", "veth", "peer", "name", "cni0p")
        run(host.ns, "ip", "-6", "addr", "add", f"fd00:0:0:{host.i}::1/64", "dev", "cni0", "nodad")
        run(host.ns, "ip", "addr", "add", f"10.44.{host.i}.1/24", "dev", "cni0")
        run(host.ns, "ip", "link", "set", "cni0", "up")
        run(host.ns, "ip", "link", "set", "cni0p", "up")
    ping(h1.ns, "fd00:0:0:3::1", src="fd00:0:0:1::1")
    ping(h2.ns, "10.44.1.1", src="10.44.2.1")


@pytest.mark.root
def test_host_gw_v6_peer_off_link_is_rejected(dual: list[Host]) -> None:
    nets, owns = bring_up(dual[:1], HOSTGW_DUAL, HostGwBackend(NoOptions()))
    far = attrs.evolve(owns[0], subnet=subnet4(9), ipv6_subnet=subnet6(9))
    far = attrs.evolve(far, attrs=attrs.evolve(far.attrs, public_ip=v4(9), public_ipv6=IPv6Address("2001:db8:1::9")))
    skipped: list[str] = []
    peers = valid_peers(HOSTGW_DUAL, nets[0], owns[0], per_key([far]), lambda _k, _r, why: skipped.append(why))
    assert [p.families for p in peers] == [(4,)]
    assert (
        len(skipped) == 1 and "PublicIPv6 2001:db8:1::9 is not on-link on eth0 (connected: 2001:db8::/64)" in skipped[0]
    )


@pytest.mark.root
def test_netlink_reads_ipv6_interfaces_and_keeps_link_local(v6only: list[Host]) -> None:
    import socket

    from overlayd import netlink

    nets, owns = bring_up(v6only[:1], V6ONLY, VxlanBackend(VxlanOptions()))
    h1 = v6only[0]
    run(h1.ns, "ip", "-6", "addr", "add", "fd00:0:0:77::/128", "dev", "flannel-v6.1", "nodad")  # stale
    with in_netns(h1.ns):
        nets[0].activate(owns[0])  # again: the stale address goes, link-local stays
        with netlink.iproute() as ipr:
            found = {link_.name: addrs for link_, addrs in netlink.interfaces(ipr, socket.AF_INET6)}
            egress = netlink.route_get(ipr, IPv6Address("2001:db8::2"))
    info = ip_json(h1.ns, "addr", "show", "dev", "flannel-v6.1")[0]["addr_info"]
    assert sorted(a["local"] for a in info if a["family"] == "inet6" and a.get("scope") != "link") == ["fd00:0:0:1::"]
    assert any(a["local"].startswith("fe80:") for a in info if a["family"] == "inet6")
    assert found["eth0"] == (v6(1),) and found["flannel-v6.1"] == (IPv6Address("fd00:0:0:1::"),)
    assert [e.oif for e in egress] == [h1.info.iface_index]
