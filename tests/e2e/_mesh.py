"""Helpers shared by the end-to-end tests: daemon options, bring-up, route and ping checks."""

from __future__ import annotations

import subprocess
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

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
    cluster: topo.Cluster, args: list[str], hosts: list[topo.Host] | None = None, *, init_args: list[str] | None = None
) -> None:
    """Start a daemon on each host, wait for its subnet file, attach its container, wait for routes.

    With *init_args* (the store options), the network config is written first with
    ``overlayd network init``; without, the daemons create it from ``--network`` on a cold store.
    """
    if init_args is not None:
        init_network(cluster, init_args)
    hosts = cluster.hosts if hosts is None else hosts
    for host in hosts:
        host.start_daemon(args)
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
