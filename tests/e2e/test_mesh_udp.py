"""The three-host mesh on the udp backend and the etcd store: the daemons' forwarders carry the
containers' traffic; killing one host's forwarder is repaired by its daemon's next pass."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from overlayd import _topology as topo

from ._mesh import NETWORK, RESYNC, assert_full_mesh

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.timeout(300)]

METRICS_PORT = 9181
_FETCH = (
    "import sys, urllib.request; "
    "sys.stdout.write(urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/metrics', timeout=5).read().decode())"
)


def forwarder_metrics(host: topo.Host) -> dict[str, float]:
    """``overlayd_forwarder_*_total`` from the host's /metrics (served on 127.0.0.1 in its namespace)."""
    out = {}
    for line in host.exec([sys.executable, "-c", _FETCH, str(METRICS_PORT)]).stdout.splitlines():
        if line.startswith("overlayd_forwarder_"):
            name, value = line.rsplit(" ", 1)
            out[name.removeprefix("overlayd_forwarder_").removesuffix("_total")] = float(value)
    return out


@pytest.fixture(autouse=True)
def _needs_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.skip("needs Debian's etcd binary (apt-get install etcd-server)")
    if importlib.util.find_spec("overlayd.stores.etcd") is None:
        pytest.skip("the etcd store is not installed")


def udp_args(cluster: topo.Cluster) -> list[str]:
    return [
        "--store", "etcd", "--etcd-endpoints", cluster.etcd_endpoint,
        "--backend", "udp", "--network", NETWORK,
        "--healthz-port", str(METRICS_PORT), "--resync-period", str(RESYNC), "--log-level", "debug",
    ]  # fmt: skip


def forwarder_pid(host: topo.Host) -> int | None:
    """The daemon's ``overlayd.udpfwd`` child, found through /proc."""
    assert host.daemon is not None and host.daemon.pid is not None
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:"))
        if ppid == host.daemon.pid and b"overlayd.udpfwd" in cmdline:
            return int(entry.name)
    return None


def test_udp_mesh_over_etcd_and_a_killed_forwarder_comes_back(make_cluster, figures):
    cluster = make_cluster(3, store_ns=True)
    cluster.start_etcd()
    start = time.monotonic()
    for host in cluster.hosts:
        host.ip("link", "set", "lo", "up")  # the metrics endpoint listens on 127.0.0.1 in the host
        host.start_daemon(udp_args(cluster))
    for host in cluster.hosts:
        env = host.wait_ready(30)
        assert env.mtu == 1472  # underlay 1500 - 28
        host.attach_container(env)
    topo.wait_until(lambda: all(r.ok for r in cluster.ping_matrix(count=1, timeout=1).values()), 30, what="udp mesh")
    took = time.monotonic() - start
    figures.add(f"udp backend, etcd store, 3 hosts: first daemon start to full mesh in {took:.2f} s")
    assert_full_mesh(cluster)

    h0 = cluster.hosts[0]
    routes = [(r["dst"], r["dev"]) for r in h0.routes()]
    assert (NETWORK, "flannel0") in routes
    assert not [r for r in routes if r[1] == "flannel0" and r[0] != NETWORK], "per-peer state is not kernel routes"

    old = forwarder_pid(h0)
    assert old is not None
    os.kill(old, signal.SIGKILL)
    killed = time.monotonic()
    c0, c1 = h0.container, cluster.hosts[1].container
    assert c0 is not None and c1 is not None
    topo.wait_until(lambda: c0.ping(c1.address.ip, count=1).ok, RESYNC * 5, what="traffic after the kill")
    figures.add(f"udp forwarder killed: traffic back in {time.monotonic() - killed:.2f} s (resync {RESYNC:g} s)")
    new = forwarder_pid(h0)
    assert new is not None and new != old
    assert h0.daemon is not None and h0.daemon.running
    assert_full_mesh(cluster, count=1)

    counters = forwarder_metrics(h0)  # the Network.counters() hook, exported by the daemon
    assert counters["restarts"] == 1, counters
    assert counters["tx_packets"] > 0 and counters["rx_packets"] > 0 and counters["rx_spoofed"] == 0, counters
