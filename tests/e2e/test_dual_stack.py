"""Dual-stack and IPv6-only clusters end to end (issue 20): three namespace hosts with an IPv6
underlay from 2001:db8::/32 (beside IPv4 192.0.2.0/24, or alone), the overlay fd00::/48 (beside
10.244.0.0/16, or alone), the real ``overlayd`` command per host, vxlan and host-gw, the embedded
store and etcd.

Everything is read back independently of the daemons: the subnet files, routes and devices with
``ip`` inside the host namespaces, the leases straight from the store (SQLite through the store
plugin, etcd with ``etcdctl``), reachability with ``ping``/``ping -6`` between the containers.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from ipaddress import ip_interface, ip_network
from pathlib import Path
from typing import Any

import pytest
from overlayd import _topology as topo
from overlayd import open_store

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

V4_NETWORK = "10.244.0.0/16"
V6_NETWORK = "fd00::/48"
VNI = 1
MODES = {"dual-stack": True, "ipv6-only": False}  # mode -> IPv4 too
UNDERLAY_MTU = 1500
# V6DESIGN: vxlan costs 50 bytes over an IPv4 underlay and 70 over an IPv6 one; the subnet file's
# MTU is the smallest of the families'.  host-gw adds no header.
EXPECTED_MTU = {"vxlan": UNDERLAY_MTU - 70, "host-gw": UNDERLAY_MTU}


def network_config(mode: str, backend: str) -> dict[str, Any]:
    """flannel's network config: EnableIPv6 with fd00::/48 in /64s, plus 10.244.0.0/16 or EnableIPv4 false."""
    config: dict[str, Any] = {
        "EnableIPv6": True,
        "IPv6Network": V6_NETWORK,
        "IPv6SubnetLen": 64,
        "Backend": {"Type": backend},
    }
    if MODES[mode]:
        config["Network"] = V4_NETWORK
    else:
        config["EnableIPv4"] = False
    return config


def store_args(cluster: topo.Cluster, store: str) -> list[str]:
    if store == "etcd":
        return ["--store", "etcd", "--etcd-endpoints", cluster.etcd_endpoint]
    return ["--store", "embedded", "--embedded-path", str(cluster.workdir / "store.db")]


def daemon_args(cluster: topo.Cluster, store: str, backend: str) -> list[str]:
    # No --network: an IPv6-only config has no Network, and the flag would contradict it.
    return [
        *store_args(cluster, store),
        "--backend", backend,
        "--healthz-port", "0",
        "--resync-period", "600",
        "--log-level", "debug",
    ]  # fmt: skip


def make_dual_cluster(make_cluster: Callable[..., topo.Cluster], mode: str, store: str, hosts: int = 3) -> topo.Cluster:
    cluster = make_cluster(hosts, ipv4=MODES[mode], ipv6=True, store_ns=(store == "etcd"))
    if store == "etcd":
        cluster.start_etcd()
    return cluster


def init_network(cluster: topo.Cluster, store: str, mode: str, backend: str) -> None:
    path = cluster.workdir / "net-conf.json"
    path.write_text(json.dumps(network_config(mode, backend)))
    proc = cluster.overlayd_cli(*store_args(cluster, store), "network", "init", "--from-json", str(path))
    assert proc.returncode == 0, proc.stdout + proc.stderr


def families(mode: str) -> tuple[int, ...]:
    return (4, 6) if MODES[mode] else (6,)


def overlay_subnets(cluster: topo.Cluster) -> dict[tuple[int, int], str]:
    """(host index, family) -> the host's subnet of that family, from its subnet file."""
    out = {}
    for host in cluster.hosts:
        env = host.subnet_env()
        assert env is not None, f"{host.name} has no subnet file"
        for family in env.families:
            subnet = env.subnet_of(family)
            assert subnet is not None
            out[(host.index, family)] = str(subnet.network)
    return out


def wait_mesh_routes(cluster: topo.Cluster, timeout: float = 20) -> None:
    """Every host has a route to every peer's subnet, of each family."""
    subnets = overlay_subnets(cluster)
    for host in cluster.hosts:
        for family in {f for _, f in subnets}:
            want = {s for (i, f), s in subnets.items() if f == family and i != host.index}

            def present(host: topo.Host = host, family: int = family, want: set[str] = want) -> bool:
                return want <= {str(r.get("dst")) for r in host.routes(family)}

            topo.wait_until(present, timeout, what=f"IPv{family} routes {sorted(want)} on {host.name}")


def bring_up(cluster: topo.Cluster, store: str, mode: str, backend: str) -> None:
    init_network(cluster, store, mode, backend)
    args = daemon_args(cluster, store, backend)
    for host in cluster.hosts:
        host.start_daemon(args)
    for host in cluster.hosts:
        env = host.wait_ready(30)
        assert env.families == families(mode), f"{host.name}'s subnet file: {host.subnet_file.read_text()}"
        host.attach_container(env)
    wait_mesh_routes(cluster)


def assert_mesh_both_families(cluster: topo.Cluster, mode: str, count: int = 3) -> None:
    """Every container pings every other container's address of each family (``ping -6`` for IPv6)."""
    n = len(cluster.hosts)
    for family in families(mode):
        results = cluster.ping_matrix(count=count, timeout=1, family=family)
        assert len(results) == n * (n - 1), f"IPv{family}: {sorted(results)}"
        failed = {k: r.output for k, r in results.items() if not r.ok}
        assert not failed, f"IPv{family} pings failed: {failed}"
    if not MODES[mode]:
        for host in cluster.hosts:  # nothing IPv4 on an IPv6-only cluster's containers
            assert host.container is not None and host.container.address_of(4) is None


def store_leases(cluster: topo.Cluster, store: str) -> dict[tuple[int, str], dict[str, Any]]:
    """(family, subnet) -> the lease value (flannel's JSON), read from the store itself."""
    out: dict[tuple[int, str], dict[str, Any]] = {}
    if store == "etcd":
        prefix = "/coreos.com/network/"
        doc = json.loads(cluster.etcd.etcdctl("get", "--prefix", prefix, "-w", "json"))
        for kv in doc.get("kvs", []):
            key = base64.b64decode(kv["key"]).decode().removeprefix(prefix)
            kind, _, name = key.partition("/")
            if kind in ("subnets", "v6-subnets"):
                addr, _, length = name.rpartition("-")
                out[(6 if kind == "v6-subnets" else 4, f"{addr}/{length}")] = json.loads(base64.b64decode(kv["value"]))
        return out
    opened = open_store("embedded", path=str(cluster.workdir / "store.db"))
    try:
        for lease in opened.list_leases().leases:
            for family in lease.families:
                out[(family, str(lease.subnet_of(family)))] = json.loads(lease.attrs.to_json())
    finally:
        opened.close()
    return out


def link_mac(host: topo.Host, name: str) -> str | None:
    proc = host.ip("-j", "link", "show", name, check=False)
    if proc.returncode != 0:
        return None
    return str(json.loads(proc.stdout)[0]["address"])


def vtep_name(family: int) -> str:
    return f"flannel.{VNI}" if family == 4 else f"flannel-v6.{VNI}"


def check_leases(cluster: topo.Cluster, store: str, mode: str, backend: str) -> None:
    """One store key per family per host, the same attrs on both, and (vxlan) each family's VTEP
    MAC as published equal to its device's MAC in the host namespace."""
    leases = store_leases(cluster, store)
    subnets = overlay_subnets(cluster)
    assert len(leases) == len(cluster.hosts) * len(families(mode)), sorted(leases)
    for host in cluster.hosts:
        values = [leases[(f, subnets[(host.index, f)])] for f in families(mode)]
        assert all(v == values[0] for v in values), values  # both keys carry the same attrs
        value = values[0]
        assert value["BackendType"] == backend
        assert host.underlay6 is not None and value["PublicIPv6"] == str(host.underlay6.ip)
        underlay4 = host.underlay_of(4)
        assert value["PublicIP"] == (str(underlay4.ip) if underlay4 is not None else None)
        if backend == "vxlan":
            for family in (4, 6):
                data = value.get("BackendData" if family == 4 else "BackendV6Data")
                mac = link_mac(host, vtep_name(family))
                if family in families(mode):
                    assert data and data["VtepMAC"] == mac, (host.name, family, value, mac)
                else:
                    assert mac is None, f"{host.name} has {vtep_name(family)} on an IPv6-only network"


def check_kernel(cluster: topo.Cluster, mode: str, backend: str) -> None:
    """The per-family datapath as V6DESIGN describes it, read with ``ip`` inside each host."""
    subnets = overlay_subnets(cluster)
    for host in cluster.hosts:
        env = host.subnet_env()
        assert env is not None and env.mtu == EXPECTED_MTU[backend], host.subnet_file.read_text()
        assert str(env.ipv6_network) == V6_NETWORK
        for peer in cluster.hosts:
            if peer is host:
                continue
            for family in families(mode):
                route = host.route_to(ip_network(subnets[(peer.index, family)]))
                assert route is not None, (host.name, peer.name, family)
                if backend == "vxlan":
                    assert route["dev"] == vtep_name(family), route
                else:
                    underlay = peer.underlay_of(family)
                    assert underlay is not None
                    assert (route["gateway"], route["dev"]) == (str(underlay.ip), host.underlay_if), route
        if backend == "vxlan":
            [link] = json.loads(host.ip("-d", "-j", "link", "show", vtep_name(6)).stdout)
            info = link["linkinfo"]["info_data"]
            assert info["id"] == VNI and info.get("local6", info.get("local")) == str(host.underlay6.ip), info
            assert link["mtu"] == UNDERLAY_MTU - 70


CASES = [
    pytest.param(mode, backend, store, id=f"{mode}-{backend}-{store}")
    for mode in MODES
    for backend in ("vxlan", "host-gw")
    for store in ("embedded", "etcd")
    if store == "embedded" or backend == "vxlan"  # etcd once per mode: the store, not the backend, is under test
]


@pytest.mark.parametrize(("mode", "backend", "store"), CASES)
def test_every_container_reaches_every_other_over_both_families(make_cluster, figures, mode, backend, store):
    cluster = make_dual_cluster(make_cluster, mode, store)
    bring_up(cluster, store, mode, backend)
    assert_mesh_both_families(cluster, mode)
    check_leases(cluster, store, mode, backend)
    check_kernel(cluster, mode, backend)
    for family in families(mode):
        rtts = [r.rtt_avg_ms for r in cluster.ping_matrix(count=3, family=family).values() if r.rtt_avg_ms]
        if rtts:
            figures.add(f"IPv{family} container RTT over {backend}: max {max(rtts):.3f} ms")


@pytest.mark.parametrize("mode", MODES)
def test_restart_and_reboot_keep_both_leases_and_both_vtep_macs(make_cluster, mode):
    """flannel #1822 (v6 routes lost after restart) and k3s #9957 (the v6 VTEP MAC changes every
    boot): a killed daemon, and one whose devices were gone as after a reboot, come back with the
    same subnets of both families and the same VTEP MACs, and the mesh works again."""
    store, backend = "embedded", "vxlan"
    cluster = make_dual_cluster(make_cluster, mode, store)
    bring_up(cluster, store, mode, backend)
    before_subnets = overlay_subnets(cluster)
    before_leases = store_leases(cluster, store)
    host = cluster.hosts[0]
    before_macs = {f: link_mac(host, vtep_name(f)) for f in families(mode)}
    assert all(before_macs.values())

    # A crash: SIGKILL, then a new daemon.
    assert host.daemon is not None
    host.daemon.kill()
    host.restart_daemon(fresh=True)
    host.wait_ready(30)
    assert overlay_subnets(cluster) == before_subnets
    assert {f: link_mac(host, vtep_name(f)) for f in families(mode)} == before_macs

    # A reboot: the daemon stopped, its devices and routes gone, then started again.
    host.daemon.stop()
    for family in families(mode):
        host.ip("link", "del", vtep_name(family), check=False)
    host.restart_daemon(fresh=True)
    host.wait_ready(30)
    assert overlay_subnets(cluster) == before_subnets
    assert {f: link_mac(host, vtep_name(f)) for f in families(mode)} == before_macs
    wait_mesh_routes(cluster)
    after_leases = store_leases(cluster, store)
    assert set(after_leases) == set(before_leases)
    for key, value in after_leases.items():
        for data_key in ("BackendData", "BackendV6Data"):
            if before_leases[key].get(data_key):
                assert value[data_key]["VtepMAC"] == before_leases[key][data_key]["VtepMAC"], key
    assert_mesh_both_families(cluster, mode, count=2)


def test_ipv6_only_vxlan_across_the_router(make_cluster):
    """A host on the routed second segment (2001:db8:0:2::/64) is one hop away: vxlan over IPv6
    reaches it through the router namespace."""
    mode, store, backend = "ipv6-only", "embedded", "vxlan"
    cluster = make_dual_cluster(make_cluster, mode, store, hosts=2)
    cluster.add_routed_host()
    bring_up(cluster, store, mode, backend)
    assert_mesh_both_families(cluster, mode, count=2)


OVERLAYD_CNI = str(Path(sys.executable).with_name("overlayd-cni"))
CNI_PATH = "/usr/lib/cni"  # Debian's containernetworking-plugins (the Makefile's deps target installs them)


def cni_add(host: topo.Host, pod: str, cid: str) -> dict[str, Any]:
    """``overlayd-cni`` ADD run in *host* as a runtime would: real bridge + host-local, pod *pod*."""
    conf = {
        "cniVersion": "1.0.0",
        "name": "overlay",
        "type": "overlayd-cni",
        "subnetFile": str(host.subnet_file),
        "dataDir": str(host.workdir / "cni"),
        "delegate": {
            "bridge": f"{host.cluster.prefix}b",
            "isDefaultGateway": True,
            "ipam": {"dataDir": str(host.workdir / "ipam")},
        },
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CNI_", "OVERLAYD_"))}
    env.update(CNI_COMMAND="ADD", CNI_CONTAINERID=cid, CNI_IFNAME="eth0", CNI_PATH=CNI_PATH)
    env["CNI_NETNS"] = f"/run/netns/{pod}"
    proc = subprocess.run(
        topo.ns_exec(host.ns, [OVERLAYD_CNI]), input=json.dumps(conf), capture_output=True, text=True, env=env,
        timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.parametrize("mode", MODES)
def test_cni_pods_get_an_address_of_each_family_and_reach_each_other(make_cluster, mode):
    """Pods wired by overlayd-cni from the daemons' subnet files: one host-local range per family,
    and pod-to-pod pings of each family across the vxlan overlay."""
    store, backend = "embedded", "vxlan"
    cluster = make_dual_cluster(make_cluster, mode, store, hosts=2)
    init_network(cluster, store, mode, backend)
    for host in cluster.hosts:
        host.start_daemon(daemon_args(cluster, store, backend))
    for host in cluster.hosts:
        host.wait_ready(30)
    wait_mesh_routes(cluster)
    addresses: list[dict[int, Any]] = []
    pods = []
    for host in cluster.hosts:
        pod = f"{cluster.prefix}pod{host.index}"
        cluster.add_netns(pod, ipv6=True)
        pods.append(pod)
        result = cni_add(host, pod, f"pod{host.index}")
        by_family = {ip_interface(ip["address"]).version: ip_interface(ip["address"]) for ip in result["ips"]}
        assert sorted(by_family) == list(families(mode)), result
        env = host.subnet_env()
        assert env is not None
        for family, address in by_family.items():
            subnet = env.subnet_of(family)
            assert subnet is not None and address.network == subnet.network, (address, env)
        addresses.append(by_family)
        topo.settle_ipv6([pod, host.ns])
    for family in families(mode):
        for i, j in ((0, 1), (1, 0)):
            outcome = topo.ping(pods[i], addresses[j][family].ip, count=3, timeout=1)
            assert outcome.ok, (family, outcome.output)


def test_demo_ipv6_shows_both_ping_matrices(figures):
    """``overlayd demo --ipv6`` as a user runs it: both matrices, exit 0, nothing left behind."""
    proc = subprocess.run(
        [topo.overlayd_executable(), "demo", "--hosts", "3", "--ipv6"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    out = proc.stdout + proc.stderr
    prefix = re.search(r"prefix (ovd[0-9a-f]{4}-)", out)
    try:
        assert proc.returncode == 0, out
        assert "IPv4 container ping matrix" in proc.stdout and "IPv6 container ping matrix" in proc.stdout
        assert "OK: all 12 container pairs reach each other over the vxlan overlay for IPv4 and IPv6" in proc.stdout
        assert "fd00:" in proc.stdout  # the IPv6 leases in the table
        assert "FAIL" not in proc.stdout
    finally:
        if prefix:
            for ns in topo.list_netns():
                if ns.startswith(prefix.group(1)):
                    topo.delete_netns(ns)
    assert prefix and not [ns for ns in topo.list_netns() if ns.startswith(prefix.group(1))]
