"""The three-host mesh on the etcd store: a real etcd in its own namespace on the underlay.

etcd listens on 192.0.2.254 inside the store namespace (``overlayd.testing.etcd.EtcdServer``
with an ``ip netns exec`` command prefix); the daemons reach it over the switch like any host
would.  The leases are read back with etcdctl in flannel's key layout.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import time

import pytest
from overlayd import _topology as topo

from ._mesh import (
    assert_full_mesh,
    background_ping,
    bring_up,
    daemon_args,
    ping_counts,
    subnets,
    wait_full_mesh_routes,
)

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.timeout(300)]

SUBNETS_PREFIX = "/coreos.com/network/subnets/"
OUTAGE = 15.0  # seconds etcd stays paused (the figure)


@pytest.fixture(autouse=True)
def _needs_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.skip("needs Debian's etcd binary (apt-get install etcd-server)")
    if importlib.util.find_spec("overlayd.stores.etcd") is None:
        pytest.skip("the etcd store is not installed")


def etcd_store_args(cluster: topo.Cluster) -> list[str]:
    return ["--store", "etcd", "--etcd-endpoints", cluster.etcd_endpoint]


def etcd_args(cluster: topo.Cluster) -> list[str]:
    return daemon_args(etcd_store_args(cluster))


def stored_leases(cluster: topo.Cluster) -> dict[str, dict[str, object]]:
    """``<prefix>/subnets/*`` read with etcdctl inside the store namespace."""
    out = cluster.etcd.etcdctl("get", "--prefix", SUBNETS_PREFIX, "-w", "json")
    doc = json.loads(out)
    leases = {}
    for kv in doc.get("kvs", []):
        key = base64.b64decode(kv["key"]).decode()
        leases[key.removeprefix(SUBNETS_PREFIX)] = json.loads(base64.b64decode(kv["value"]))
    return leases


def test_etcd_mesh_every_container_reaches_every_other(make_cluster, figures):
    cluster = make_cluster(3, store_ns=True)
    cluster.start_etcd()
    start = time.monotonic()
    bring_up(cluster, etcd_args(cluster))
    figures.add(f"etcd store, 3 hosts: first daemon start to full mesh of routes in {time.monotonic() - start:.2f} s")
    assert_full_mesh(cluster)

    leases = stored_leases(cluster)
    nets = subnets(cluster)
    assert len(leases) == 3
    for host in cluster.hosts:
        key = str(nets[host.index]).replace("/", "-")
        value = leases[key]
        assert value["PublicIP"] == str(host.underlay.ip)
        assert value["BackendType"] == "vxlan"
        assert value["BackendData"]["VtepMAC"]


def test_etcd_mesh_survives_daemon_restart_and_sees_joins(make_cluster, figures):
    cluster = make_cluster(3, store_ns=True)
    cluster.start_etcd()
    args = etcd_args(cluster)
    bring_up(cluster, args, init_args=etcd_store_args(cluster))

    victim = cluster.hosts[0]
    before = victim.subnet_env()
    victim.daemon.kill()
    victim.restart_daemon(fresh=True)
    assert victim.wait_ready(30).subnet == before.subnet

    new = cluster.add_host()
    new.start_daemon(args)
    env = new.wait_ready(30)
    ready = time.monotonic()
    new.attach_container(env)
    for peer in cluster.hosts[:3]:
        topo.wait_until(lambda p=peer: p.container.ping(new.container.address.ip, count=1).ok, 2.0,
                        what=f"{peer.name} reaching {new.name}")  # fmt: skip
    figures.add(f"etcd store: joining host ready to reachable from every peer in {time.monotonic() - ready:.2f} s")
    wait_full_mesh_routes(cluster)
    assert_full_mesh(cluster, count=1)
    assert len(stored_leases(cluster)) == 4


def test_etcd_outage_keeps_the_datapath_and_recovers(make_cluster, figures):
    cluster = make_cluster(3, store_ns=True)
    cluster.start_etcd()
    args = etcd_args(cluster)
    bring_up(cluster, args, init_args=etcd_store_args(cluster))

    c0, c2 = cluster.hosts[0].container, cluster.hosts[2].container
    pinger = background_ping(c0.ns, c2.address.ip, OUTAGE + 2)
    time.sleep(1)
    cluster.etcd.pause()  # SIGSTOP: connections stay open, nothing answers (a hung store)
    try:
        time.sleep(OUTAGE)  # many resync passes against a store that does not answer
        assert all(h.daemon.running for h in cluster.hosts), "a daemon gave up while the store hung"
        assert_full_mesh(cluster, count=1)  # the datapath is kept as it is
    finally:
        cluster.etcd.resume()
    out, sent, received = ping_counts(pinger)
    figures.add(f"etcd paused {OUTAGE:g} s: {sent - received} of {sent} pings lost (50 ms interval)")
    assert received == sent, f"traffic dropped while etcd was paused: {out.strip()}"

    # The daemons resume watching: a host that joins after the outage is programmed everywhere.
    new = cluster.add_host()
    new.start_daemon(args)
    env = new.wait_ready(60)
    ready = time.monotonic()
    new.attach_container(env)
    for peer in cluster.hosts[:3]:
        topo.wait_until(lambda p=peer: p.container.ping(new.container.address.ip, count=1).ok, 30.0,
                        what=f"{peer.name} reaching {new.name} after the outage")  # fmt: skip
    figures.add(
        f"etcd store: after a {OUTAGE:g} s outage, a joining host reachable in {time.monotonic() - ready:.2f} s"
    )
    wait_full_mesh_routes(cluster)
    assert_full_mesh(cluster, count=1)
