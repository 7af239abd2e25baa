"""Overlay throughput and latency against the bare underlay, measured in the same run.

Builds a two-host cluster in network namespaces (the demo's topology: veths into a switch bridge),
runs ``overlayd`` with the given backend on each host, then measures with iperf3 (TCP, one stream)
and ping, alternating underlay and overlay runs so both see the same machine load:

* underlay: host0 192.0.2.10 -> host1 192.0.2.11 (the physical limit here: veth + bridge);
* overlay:  container on host0 -> container on host1, through the backend (VXLAN encapsulation).

Prints each figure and the overlay/underlay ratio.  Everything is removed afterwards.

Usage (root): ``.venv/bin/python bench/throughput.py [--backend vxlan] [--seconds 5] [--rounds 3]``
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="vxlan")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/throughput.py needs root (network namespaces)")

    cluster = topo.Cluster(2)
    try:
        cluster.build()
        store = ["--embedded-path", str(cluster.workdir / "store.db")]
        init = cluster.overlayd_cli(*store, "network", "init", "--network", "10.244.0.0/16", "--backend", args.backend)
        assert init.returncode == 0, init.stderr
        for host in cluster.hosts:
            host.start_daemon([*store, "--resync-period", "10", "--log-level", "warning"])
        envs = [host.wait_ready(30) for host in cluster.hosts]
        for host, env in zip(cluster.hosts, envs, strict=True):
            host.attach_container(env)
        h0, h1 = cluster.hosts
        assert h0.container is not None and h1.container is not None
        topo.wait_until(lambda: h0.container.ping(h1.container.address.ip, count=1).ok, 15, what="overlay up")

        under, over = [], []
        for _ in range(args.rounds):
            under.append(iperf(cluster, h0.ns, h1.ns, h1.underlay.ip, args.seconds))
            over.append(iperf(cluster, h0.container.ns, h1.container.ns, h1.container.address.ip, args.seconds))
        rtt_under = rtt(h0.ns, h1.underlay.ip)
        rtt_over = rtt(h0.container.ns, h1.container.address.ip)

        u, o = statistics.median(under), statistics.median(over)
        print(f"backend {args.backend}, MTU {envs[0].mtu}, {args.rounds} rounds of {args.seconds} s, one TCP stream")
        print(f"underlay (host -> host):           median {u / 1e9:.2f} Gbit/s  {[round(x / 1e9, 2) for x in under]}")
        print(f"overlay  (container -> container): median {o / 1e9:.2f} Gbit/s  {[round(x / 1e9, 2) for x in over]}")
        print(f"overlay / underlay throughput:     {o / u:.2f}")
        extra = rtt_over - rtt_under
        print(f"ping RTT (50 x 10 ms): underlay {rtt_under:.3f} ms, overlay {rtt_over:.3f} ms (+{extra:.3f} ms)")
    finally:
        cluster.cleanup()


if __name__ == "__main__":
    main()
