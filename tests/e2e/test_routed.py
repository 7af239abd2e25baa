"""Route backends end to end: host-gw on one segment, and vxlan DirectRouting across a router.

The cluster has hosts on the switch (one L2 segment) and, with ``add_routed_host``, a host on a
second segment one routed hop away (a router namespace between the two bridges).  The real
``overlayd`` runs in each host; routes are read back with ``ip -j route`` in the host namespaces
and reachability is proven with pings between container namespaces.
"""

from __future__ import annotations

import time
from ipaddress import IPv4Network

import pytest
from overlayd import _topology as topo

from ._mesh import DRIFT_REPAIR, NETWORK, RESYNC, assert_full_mesh, subnets, wait_routes

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def route_args(cluster: topo.Cluster, backend: str, *extra: str) -> list[str]:
    return [
        "--embedded-path", str(cluster.workdir / "store.db"),
        "--network", NETWORK,
        "--backend", backend,
        "--healthz-port", "0",
        "--resync-period", str(RESYNC),
        "--log-level", "debug",
        *extra,
    ]  # fmt: skip


def start_all(cluster: topo.Cluster, args: list[str], hosts: list[topo.Host]) -> dict[int, IPv4Network]:
    for host in hosts:
        host.start_daemon(args)
    for host in hosts:
        host.wait_ready(30)
    return subnets(cluster)


def proto(route: dict[str, object]) -> str:
    return str(route.get("protocol", ""))


def test_host_gw_mesh_drift_and_a_peer_behind_a_router(make_cluster, figures):
    cluster = make_cluster(3)
    far = cluster.add_routed_host()  # 198.51.100.13: not on-link for the others
    near = cluster.hosts[:3]
    nets = start_all(cluster, route_args(cluster, "host-gw"), cluster.hosts)
    for host in near:
        env = host.subnet_env()
        assert env is not None and env.mtu == 1500  # the underlay's MTU: host-gw adds nothing
        host.attach_container(env)
    for host in near:
        wait_routes(host, {str(nets[p.index]) for p in near if p is not host}, 15)

    for host in near:
        for peer in near:
            if peer is host:
                continue
            route = host.route_to(nets[peer.index])
            assert route is not None
            assert (route["gateway"], route["dev"], proto(route)) == (str(peer.underlay.ip), host.underlay_if, "79")
        assert host.route_to(nets[far.index]) is None  # needs a gateway: refused, never programmed
    assert all(far.route_to(nets[h.index]) is None for h in near)
    results = assert_full_mesh(cluster)
    figures.add(f"host-gw: {len(results)} container pings over 3 hosts, all answered")

    # Reported once per lease revision, with what to do, however many passes run.
    time.sleep(5.0)  # ten passes of the cached loop
    log = cluster.hosts[0].daemon.log_path.read_text()
    refused = [line for line in log.splitlines() if "is not on-link" in line]
    assert len(refused) == 1, refused
    assert f"PublicIP {far.underlay.ip} is not on-link" in refused[0]
    assert "use vxlan with DirectRouting" in refused[0]

    # Drift: a route deleted and one pointed elsewhere by hand come back on the next pass.
    h0, h1, h2 = near
    h0.ip("route", "del", str(nets[h1.index]))
    h0.ip("route", "replace", str(nets[h2.index]), "via", str(h1.underlay.ip), "proto", "79")
    start = time.monotonic()
    topo.wait_until(
        lambda: (
            (r1 := h0.route_to(nets[h1.index])) is not None
            and r1["gateway"] == str(h1.underlay.ip)
            and (r2 := h0.route_to(nets[h2.index])) is not None
            and r2["gateway"] == str(h2.underlay.ip)
        ),
        DRIFT_REPAIR + 1.0,  # from the route notifications, long before the audit
        what="host-gw routes repaired",
    )
    figures.add(f"host-gw: hand-edited routes repaired in {time.monotonic() - start:.2f} s")
    assert_full_mesh(cluster, count=1)


def test_host_gw_refuses_a_public_ip_that_is_not_on_its_interface(make_cluster):
    cluster = make_cluster(1)
    host = cluster.hosts[0]
    args = route_args(cluster, "host-gw", "--public-ip", "203.0.113.7")
    proc = host.exec([cluster.overlayd, *args, "--iface", host.underlay_if, "--subnet-file",
                      str(host.subnet_file), "run"], check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "host-gw: public IP 203.0.113.7 is not the address of" in proc.stderr
    assert "behind NAT" in proc.stderr and "Traceback" not in proc.stderr
    assert not host.subnet_file.exists()


def test_vxlan_direct_routing_on_the_segment_and_vxlan_across_the_router(make_cluster, figures):
    cluster = make_cluster(2)
    far = cluster.add_routed_host()
    h0, h1 = cluster.hosts[:2]
    nets = start_all(cluster, route_args(cluster, "vxlan", "--vxlan-direct-routing"), cluster.hosts)
    for host in cluster.hosts:
        host.attach_container()
    for host in cluster.hosts:
        wait_routes(host, {str(n) for i, n in nets.items() if i != host.index}, 15)

    def via(host: topo.Host, peer: topo.Host) -> tuple[str, str]:
        route = host.route_to(nets[peer.index])
        assert route is not None
        return route["dev"], route["gateway"]

    # Same segment: a plain route to the peer's underlay address (no tunnel, no FDB entry).
    assert via(h0, h1) == (h0.underlay_if, str(h1.underlay.ip))
    assert via(h1, h0) == (h1.underlay_if, str(h0.underlay.ip))
    # Across the router: VXLAN, each way.
    for a, b in ((h0, far), (h1, far), (far, h0), (far, h1)):
        assert via(a, b) == ("flannel.1", str(nets[b.index].network_address))
    fdb = h0.exec(["bridge", "fdb", "show", "dev", "flannel.1"]).stdout
    assert str(far.underlay.ip) in fdb and str(h1.underlay.ip) not in fdb

    results = assert_full_mesh(cluster)
    figures.add(f"vxlan DirectRouting: {len(results)} container pings (2 direct, 4 tunnelled), all answered")
