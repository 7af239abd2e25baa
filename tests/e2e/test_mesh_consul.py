"""The three-host mesh on the consul store: the fake Consul in its own namespace on the underlay.

No Consul server can be installed here, so the store namespace runs the fake written from
Consul's API docs (``overlayd.testing.consul_server``) as its own process on 192.0.2.254:8500;
the daemons are ``overlayd --store consul --consul-address 192.0.2.254:8500 ...`` and reach it
over the switch like any host would.  Leases are read back over Consul's HTTP API from inside
the store namespace.  Sessions use Consul's shortest TTL (10 s), which the fake, like Consul's
servers, enforces only after twice that.
"""

from __future__ import annotations

import time

import pytest
from overlayd import _topology as topo

from ._mesh import (
    CONSUL,
    bring_up,
    check_mesh_and_leases,
    check_restart_and_join,
    consul_http,
    daemon_args,
    route_dsts,
    subnets,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

TTL = ["--consul-ttl", "10"]
SUBNETS = "coreos.com/network/subnets/"


def test_consul_mesh_every_container_reaches_every_other(make_cluster, figures):
    check_mesh_and_leases(CONSUL.cluster(make_cluster), CONSUL, figures)


def test_consul_mesh_survives_daemon_restart_and_sees_joins(make_cluster, figures):
    check_restart_and_join(CONSUL.cluster(make_cluster), CONSUL, figures, *TTL)


def session_of(cluster: topo.Cluster, key: str) -> str | None:
    doc = consul_http(cluster, "GET", f"/v1/kv/{SUBNETS}?recurse") or []
    return next((kv.get("Session") for kv in doc if kv["Key"] == SUBNETS + key), None)


def test_consul_session_expiry_removes_a_dead_hosts_lease_and_peers_unprogram_it(make_cluster, figures):
    cluster = CONSUL.cluster(make_cluster)
    bring_up(cluster, daemon_args(CONSUL.store_args(cluster), *TTL))
    dead = cluster.hosts[2]
    gone = str(subnets(cluster)[dead.index])
    assert all(gone in route_dsts(h) for h in cluster.hosts[:2])
    dead.daemon.kill()  # a crash: nothing renews its session any more
    killed = time.monotonic()
    for host in cluster.hosts[:2]:
        topo.wait_until(lambda h=host: gone not in route_dsts(h), 45.0, what=f"{host.name} dropping {gone}")
    took = time.monotonic() - killed
    figures.add(f"consul store, TTL 10 s: a crashed host's routes removed by its peers {took:.1f} s after the crash")
    assert took >= 10.0, "the lease went before its TTL"  # Consul never reaps before the TTL
    assert gone.replace("/", "-") not in CONSUL.leases(cluster)
    key0 = str(subnets(cluster)[0]).replace("/", "-")
    assert session_of(cluster, key0), "a live host's lease lost its session"
    topo.wait_until(lambda: cluster.hosts[0].container.ping(cluster.hosts[1].container.address.ip, count=1).ok, 5.0,
                    what="the survivors still reaching each other")  # fmt: skip


def test_consul_session_destroyed_under_a_daemon_is_reacquired_on_the_same_subnet(make_cluster, figures):
    """Renew answers 404 once the session is gone; the daemon makes a new one and takes its
    subnet back (LockDelay 0), and its peers keep (or get back) their route to it."""
    cluster = CONSUL.cluster(make_cluster)
    bring_up(cluster, daemon_args(CONSUL.store_args(cluster), *TTL))
    host = cluster.hosts[0]
    subnet = subnets(cluster)[host.index]
    key = str(subnet).replace("/", "-")
    old = session_of(cluster, key)
    assert old
    consul_http(cluster, "PUT", f"/v1/session/destroy/{old}")  # an operator, or Consul losing it
    destroyed = time.monotonic()
    new = topo.wait_until(lambda: (s := session_of(cluster, key)) and s != old and s, 30.0,
                          what=f"{host.name} holding {subnet} under a new session")  # fmt: skip
    figures.add(f"consul store: a destroyed session's lease taken back in {time.monotonic() - destroyed:.1f} s")
    assert new != old
    assert host.subnet_env().subnet.network == subnet  # type: ignore[union-attr]
    for peer in cluster.hosts[1:]:
        topo.wait_until(lambda p=peer: str(subnet) in route_dsts(p), 15.0, what=f"{peer.name} routing {subnet}")
    topo.wait_until(lambda: cluster.hosts[1].container.ping(host.container.address.ip, count=1).ok, 10.0,
                    what="a peer reaching the host again")  # fmt: skip
