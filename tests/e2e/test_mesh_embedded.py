"""Three namespace hosts, the default (embedded) store, the real ``overlayd`` command per host.

Everything is read back independently of the daemon: routes, neighbours and FDB entries with
``ip``/``bridge`` inside the host namespaces, leases straight from the SQLite store, reachability
with ``ping`` between container namespaces.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from datetime import timedelta
from ipaddress import IPv4Address

import pytest
from overlayd import _topology as topo
from overlayd import open_store

from ._mesh import (
    DRIFT_REPAIR,
    RESYNC,
    assert_full_mesh,
    background_ping,
    bring_up,
    embedded_args,
    embedded_store_args,
    ping_counts,
    route_dsts,
    store_path,
    subnets,
    wait_full_mesh_routes,
    wait_routes,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]


def leases_by_ip(cluster: topo.Cluster) -> dict[IPv4Address, object]:
    store = open_store("embedded", path=str(store_path(cluster)))
    try:
        return {lease.attrs.public_ip: lease for lease in store.list_leases().leases}
    finally:
        store.close()


def vtep_mac(host: topo.Host) -> str:
    out = host.ip("-j", "link", "show", "flannel.1").stdout
    return str(json.loads(out)[0]["address"])


def test_every_container_reaches_every_other(make_cluster, figures):
    cluster = make_cluster(3)
    start = time.monotonic()
    bring_up(cluster, embedded_args(cluster))  # cold store: the daemons create the config
    figures.add(f"3 hosts: first daemon start to full mesh of routes in {time.monotonic() - start:.2f} s")

    results = assert_full_mesh(cluster)
    rtts = [r.rtt_avg_ms for r in results.values() if r.rtt_avg_ms is not None]
    figures.add(f"container ping RTT over vxlan: median {statistics.median(rtts):.3f} ms, max {max(rtts):.3f} ms")

    # What each daemon published, and what it programmed, read back independently.
    leases = leases_by_ip(cluster)
    nets = subnets(cluster)
    assert len(leases) == 3
    for host in cluster.hosts:
        lease = leases[host.underlay.ip]
        assert lease.subnet == nets[host.index]
        assert lease.attrs.backend_type == "vxlan"
        assert lease.attrs.backend_data["VtepMAC"] == vtep_mac(host)
        env = host.subnet_env()
        assert env is not None and env.mtu == 1450 and str(env.network) == "10.244.0.0/16"
    for host in cluster.hosts:
        by_dst = {r["dst"]: r for r in host.routes()}
        for peer in cluster.hosts:
            if peer is host:
                continue
            route = by_dst[str(nets[peer.index])]
            assert route["dev"] == "flannel.1"
            assert route["gateway"] == str(nets[peer.index].network_address)
            assert "onlink" in route.get("flags", [])


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_daemon_restart_keeps_subnet_and_traffic(make_cluster, figures, how):
    cluster = make_cluster(3)
    args = embedded_args(cluster)
    bring_up(cluster, args, init_args=embedded_store_args(cluster))
    victim = cluster.hosts[1]
    before = victim.subnet_env()
    c0, c1 = cluster.hosts[0].container, victim.container

    pinger = background_ping(c0.ns, c1.address.ip, 6.0)
    if how == "kill -9":
        victim.daemon.kill()
    else:
        assert victim.daemon.stop() == 0, victim.daemon.log_tail()
    assert not victim.daemon.running
    time.sleep(0.5)
    # Neither a crash nor a clean stop removes kernel state: traffic flows with no daemon.
    assert_full_mesh(cluster, count=2)

    start = time.monotonic()
    victim.restart_daemon(fresh=True)  # removes the subnet file, so its return means "ready"
    after = victim.wait_ready(30)
    figures.add(f"restart after {how} to ready (subnet file) in {time.monotonic() - start:.2f} s")
    assert after.subnet == before.subnet, "the restarted daemon must reuse its subnet"
    assert victim.attach_container(after) is c1  # nothing to rebuild on the container side

    out, sent, received = ping_counts(pinger)
    figures.add(f"pings lost across {how} + restart: {sent - received} of {sent} (50 ms interval)")
    assert received == sent, f"traffic dropped during the restart: {out.strip()}"

    assert len(leases_by_ip(cluster)) == 3, "a restart must not leave a second lease behind"
    wait_full_mesh_routes(cluster)
    assert_full_mesh(cluster)


def test_deleted_route_is_repaired_within_a_second(make_cluster, figures):
    cluster = make_cluster(3)
    bring_up(cluster, embedded_args(cluster), init_args=embedded_store_args(cluster))
    host, nets = cluster.hosts[0], subnets(cluster)
    peer_net = str(nets[1])

    host.ip("route", "del", peer_net)
    assert peer_net not in route_dsts(host)
    took = wait_routes(host, {peer_net}, DRIFT_REPAIR)  # from netlink notifications, not the audit
    figures.add(f"route deleted by hand came back after {took:.2f} s (audit period {RESYNC:g} s)")
    assert_full_mesh(cluster)


def test_deleted_neighbour_and_fdb_entries_are_repaired(make_cluster, figures):
    cluster = make_cluster(3)
    bring_up(cluster, embedded_args(cluster), init_args=embedded_store_args(cluster))
    host, peer = cluster.hosts[0], cluster.hosts[2]
    gw = str(subnets(cluster)[peer.index].network_address)
    mac = vtep_mac(peer)

    def neigh_present() -> bool:
        out = host.ip("-j", "neigh", "show", "dev", "flannel.1").stdout
        return any(n.get("dst") == gw and n.get("lladdr") == mac for n in json.loads(out or "[]"))

    def fdb_present() -> bool:
        out = topo.run(["bridge", "-n", host.ns, "fdb", "show", "dev", "flannel.1"]).stdout
        return any(line.startswith(mac) and f"dst {peer.underlay.ip}" in line for line in out.splitlines())

    assert neigh_present() and fdb_present()
    host.ip("neigh", "del", gw, "dev", "flannel.1")
    topo.run(["bridge", "-n", host.ns, "fdb", "del", mac, "dev", "flannel.1", "dst", str(peer.underlay.ip)])
    assert not neigh_present() and not fdb_present()
    start = time.monotonic()
    topo.wait_until(lambda: neigh_present() and fdb_present(), DRIFT_REPAIR, what="neighbour and FDB entry back")
    figures.add(f"neighbour + FDB entry deleted by hand came back after {time.monotonic() - start:.2f} s")
    assert_full_mesh(cluster)


def test_deleted_lease_is_unprogrammed_on_peers(make_cluster, figures):
    cluster = make_cluster(3)
    bring_up(cluster, embedded_args(cluster), init_args=embedded_store_args(cluster))
    gone = cluster.hosts[2]
    net = subnets(cluster)[gone.index]
    gone.daemon.kill()  # a dead node; its live daemon would simply take a lease again

    store = open_store("embedded", path=str(store_path(cluster)))
    try:
        (lease,) = [x for x in store.list_leases().leases if x.subnet == net]
        start = time.monotonic()
        store.delete_lease(lease)
    finally:
        store.close()

    took = []
    for peer in cluster.hosts[:2]:
        topo.wait_until(lambda p=peer: str(net) not in route_dsts(p), 5.0, what=f"route to {net} gone on {peer.name}")
        took.append(time.monotonic() - start)
        neigh = peer.ip("neigh", "show", "dev", "flannel.1").stdout
        assert str(net.network_address) + " " not in neigh, neigh
    figures.latency("deleted lease to route removed on peers", took)
    # The survivors still reach each other.
    survivors = cluster.hosts[:2]
    for a in survivors:
        for b in survivors:
            if a is not b:
                assert a.container.ping(b.container.address.ip).ok


def _watch_new_routes(host: topo.Host, known: set[str], found: dict[str, float], stop: threading.Event) -> None:
    """Record the wall-clock time each new route shows up on *host* (polled every 10 ms)."""
    while not stop.is_set():
        now = time.time()
        for dst in route_dsts(host) - known:
            found.setdefault(dst, now)
        time.sleep(0.01)


def test_hosts_join_and_are_reachable_quickly(make_cluster, figures):
    cluster = make_cluster(3)
    args = embedded_args(cluster)
    bring_up(cluster, args, init_args=embedded_store_args(cluster))
    lease_to_route: list[float] = []
    ready_to_reachable: list[float] = []

    for _ in range(3):  # hosts 3, 4 and 5 join one after the other
        peers = list(cluster.hosts)
        stop = threading.Event()
        seen: dict[int, dict[str, float]] = {p.index: {} for p in peers}
        watchers = [
            threading.Thread(target=_watch_new_routes, args=(p, route_dsts(p), seen[p.index], stop), daemon=True)
            for p in peers
        ]
        for w in watchers:
            w.start()
        try:
            new = cluster.add_host()
            new.start_daemon(args)
            env = new.wait_ready(30)
            ready = time.monotonic()
            new.attach_container(env)
            target = new.container.address.ip
            for peer in peers:
                topo.wait_until(lambda p=peer, t=target: p.container.ping(t, count=1, timeout=1).ok, 2.0,
                                what=f"{peer.name} reaching the new {new.name}")  # fmt: skip
            ready_to_reachable.append(time.monotonic() - ready)
            wait_routes(peers[0], {str(env.subnet.network)}, 2.0)
            time.sleep(0.05)
        finally:
            stop.set()
            for w in watchers:
                w.join()

        store = open_store("embedded", path=str(store_path(cluster)))
        try:
            (lease,) = [x for x in store.list_leases().leases if x.attrs.public_ip == new.underlay.ip]
            created = (lease.expiration - timedelta(seconds=store.lease_ttl.total_seconds())).timestamp()
        finally:
            store.close()
        for peer in peers:
            at = seen[peer.index].get(str(env.subnet.network))
            assert at is not None, f"{peer.name} never showed a route to {env.subnet.network}"
            lease_to_route.append(max(0.0, at - created))

    figures.latency("new lease to its route on a peer (10 ms polling)", lease_to_route)
    figures.latency("joining host ready to reachable from every peer", ready_to_reachable)
    assert max(ready_to_reachable) <= 2.0
    wait_full_mesh_routes(cluster)
    assert_full_mesh(cluster, count=1)
