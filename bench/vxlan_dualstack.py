"""vxlan over IPv4 and over IPv6, against their underlays: throughput (iperf3) and latency (ping).

Two network namespaces on one bridge, each with a dual-stack underlay (192.0.2.x/24 and
2001:db8::x/64), run the vxlan backend as a library (no daemon, no store): ``flannel.1`` over
IPv4 and ``flannel-v6.1`` over IPv6, each host's merged lease built by hand and the peer's
per-family leases programmed.  Then, in turn (so every figure sees the same machine load):

* underlay v4 / v6: host1 -> host2's eth0 address;
* overlay v4 / v6: host1's VTEP -> host2's VTEP (``10.44.2.0``, ``fd00:0:0:2::``), encapsulated.

The IPv6 overlay carries 20 bytes more header per packet (MTU 1430 instead of 1450).  Prints each
figure, the overlay/underlay ratio per family, and the load average.  Everything is removed
afterwards.

Usage (root): ``.venv/bin/python bench/vxlan_dualstack.py [--seconds 5] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from overlayd import plan as planmod
from overlayd.backends.vxlan import VxlanBackend, VxlanOptions
from overlayd.config import NetworkConfig
from overlayd.model import Lease, LeaseAttrs
from overlayd.plugin import HostInfo
from overlayd.testing.netns import Segment, cleanup_all, create_netns, in_netns, ip_json, run

CONFIG = NetworkConfig.from_dict({"Network": "10.44.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00::/48"})
PORT = 5299


def build() -> list[str]:
    switch = Segment(create_netns("sw"))
    names, nets, owns = [], [], []
    for i in (1, 2):
        ns = create_netns(f"h{i}")
        switch.attach(ns, "eth0", f"192.0.2.{i}/24")
        run(ns, "ip", "-6", "addr", "add", f"2001:db8::{i}/64", "dev", "eth0", "nodad")
        index = ip_json(ns, "link", "show", "eth0")[0]["ifindex"]
        ip4, ip6 = IPv4Address(f"192.0.2.{i}"), IPv6Address(f"2001:db8::{i}")
        host = HostInfo("eth0", index, 1500, ip4, public_ipv6=ip6, iface_addr=ip4)
        with in_netns(ns):
            net = VxlanBackend(VxlanOptions()).prepare(CONFIG, host)
        attrs_ = LeaseAttrs(ip4, "vxlan", dict(net.backend_data), ip6, net.backend_v6_data)
        own = Lease(IPv4Network(f"10.44.{i}.0/24"), attrs_, None, ipv6_subnet=IPv6Network(f"fd00:0:0:{i}::/64"))
        with in_netns(ns):
            net.activate(own)
        names.append(ns)
        nets.append(net)
        owns.append(own)
    for ns, net, own in zip(names, nets, owns, strict=True):
        peers = [lease.only(v) for lease in owns if lease is not own for v in (4, 6)]
        with in_netns(ns):
            net.apply(planmod.diff(net.desired_state(own, peers), net.actual_state()))
    return names


def iperf(client: str, server: str, dst: str, seconds: int) -> float:
    argv = ["ip", "netns", "exec", server, "iperf3", "-s", "-1", "-B", dst, "-p", str(PORT)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if run(server, "ss", "-Hltn", f"sport = :{PORT}").stdout.strip():
                break
            time.sleep(0.05)
        out = run(client, "iperf3", "-c", dst, "-p", str(PORT), "-t", str(seconds), "-J", timeout=seconds + 30)
        return float(json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"])
    finally:
        proc.kill()
        proc.wait()


def rtt(ns: str, dst: str) -> float:
    out = run(ns, "ping", "-n", "-q", "-c", "50", "-i", "0.01", dst).stdout
    found = re.search(r"= [\d.]+/([\d.]+)/", out)
    assert found, out
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    try:
        h1, h2 = build()
        paths = {
            "underlay v4": "192.0.2.2",
            "overlay v4 (flannel.1)": "10.44.2.0",
            "underlay v6": "2001:db8::2",
            "overlay v6 (flannel-v6.1)": "fd00:0:0:2::",
        }
        bps: dict[str, list[float]] = {name: [] for name in paths}
        rtts: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, dst in paths.items():
                bps[name].append(iperf(h1, h2, dst, args.seconds))
                rtts[name].append(rtt(h1, dst))
        mtu = {d: ip_json(h1, "link", "show", d)[0]["mtu"] for d in ("flannel.1", "flannel-v6.1")}
        print(f"device MTU: {mtu}")
        for name in paths:
            gbps, ms = statistics.median(bps[name]) / 1e9, statistics.median(rtts[name])
            print(f"{name:28s} {gbps:7.2f} Gbit/s  rtt {ms:.3f} ms")
        for family in ("v4", "v6"):
            over = statistics.median(bps[next(n for n in paths if n.startswith(f"overlay {family}"))])
            under = statistics.median(bps[f"underlay {family}"])
            print(f"overlay/underlay {family}: {over / under:.2f}")
        print(f"load average: {os.getloadavg()}")
    finally:
        cleanup_all()


if __name__ == "__main__":
    main()
