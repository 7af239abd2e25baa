"""Overlay throughput and latency against the bare underlay, for several backends in one run.

Builds one cluster in network namespaces (the demo's topology: veths into a switch bridge) with a
pair of hosts per backend, each pair on its own store and network, runs ``overlayd`` on each host,
then measures with iperf3 (TCP, one stream) and ping, taking the rounds in turn (underlay, then
each backend) so every figure sees the same machine load:

* underlay: the first pair's host0 -> host1 (the physical limit here: veth + bridge);
* overlay:  container -> container on each pair, through its backend (vxlan: encapsulated;
  host-gw: routed, full MTU).

Prints each figure and the overlay/underlay ratio per backend, and the machine's load average
(the machine may be shared; re-run on a quiet one for figures to publish).  Everything is
removed afterwards.

Usage (root): ``.venv/bin/python bench/throughput.py [--backends vxlan,host-gw] [--seconds 5] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from ipaddress import IPv4Address

from overlayd import _topology as topo

PORT = 5299


def iperf(cluster: topo.Cluster, client_ns: str, server_ns: str, server_ip: IPv4Address, seconds: int) -> float:
    server = cluster.start_process(server_ns, ["iperf3", "-s", "-1", "-B", str(server_ip), "-p", str(PORT)], "ip3.log")
    try:
        topo.wait_until(
            lambda: topo.run(topo.ns_exec(server_ns, ["ss", "-Hltn", f"sport = :{PORT}"]), check=False).stdout.strip(),
            10,
            what="iperf3 server",
        )
        out = topo.run(
            topo.ns_exec(client_ns, ["iperf3", "-c", str(server_ip), "-p", str(PORT), "-t", str(seconds), "-J"]),
            timeout=seconds + 30,
        )
        return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"])
    finally:
        server.stop(timeout=2)


def rtt(ns: str, dst: IPv4Address) -> float:
    result = topo.ping(ns, dst, count=50, timeout=1, interval=0.01)
    assert result.ok and result.rtt_avg_ms is not None, result
    return result.rtt_avg_ms


def start_pair(cluster: topo.Cluster, pair: list[topo.Host], backend: str, network: str) -> None:
    store = ["--embedded-path", str(cluster.workdir / f"{backend}.db")]
    init = cluster.overlayd_cli(*store, "network", "init", "--network", network, "--backend", backend,
                                host=pair[0].index)  # fmt: skip
    assert init.returncode == 0, init.stderr
    for host in pair:
        host.start_daemon([*store, "--resync-period", "10", "--log-level", "warning"])
    for host in pair:
        host.attach_container(host.wait_ready(30))
    a, b = pair[0].container, pair[1].container
    assert a is not None and b is not None
    topo.wait_until(lambda: a.ping(b.address.ip, count=1).ok, 15, what=f"{backend} overlay up")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="vxlan,host-gw", help="comma-separated backends to measure")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/throughput.py needs root (network namespaces)")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    cluster = topo.Cluster(2 * len(backends))
    try:
        cluster.build()
        pairs = {b: cluster.hosts[2 * i : 2 * i + 2] for i, b in enumerate(backends)}
        for i, (backend, pair) in enumerate(pairs.items()):
            start_pair(cluster, pair, backend, f"10.{244 + i}.0.0/16")
        h0, h1 = pairs[backends[0]]
        under: list[float] = []
        over: dict[str, list[float]] = {b: [] for b in backends}
        for _ in range(args.rounds):
            under.append(iperf(cluster, h0.ns, h1.ns, h1.underlay.ip, args.seconds))
            for backend, (a, b) in pairs.items():
                assert a.container is not None and b.container is not None
                over[backend].append(
                    iperf(cluster, a.container.ns, b.container.ns, b.container.address.ip, args.seconds)
                )
        rtt_under = rtt(h0.ns, h1.underlay.ip)

        load = os.getloadavg()
        u = statistics.median(under)
        print(f"{args.rounds} rounds of {args.seconds} s, one TCP stream; load average {load[0]:.2f} {load[1]:.2f}")
        print(f"{'underlay (host -> host):':<46}median {u / 1e9:6.2f} Gbit/s  {[round(x / 1e9, 2) for x in under]}")
        print(f"ping RTT underlay (50 x 10 ms): {rtt_under:.3f} ms")
        for backend, (a, b) in pairs.items():
            assert a.container is not None and b.container is not None
            o = statistics.median(over[backend])
            r = rtt(a.container.ns, b.container.address.ip)
            name = f"{backend} (container -> container, MTU {a.container.mtu}):"
            print(f"{name:<46}median {o / 1e9:6.2f} Gbit/s  {[round(x / 1e9, 2) for x in over[backend]]}")
            print(f"  {backend} / underlay throughput: {o / u:.2f}; ping RTT {r:.3f} ms (+{r - rtt_under:.3f} ms)")
    finally:
        cluster.cleanup()


if __name__ == "__main__":
    main()
