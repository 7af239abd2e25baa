"""The udp backend against the bare underlay, host-gw and kernel vxlan, measured in one run.

For each datapath — ``host-gw`` (plain routes: the latency floor), kernel ``vxlan``, ``udp`` with
offloads off (one packet per system call, flannel's C loop done in Python) and ``udp`` with
offloads (TSO on the TUN, UDP GSO, UDP GRO) —
a fresh two-host cluster is built (``overlayd._topology``: veths into a switch bridge, underlay
MTU 1500) and, alternating underlay and overlay runs so both see the same machine load:

* TCP throughput, one iperf3 stream; UDP throughput and packets/s (iperf3 ``-u -b 0``,
  1400-byte datagrams, received rate);
* CPU per packet: CPU time of the processes that move the bytes during the TCP run — iperf3's
  own sender and receiver figures (user + system, so the kernel work done in their system calls)
  plus the udp forwarders' (/proc) — divided by the packets carried (bytes / MSS).  Softirq work
  done outside those processes is not counted (it is for vxlan's encapsulation), so read it as a
  comparison of the userspace cost, not a total;
* ping RTT, the median of 100 pings 10 ms apart, measured first, on idle paths.

Every figure is the median of ``--rounds`` and printed as a ratio of the bare underlay (same
cluster, same round) and of vxlan.  ``uptime``'s load is printed with each datapath.

Usage (root): ``.venv/bin/python bench/udp.py [--seconds 3] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

from overlayd import _topology as topo

PORT = 5298
MSS = 1448


def forwarder_cpu(daemons: list[int]) -> float:
    """CPU seconds (user + system) used so far by the udp forwarder children of *daemons*."""
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if b"overlayd.udpfwd" not in (entry / "cmdline").read_bytes():
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) in daemons:  # fields[1] is the parent pid
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def iperf(
    cluster: topo.Cluster, client: str, server: str, ip: IPv4Address, seconds: int, udp: bool, daemons: list[int]
) -> dict[str, float]:
    proc = cluster.start_process(server, ["iperf3", "-s", "-1", "-B", str(ip), "-p", str(PORT)], "ip3.log")
    try:
        topo.wait_until(
            lambda: topo.run(topo.ns_exec(server, ["ss", "-Hltn", f"sport = :{PORT}"]), check=False).stdout.strip(),
            10,
            what="iperf3 server",
        )
        extra = ["-u", "-b", "0", "-l", "1400"] if udp else []
        before = forwarder_cpu(daemons)
        out = topo.run(
            topo.ns_exec(client, ["iperf3", "-c", str(ip), "-p", str(PORT), "-t", str(seconds), "-J", *extra]),
            timeout=seconds + 30,
        )
        forwarders = forwarder_cpu(daemons) - before
        end = json.loads(out.stdout)["end"]
        usage = end["cpu_utilization_percent"]
        cpu = (usage["host_total"] + usage["remote_total"]) / 100 * seconds + forwarders
        if udp:
            summary = end["sum"]
            packets = summary["packets"] - summary["lost_packets"]
            return {"bps": packets * 1400 * 8 / summary["seconds"], "pps": packets / summary["seconds"]}
        received = end["sum_received"]
        packets = received["bytes"] / MSS
        return {"bps": received["bits_per_second"], "cpu_us": cpu / packets * 1e6}
    finally:
        proc.stop(timeout=2)


def rtt(ns: str, dst: IPv4Address, count: int = 100) -> float:
    """Median ping RTT in µs: one late reply on a shared machine would move the mean by hundreds."""
    out = topo.run(topo.ns_exec(ns, ["ping", "-n", "-c", str(count), "-i", "0.01", "-W", "1", str(dst)]), timeout=60)
    times = [float(m) for m in re.findall(r"time=([\d.]+) ms", out.stdout)]
    assert len(times) >= count * 0.9, out.stdout[-300:]
    return statistics.median(times) * 1000


def measure(backend: str, extra: list[str], seconds: int, rounds: int) -> dict[str, dict[str, float]]:
    cluster = topo.Cluster(2)
    try:
        cluster.build()
        store = ["--embedded-path", str(cluster.workdir / "store.db")]
        init = cluster.overlayd_cli(*store, "network", "init", "--network", "10.244.0.0/16", "--backend", backend)
        assert init.returncode == 0, init.stderr
        for host in cluster.hosts:
            host.start_daemon([*store, *extra, "--resync-period", "10", "--log-level", "warning"])
        envs = [host.wait_ready(30) for host in cluster.hosts]
        for host, env in zip(cluster.hosts, envs, strict=True):
            host.attach_container(env)
        h0, h1 = cluster.hosts
        c0, c1 = h0.container, h1.container
        assert c0 is not None and c1 is not None
        topo.wait_until(lambda: c0.ping(c1.address.ip, count=1).ok, 15, what="overlay up")
        daemons = [pid for host in cluster.hosts if host.daemon is not None and (pid := host.daemon.pid) is not None]
        # RTT first, on idle paths: after a UDP flood the sockets' buffers take a while to drain
        rtts = {"under": rtt(h0.ns, h1.underlay.ip), "over": rtt(c0.ns, c1.address.ip)}
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in ("u_tcp", "o_tcp", "u_udp", "o_udp")}
        for _ in range(rounds):
            runs["u_tcp"].append(iperf(cluster, h0.ns, h1.ns, h1.underlay.ip, seconds, False, daemons))
            runs["o_tcp"].append(iperf(cluster, c0.ns, c1.ns, c1.address.ip, seconds, False, daemons))
            runs["u_udp"].append(iperf(cluster, h0.ns, h1.ns, h1.underlay.ip, seconds, True, daemons))
            runs["o_udp"].append(iperf(cluster, c0.ns, c1.ns, c1.address.ip, seconds, True, daemons))
        out = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
        out["rtt"] = rtts
        out["load"] = {"load1": float(open("/proc/loadavg").read().split()[0])}
        return out
    finally:
        cluster.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/udp.py needs root (network namespaces)")
    datapaths = [
        ("host-gw", "host-gw", []),
        ("vxlan", "vxlan", []),
        ("udp plain", "udp", ["--no-udp-offload"]),
        ("udp offload", "udp", ["--udp-offload"]),
    ]
    results = {}
    for name, backend, extra in datapaths:
        results[name] = measure(backend, extra, args.seconds, args.rounds)
        print(f"measured {name} (load {results[name]['load']['load1']:.2f})", flush=True)
    vx = results["vxlan"]
    fmt: dict[str, Callable[[float], str]] = {
        "bps": lambda v: f"{v / 1e9:6.2f} Gbit/s",
        "pps": lambda v: f"{v / 1e3:7.1f} kpps",
        "cpu_us": lambda v: f"{v:6.2f} us/pkt",
    }
    print(f"\n{args.rounds} rounds of {args.seconds} s, medians; ratios: / bare underlay (same run), / vxlan")
    for name, r in results.items():
        print(f"-- {name} (load1 {r['load']['load1']:.2f})")
        for kind, under, over in (("TCP", "u_tcp", "o_tcp"), ("UDP", "u_udp", "o_udp")):
            for metric, value in r[over].items():
                base, ref = r[under][metric], vx[over][metric]
                print(f"   {kind} {metric:6} {fmt[metric](value)}   underlay {fmt[metric](base)}"
                      f"   x{value / base:.3f} of underlay   x{value / ref:.2f} of vxlan")  # fmt: skip
        added = r["rtt"]["over"] - r["rtt"]["under"]
        gw_added = results["host-gw"]["rtt"]["over"] - results["host-gw"]["rtt"]["under"]
        print(f"   ping RTT overlay {r['rtt']['over']:.0f} us, underlay {r['rtt']['under']:.0f} us,"
              f" added {added:.0f} us ({added - gw_added:+.0f} us vs host-gw's added)")  # fmt: skip


if __name__ == "__main__":
    main()
