"""The three-host mesh on the Kubernetes store, against the fake API server in the store namespace.

The fake (``python -m overlayd._lab.kube_apiserver``) listens on 192.0.2.254 inside the store
namespace, where etcd runs for the etcd mesh; each daemon is ``overlayd --store kubernetes
--kubernetes-kubeconfig FILE --kubernetes-node-name hN`` in its host namespace and reaches it over
the switch.  The test plays the controller manager: it creates the Node objects with their pod
CIDRs (through the same module's ``request`` command, run inside the store namespace, since the
underlay is not reachable from the test's own namespace).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

import pytest
from overlayd import _topology as topo

from ._mesh import assert_full_mesh, bring_up, daemon_args, route_dsts, subnets, wait_full_mesh_routes, wait_routes

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

kubernetes = pytest.importorskip("kubernetes")

PORT = 6443
PREFIX = "flannel.alpha.coreos.com"


def api_url() -> str:
    return f"http://{topo.STORE_ADDRESS.ip}:{PORT}"


def kube(cluster: topo.Cluster, method: str, path: str, body: Any = None, content_type: str = "") -> Any:
    """One API request from inside the store namespace; the decoded answer."""
    assert cluster.store_ns is not None
    argv = [sys.executable, "-m", "overlayd._lab.kube_apiserver", "request", "--server", api_url(), method, path]
    if body is not None:
        argv += [json.dumps(body), content_type]
    done = subprocess.run(topo.ns_exec(cluster.store_ns, argv), capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, f"{method} {path}: {done.stdout} {done.stderr}"
    return json.loads(done.stdout)


def start_apiserver(cluster: topo.Cluster) -> None:
    assert cluster.store_ns is not None
    argv = [
        sys.executable,
        "-m",
        "overlayd._lab.kube_apiserver",
        "--host",
        str(topo.STORE_ADDRESS.ip),
        "--port",
        str(PORT),
    ]
    cluster.start_process(cluster.store_ns, argv, "apiserver.log")

    def answers() -> bool:
        try:
            return "NodeList" in json.dumps(kube(cluster, "GET", "/api/v1/nodes"))
        except AssertionError:
            return False

    topo.wait_until(answers, 20, what="the fake API server")
    (cluster.workdir / "kubeconfig").write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "lab", "cluster": {"server": api_url()}}],
                "users": [{"name": "lab", "user": {"token": "lab"}}],
                "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": "lab"}}],
                "current-context": "lab",
            }
        )
    )


def create_node(cluster: topo.Cluster, name: str, cidr: str | None) -> None:
    spec = {"podCIDR": cidr, "podCIDRs": [cidr]} if cidr else {}
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastTransitionTime": "2026-01-01T00:00:00Z"}
    kube(
        cluster, "POST", "/api/v1/nodes", {"metadata": {"name": name}, "spec": spec, "status": {"conditions": [ready]}}
    )


def host_cidr(index: int) -> str:
    return f"10.244.{10 + index}.0/24"


def kube_args(cluster: topo.Cluster, host: topo.Host) -> list[str]:
    store = [
        "--store", "kubernetes",
        "--kubernetes-kubeconfig", str(cluster.workdir / "kubeconfig"),
        "--kubernetes-node-name", host.name,
        "--kubernetes-net-conf", str(cluster.workdir / "net-conf.json"),
    ]  # fmt: skip
    return daemon_args(store)


def kube_cluster(make_cluster: Any, hosts: int = 3) -> topo.Cluster:
    cluster: topo.Cluster = make_cluster(hosts, store_ns=True)
    start_apiserver(cluster)
    (cluster.workdir / "net-conf.json").write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}')
    for host in cluster.hosts:
        create_node(cluster, host.name, host_cidr(host.index))
    return cluster


def test_kubernetes_mesh_every_container_reaches_every_other(make_cluster, figures):
    cluster = kube_cluster(make_cluster)
    start = time.monotonic()
    bring_up(cluster, lambda host: kube_args(cluster, host))
    figures.add(
        f"kubernetes store, 3 hosts: first daemon start to full mesh of routes in {time.monotonic() - start:.2f} s"
    )
    assert_full_mesh(cluster)

    nets = subnets(cluster)
    nodes = {n["metadata"]["name"]: n for n in kube(cluster, "GET", "/api/v1/nodes")["items"]}
    for host in cluster.hosts:
        assert str(nets[host.index]) == host_cidr(host.index)  # the controller manager's CIDR, not ours
        notes = nodes[host.name]["metadata"]["annotations"]
        assert notes[f"{PREFIX}/kube-subnet-manager"] == "true"
        assert notes[f"{PREFIX}/backend-type"] == "vxlan"
        assert notes[f"{PREFIX}/public-ip"] == str(host.underlay.ip)
        assert json.loads(notes[f"{PREFIX}/backend-data"])["VtepMAC"]
        conditions = {c["type"]: c for c in nodes[host.name]["status"]["conditions"]}
        assert conditions["Ready"]["reason"] == "KubeletReady"  # the kubelet's condition survived ours
        assert (conditions["NetworkUnavailable"]["status"], conditions["NetworkUnavailable"]["reason"]) == (
            "False",
            "FlannelIsUp",
        )


def test_kubernetes_late_cidr_recreated_node_and_deleted_node(make_cluster, figures):
    cluster = kube_cluster(make_cluster)
    bring_up(cluster, lambda host: kube_args(cluster, host))

    # A joining Node whose pod CIDR the controller manager assigns late: the daemon waits, then starts.
    new = cluster.add_host()
    create_node(cluster, new.name, None)
    new.start_daemon(kube_args(cluster, new))
    topo.wait_until(lambda: "pod CIDR not assigned to node" in new.daemon.log_tail(200), 20,
                    what="the pod CIDR wait line")  # fmt: skip
    assert new.subnet_env() is None and new.daemon.running
    assigned = time.monotonic()
    kube(cluster, "PATCH", f"/api/v1/nodes/{new.name}", {"spec": {"podCIDR": host_cidr(new.index)}},
         "application/merge-patch+json")  # fmt: skip
    new.attach_container(new.wait_ready(60))
    figures.add(f"kubernetes store: pod CIDR assigned late to daemon ready in {time.monotonic() - assigned:.2f} s")
    wait_full_mesh_routes(cluster)
    assert_full_mesh(cluster, count=1)

    # A Node deleted and re-created with another pod CIDR: its daemon moves, its peers follow.
    moved = cluster.hosts[1]
    old, fresh = host_cidr(1), "10.244.50.0/24"
    kube(cluster, "DELETE", f"/api/v1/nodes/{moved.name}")
    create_node(cluster, moved.name, fresh)
    started = time.monotonic()
    topo.wait_until(lambda: (env := moved.subnet_env()) is not None and str(env.subnet.network) == fresh, 60,
                    what=f"{moved.name} moving to {fresh}")  # fmt: skip
    for peer in cluster.hosts:
        if peer is not moved:
            wait_routes(peer, {fresh}, 30)
            topo.wait_until(lambda p=peer: old not in route_dsts(p), 30, what=f"{peer.name} dropping {old}")
    figures.add(
        f"kubernetes store: Node re-created with another pod CIDR, peers moved in {time.monotonic() - started:.2f} s"
    )
    moved.detach_container()
    moved.attach_container(moved.subnet_env())
    assert_full_mesh(cluster, count=1)

    # A Node deleted for good (its daemon stopped first): every peer removes its subnet.
    gone = cluster.hosts[2]
    gone.daemon.stop()
    kube(cluster, "DELETE", f"/api/v1/nodes/{gone.name}")
    for peer in cluster.hosts:
        if peer is not gone:
            topo.wait_until(
                lambda p=peer: host_cidr(2) not in route_dsts(p), 30, what=f"{peer.name} dropping {gone.name}"
            )
