"""Reconciler scale: lease-to-route latency and 1000 peers at once, on real etcd + the vxlan backend.

One "host" network namespace (underlay veth 192.0.2.1/24 to a second namespace) runs a private
etcd on its loopback and one ``overlayd --store etcd --backend vxlan`` daemon.  The bench, running
inside the same namespace, then:

1. writes 20 peer leases one at a time and times each from the etcd write returning to its route
   being in the kernel (read with netlink, polled every millisecond) — median and p90;
2. writes 1000 peer leases at once (etcd transactions of 100 puts) and times until all 1000 routes,
   neighbours and FDB entries exist, then reports the daemon's RSS and CPU seconds, and the time
   one full resync pass takes with 1000 peers (from the daemon's CPU use over idle resyncs);
3. deletes all of them and times until the kernel is clean again.

The physical limit for comparison: ``ip -batch`` programming the same 3000 kernel objects.

Usage (root): ``.venv/bin/python bench/scale.py [--peers 1000]``.  Everything it creates is
removed on exit; no traffic leaves the namespaces.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NETWORK = ipaddress.IPv4Network("10.64.0.0/12")
PREFIX = "/bench/network"


def underlay_ip(i: int) -> str:
    """Documentation-range addresses for fake peers (never contacted: VXLAN only encapsulates on send)."""
    pools = [ipaddress.IPv4Network(n) for n in ("198.51.100.0/24", "203.0.113.0/24")]
    hosts = [h for pool in pools for h in pool.hosts()]
    return str(hosts[i % len(hosts)])


def peer_value(i: int) -> str:
    mac = f"02:00:00:{(i >> 16) & 0xFF:02x}:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"
    doc = {
        "PublicIP": underlay_ip(i),
        "PublicIPv6": None,
        "BackendType": "vxlan",
        "BackendData": {"VNI": 1, "VtepMAC": mac},
    }
    return json.dumps(doc, separators=(",", ":"))


def subnet(i: int) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network((int(NETWORK.network_address) + (i + 2) * 256, 24))


def count_objects() -> tuple[int, int, int]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        routes = len(ipr.get_routes(family=2, proto=0x4F))
        index = ipr.link_lookup(ifname="flannel.1")
        if not index:
            return routes, 0, 0
        neighs = sum(1 for n in ipr.get_neighbours(family=2, ifindex=index[0]) if n["state"] & 0x80)
        fdb = sum(1 for n in ipr.fdb("dump", ifindex=index[0]) if n["state"] & 0x80)
        return routes, neighs, fdb


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS in MiB, CPU seconds) of a process."""
    with open(f"/proc/{pid}/status") as handle:
        rss = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS")) / 1024
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def wait_for(check, timeout: float, interval: float = 0.001) -> float:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError("condition not met")


def inner(args: argparse.Namespace) -> None:
    import importlib

    import overlayd.stores.etcd  # noqa: F401  (sets the protobuf workaround before etcd3 is imported)

    etcd3 = importlib.import_module("etcd3")
    from overlayd.testing.etcd import EtcdServer

    work = Path(tempfile.mkdtemp(prefix="overlayd-bench-"))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with EtcdServer() as server:
        client = etcd3.client(host="127.0.0.1", port=server.client_port)
        client.put(f"{PREFIX}/config", json.dumps({"Network": str(NETWORK), "Backend": {"Type": "vxlan"}}))
        overlayd_bin = str(Path(sys.executable).with_name("overlayd"))
        log = (work / "daemon.log").open("w")
        daemon = subprocess.Popen(
            [
                overlayd_bin,
                "--store",
                "etcd",
                "--etcd-endpoints",
                server.endpoint,
                "--etcd-prefix",
                PREFIX,
                "--iface",
                "eth0",
                "--subnet-file",
                str(work / "subnet.env"),
                "--resync-period",
                "5",
                "--log-level",
                args.log_level,
            ],
            stdout=log,
            stderr=log,
        )
        try:
            wait_for(lambda: (work / "subnet.env").exists(), 30, 0.05)
            lease = client.lease(3600)

            latencies = []
            for i in range(20):
                net = subnet(2000 + i)
                started = time.monotonic()
                client.put(f"{PREFIX}/subnets/{net.network_address}-24", peer_value(2000 + i), lease=lease)
                written = time.monotonic()
                wait_for(lambda i=i: count_objects()[0] >= i + 1, 10)
                latencies.append((time.monotonic() - written, time.monotonic() - started))
            for i in range(20):
                client.delete(f"{PREFIX}/subnets/{subnet(2000 + i).network_address}-24")
            wait_for(lambda: count_objects() == (0, 0, 0), 30, 0.01)

            n = args.peers
            rss0, cpu0 = proc_stats(daemon.pid)
            started = time.monotonic()
            for batch in range(0, n, 100):
                client.transaction(
                    compare=[],
                    success=[
                        client.transactions.put(
                            f"{PREFIX}/subnets/{subnet(i).network_address}-24", peer_value(i), lease=lease
                        )
                        for i in range(batch, min(n, batch + 100))
                    ],
                    failure=[],
                )
            written = time.monotonic() - started
            programmed = wait_for(lambda: count_objects() == (n, n, n), 300, 0.01) + written
            rss1, cpu1 = proc_stats(daemon.pid)
            time.sleep(11)  # two idle resync passes with n peers
            rss2, cpu2 = proc_stats(daemon.pid)

            removal_start = time.monotonic()
            client.delete_prefix(f"{PREFIX}/subnets/")
            removed = wait_for(lambda: count_objects() == (0, 0, 0), 300, 0.01) + (time.monotonic() - removal_start) * 0
            baseline = ip_batch_baseline(n, work)

            lat_w = sorted(x[0] for x in latencies)
            print(
                f"lease -> route on the peer (20 leases, etcd write acknowledged -> route in kernel): "
                f"median {statistics.median(lat_w) * 1000:.1f} ms, p90 {lat_w[17] * 1000:.1f} ms, "
                f"max {lat_w[-1] * 1000:.1f} ms"
            )
            print(
                f"{n} leases written at once ({written:.2f} s to write): all {3 * n} kernel objects after "
                f"{programmed:.2f} s"
            )
            print(
                f"  physical limit: 'ip -batch' programming the same {3 * n} objects takes {baseline:.2f} s "
                f"(overlayd/ip-batch = {programmed / baseline:.1f}x)"
            )
            print(
                f"daemon RSS: {rss0:.1f} MiB idle, {rss1:.1f} MiB after programming {n} peers, "
                f"{rss2:.1f} MiB after two resyncs"
            )
            print(
                f"daemon CPU: {cpu1 - cpu0:.2f} s to program {n} peers, "
                f"{(cpu2 - cpu1) / 2:.2f} s per idle resync pass with {n} peers"
            )
            print(f"all {n} leases deleted: kernel clean after {removed:.2f} s")
        except BaseException:
            print((work / "daemon.log").read_text()[-3000:], file=sys.stderr)
            subprocess.run(["ip", "route"], check=False)
            raise
        finally:
            daemon.terminate()
            daemon.wait(10)
            if args.log_level == "debug":
                Path("/tmp/overlayd-bench-daemon.log").write_text((work / "daemon.log").read_text())
            subprocess.run(["ip", "link", "del", "flannel.1"], check=False)
            shutil.rmtree(work, ignore_errors=True)


def ip_batch_baseline(n: int, work: Path) -> float:
    """Time for iproute2 itself to create n neighbours + n FDB entries + n routes on a scratch device."""
    subprocess.run(
        [
            "ip",
            "link",
            "add",
            "bench.1",
            "type",
            "vxlan",
            "id",
            "9",
            "local",
            "192.0.2.1",
            "dev",
            "eth0",
            "dstport",
            "8999",
            "nolearning",
        ],
        check=True,
    )
    subprocess.run(["ip", "link", "set", "bench.1", "up"], check=True)
    lines_ip, lines_bridge = [], []
    for i in range(n):
        net = subnet(i)
        gw = net.network_address
        mac = f"02:00:00:{(i >> 16) & 0xFF:02x}:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"
        lines_ip.append(f"neigh replace {gw} lladdr {mac} dev bench.1 nud permanent")
        lines_bridge.append(f"fdb append {mac} dev bench.1 dst {underlay_ip(i)}")
        lines_ip.append(f"route replace {net} via {gw} dev bench.1 onlink proto 200")
    (work / "ip.batch").write_text("\n".join(lines_ip) + "\n")
    (work / "bridge.batch").write_text("\n".join(lines_bridge) + "\n")
    started = time.monotonic()
    subprocess.run(["bridge", "-batch", str(work / "bridge.batch")], check=True)
    subprocess.run(["ip", "-batch", str(work / "ip.batch")], check=True)
    elapsed = time.monotonic() - started
    subprocess.run(["ip", "link", "del", "bench.1"], check=True)
    return elapsed


def outer(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from overlayd.testing import netns

    host, peer = netns.create_netns("benchhost"), netns.create_netns("benchpeer")
    try:
        netns.veth(host, "eth0", peer, "eth0", "192.0.2.1/24", "192.0.2.2/24")
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                host,
                sys.executable,
                __file__,
                "--inner",
                "--peers",
                str(args.peers),
                "--log-level",
                args.log_level,
            ],
            check=True,
        )
    finally:
        netns.cleanup_all()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=1000)
    parser.add_argument("--log-level", default="warning", help="the daemon's log level (debug shows pass timings)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/scale.py needs root (network namespaces)")
    inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    main()
