"""The three-host mesh on the etcd store: a real etcd in its own namespace on the underlay.

etcd listens on 192.0.2.254 inside the store namespace (``overlayd.testing.etcd.EtcdServer``
with an ``ip netns exec`` command prefix); the daemons reach it over the switch like any host
would.  The leases are read back with etcdctl in flannel's key layout.  The mesh and restart checks
are shared with the other stores (``_mesh.check_*``); the outage test is etcd's own.
"""

from __future__ import annotations

import importlib.util
import shutil
import time

import pytest
from overlayd import _topology as topo

from ._mesh import (
    ETCD,
    assert_full_mesh,
    background_ping,
    bring_up,
    check_mesh_and_leases,
    check_restart_and_join,
    daemon_args,
    ping_counts,
    wait_full_mesh_routes,
)

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.timeout(300)]

OUTAGE = 15.0  # seconds etcd stays paused (the figure)


@pytest.fixture(autouse=True)
def _needs_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.skip("needs Debian's etcd binary (apt-get install etcd-server)")
    if importlib.util.find_spec("overlayd.stores.etcd") is None:
        pytest.skip("the etcd store is not installed")


def etcd_store_args(cluster: topo.Cluster) -> list[str]:
    return ETCD.store_args(cluster)


def etcd_args(cluster: topo.Cluster) -> list[str]:
    return daemon_args(etcd_store_args(cluster))


def test_etcd_mesh_every_container_reaches_every_other(make_cluster, figures):
    check_mesh_and_leases(ETCD.cluster(make_cluster), ETCD, figures)


def test_etcd_mesh_survives_daemon_restart_and_sees_joins(make_cluster, figures):
    check_restart_and_join(ETCD.cluster(make_cluster), ETCD, figures)


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
