"""Helpers shared by the end-to-end tests: daemon options, bring-up, route and ping checks."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import attrs
from overlayd import _topology as topo

NETWORK = "10.244.0.0/16"
#: The audit period: long, so that a repair within DRIFT_REPAIR seconds shows the notification path.
RESYNC = 600.0
DRIFT_REPAIR = 1.0


def embedded_store_args(cluster: topo.Cluster) -> list[str]:
    """Store options for the default store (no ``--store``: embedded is the default)."""
    return ["--embedded-path", str(store_path(cluster))]


def daemon_args(store_args: list[str], *extra: str) -> list[str]:
    """Daemon options for the e2e clusters, on the store *store_args* name."""
    return [
        *store_args,
        "--backend", "vxlan",
        "--network", NETWORK,
        "--healthz-port", "0",
        "--resync-period", str(RESYNC),
        "--log-level", "debug",
        *extra,
    ]  # fmt: skip


def embedded_args(cluster: topo.Cluster, *extra: str) -> list[str]:
    """Daemon options on the default store."""
    return daemon_args(embedded_store_args(cluster), *extra)


def store_path(cluster: topo.Cluster) -> Path:
    return cluster.workdir / "store.db"


def init_network(cluster: topo.Cluster, store_args: list[str]) -> None:
    """``overlayd network init`` before any daemon starts: flannel's usual order of operations."""
    proc = cluster.overlayd_cli(*store_args, "network", "init", "--network", NETWORK, "--backend", "vxlan")
    assert proc.returncode == 0, proc.stderr


def bring_up(
    cluster: topo.Cluster,
    args: list[str] | Callable[[topo.Host], list[str]],
    hosts: list[topo.Host] | None = None,
    *,
    init_args: list[str] | None = None,
) -> None:
    """Start a daemon on each host, wait for its subnet file, attach its container, wait for routes.

    *args* are the daemon options, or a function of the host that returns them (a store that
    names the host, such as Kubernetes' ``--kubernetes-node-name``).  With *init_args* (the
    store options), the network config is written first with ``overlayd network init``;
    without, the daemons create it from ``--network`` on a cold store.
    """
    if init_args is not None:
        init_network(cluster, init_args)
    hosts = cluster.hosts if hosts is None else hosts
    for host in hosts:
        host.start_daemon(args(host) if callable(args) else args)
    for host in hosts:
        host.attach_container(host.wait_ready(30))
    wait_full_mesh_routes(cluster)


def subnets(cluster: topo.Cluster) -> dict[int, IPv4Network]:
    out = {}
    for host in cluster.hosts:
        env = host.subnet_env()
        assert env is not None, f"{host.name} has no subnet file"
        out[host.index] = env.subnet.network
    return out


def wait_full_mesh_routes(cluster: topo.Cluster, timeout: float = 15) -> None:
    nets = subnets(cluster)
    for host in cluster.hosts:
        want = {str(n) for i, n in nets.items() if i != host.index}
        wait_routes(host, want, timeout)


def route_dsts(host: topo.Host) -> set[str]:
    return {str(r.get("dst")) for r in host.routes()}


def wait_routes(host: topo.Host, want: set[str], timeout: float) -> float:
    """Wait until *host* has a route for every subnet in *want*; return the seconds it took."""
    start = time.monotonic()
    topo.wait_until(lambda: want <= route_dsts(host), timeout, what=f"routes {sorted(want)} on {host.name}")
    return time.monotonic() - start


def assert_full_mesh(cluster: topo.Cluster, count: int = 3) -> dict[tuple[int, int], topo.PingResult]:
    results = cluster.ping_matrix(count=count, timeout=1)
    failed = {k: r.output for k, r in results.items() if not r.ok}
    assert not failed, f"pings failed: {failed}"
    expected = len([h for h in cluster.hosts if h.container is not None])
    assert len(results) == expected * (expected - 1)
    return results


def background_ping(ns: str, dst: IPv4Address, seconds: float) -> subprocess.Popen[str]:
    count = int(seconds / 0.05)
    return subprocess.Popen(
        topo.ns_exec(ns, ["ping", "-n", "-q", "-i", "0.05", "-W", "1", "-c", str(count), str(dst)]),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def ping_counts(pinger: subprocess.Popen[str]) -> tuple[str, int, int]:
    """(output, sent, received) of a finished :func:`background_ping`."""
    out, _ = pinger.communicate(timeout=60)
    sent_recv = topo._PING_COUNTS.search(out)
    assert sent_recv, out
    return out, int(sent_recv.group(1)), int(sent_recv.group(2))


# -- store servers in the store namespace ------------------------------------------------------


@attrs.frozen
class StoreServer:
    """A store whose server runs in the cluster's store namespace, as the e2e tests use it.

    ``start`` runs the server there, ``store_args`` are the daemon and CLI flags that reach it
    over the underlay, ``leases`` reads ``<prefix>/subnets/*`` back independently of overlayd
    (key without the prefix -> decoded flannel value).
    """

    name: str
    start: Callable[[topo.Cluster], None]
    store_args: Callable[[topo.Cluster], list[str]]
    leases: Callable[[topo.Cluster], dict[str, dict[str, Any]]]

    def cluster(self, make_cluster: Callable[..., topo.Cluster], hosts: int = 3) -> topo.Cluster:
        """A cluster with a store namespace and this server running in it."""
        cluster = make_cluster(hosts, store_ns=True)
        self.start(cluster)
        return cluster


def _etcd_leases(cluster: topo.Cluster) -> dict[str, dict[str, Any]]:
    prefix = "/coreos.com/network/subnets/"
    doc = json.loads(cluster.etcd.etcdctl("get", "--prefix", prefix, "-w", "json"))
    return {
        base64.b64decode(kv["key"]).decode().removeprefix(prefix): json.loads(base64.b64decode(kv["value"]))
        for kv in doc.get("kvs", [])
    }


ETCD = StoreServer(
    "etcd",
    start=lambda cluster: cluster.start_etcd(),
    store_args=lambda cluster: ["--store", "etcd", "--etcd-endpoints", cluster.etcd_endpoint],
    leases=_etcd_leases,
)

CONSUL_PORT = 8500


def consul_address(cluster: topo.Cluster) -> str:
    return f"{topo.STORE_ADDRESS.ip}:{CONSUL_PORT}"


def consul_http(cluster: topo.Cluster, method: str, path: str) -> Any:
    """One request to the fake Consul, made from inside the store namespace; the JSON answer."""
    assert cluster.store_ns is not None
    script = (
        "import sys, urllib.request as u; "
        "r = u.Request(sys.argv[1], method=sys.argv[2]); "
        "sys.stdout.write(u.urlopen(r, timeout=10).read().decode())"
    )
    url = f"http://{consul_address(cluster)}{path}"
    out = topo.run(topo.ns_exec(cluster.store_ns, [sys.executable, "-c", script, url, method])).stdout
    return json.loads(out) if out.strip() else None


def _start_consul(cluster: topo.Cluster) -> None:
    """The fake Consul (``overlayd.testing.consul_server``) as a process in the store namespace."""
    assert cluster.store_ns is not None, "build the cluster with store_ns=True"
    argv = [sys.executable, "-m", "overlayd.testing.consul_server", "--host", str(topo.STORE_ADDRESS.ip)]
    proc = cluster.start_process(cluster.store_ns, [*argv, "--port", str(CONSUL_PORT)], "consul.log")

    def listening() -> bool:
        if not proc.running:
            raise topo.TopologyError(f"the fake Consul exited:\n{proc.log_tail()}")
        return "listening on" in proc.log_tail()

    topo.wait_until(listening, 30, what="the fake Consul listening")


def _consul_leases(cluster: topo.Cluster) -> dict[str, dict[str, Any]]:
    prefix = "coreos.com/network/subnets/"
    doc = consul_http(cluster, "GET", f"/v1/kv/{prefix}?recurse") or []
    return {kv["Key"].removeprefix(prefix): json.loads(base64.b64decode(kv["Value"])) for kv in doc}


CONSUL = StoreServer(
    "consul",
    start=_start_consul,
    store_args=lambda cluster: ["--store", "consul", "--consul-address", consul_address(cluster)],
    leases=_consul_leases,
)


def check_mesh_and_leases(cluster: topo.Cluster, server: StoreServer, figures: Any, *extra: str) -> None:
    """Three daemons on *server* reach a full mesh; the store holds flannel's lease values."""
    start = time.monotonic()
    bring_up(cluster, daemon_args(server.store_args(cluster), *extra))
    figures.add(
        f"{server.name} store, {len(cluster.hosts)} hosts: first daemon start to full mesh of routes "
        f"in {time.monotonic() - start:.2f} s"
    )
    assert_full_mesh(cluster)
    leases = server.leases(cluster)
    nets = subnets(cluster)
    assert len(leases) == len(cluster.hosts)
    for host in cluster.hosts:
        value = leases[str(nets[host.index]).replace("/", "-")]
        assert value["PublicIP"] == str(host.underlay.ip)
        assert value["BackendType"] == "vxlan"
        assert value["BackendData"]["VtepMAC"]


def check_restart_and_join(cluster: topo.Cluster, server: StoreServer, figures: Any, *extra: str) -> None:
    """A crashed daemon comes back on its subnet; a joining host is reached by every peer."""
    args = daemon_args(server.store_args(cluster), *extra)
    bring_up(cluster, args, init_args=server.store_args(cluster))
    victim = cluster.hosts[0]
    before = victim.subnet_env()
    victim.daemon.kill()
    victim.restart_daemon(fresh=True)
    assert victim.wait_ready(30).subnet == before.subnet  # type: ignore[union-attr]
    new = cluster.add_host()
    new.start_daemon(args)
    env = new.wait_ready(30)
    ready = time.monotonic()
    new.attach_container(env)
    for peer in cluster.hosts[:-1]:
        topo.wait_until(lambda p=peer: p.container.ping(new.container.address.ip, count=1).ok, 2.0,
                        what=f"{peer.name} reaching {new.name}")  # fmt: skip
    figures.add(
        f"{server.name} store: joining host ready to reachable from every peer in {time.monotonic() - ready:.2f} s"
    )
    wait_full_mesh_routes(cluster)
    assert_full_mesh(cluster, count=1)
    assert len(server.leases(cluster)) == len(cluster.hosts)


# -- fault figures ------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU of *pid* (``/proc/PID/stat`` fields 14 and 15)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def log_lines(host: topo.Host) -> int:
    """Lines in *host*'s daemon log so far."""
    assert host.daemon is not None
    return len(host.daemon.log_path.read_text(errors="replace").splitlines())


def log_since(host: topo.Host, lines: int) -> list[str]:
    """The daemon log lines of *host* after the first *lines*."""
    assert host.daemon is not None
    return host.daemon.log_path.read_text(errors="replace").splitlines()[lines:]


VXLAN_DEV = "flannel.1"


@attrs.frozen
class VxlanState:
    """What a host's kernel holds for the overlay, read back with ``ip``/``bridge`` (not overlayd)."""

    mac: str | None  # the VXLAN device's MAC, None when the device is missing
    routes: frozenset[tuple[str, str]]  # (dst, gateway) via the device
    neighbours: frozenset[tuple[str, str]]  # (address, lladdr), permanent
    fdb: frozenset[tuple[str, str]]  # (mac, underlay dst)


def vxlan_state(host: topo.Host) -> VxlanState:
    link = host.ip("-j", "link", "show", VXLAN_DEV, check=False)
    if link.returncode != 0:
        return VxlanState(None, frozenset(), frozenset(), frozenset())
    mac = str(json.loads(link.stdout)[0]["address"])
    routes = frozenset((str(r["dst"]), str(r.get("gateway"))) for r in host.routes() if r.get("dev") == VXLAN_DEV)
    neigh = json.loads(host.ip("-j", "neigh", "show", "dev", VXLAN_DEV).stdout or "[]")
    fdb = json.loads(topo.run(["bridge", "-n", host.ns, "-j", "fdb", "show", "dev", VXLAN_DEV]).stdout or "[]")
    return VxlanState(
        mac,
        routes,
        frozenset((str(n["dst"]), str(n.get("lladdr"))) for n in neigh if "PERMANENT" in n.get("state", [])),
        frozenset((str(e["mac"]), str(e["dst"])) for e in fdb if e.get("dst")),
    )


def wait_state(
    host: topo.Host,
    want: VxlanState,
    timeout: float,
    what: str,
    read: Callable[[topo.Host], VxlanState] = vxlan_state,
) -> float:
    """Seconds until *host*'s overlay state (as *read* reads it) equals *want* (polled every 20 ms)."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        have = read(host)
        if have == want:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: after {timeout} s {host.name} holds {have}, want {want}")
        time.sleep(0.02)
