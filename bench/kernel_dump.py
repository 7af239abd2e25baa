"""What a full read-back of the kernel costs: pyroute2 (the un-cached daemon's way) versus the
kernel-state cache's resync, with and without kernel-side filtering (NETLINK_GET_STRICT_CHK).

One namespace gets a VXLAN device with N peers' objects (N routes of protocol 79, N permanent
neighbours, N FDB entries) plus ``--foreign`` routes of another protocol and neighbours on another
device — what a busy node also holds (Kubernetes pod routes, the underlay's ARP table), and what
a filtered dump never sends to user space.  Each reader runs ``--repeat`` times; the median is
printed.

Usage (root): ``.venv/bin/python bench/kernel_dump.py [--peers 5000] [--foreign 5000]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

DEV = "flannel.1"


def populate(ns: str, peers: int, foreign: int) -> None:
    from overlayd.testing import netns

    netns.run(ns, "ip", "link", "add", DEV, "type", "vxlan", "id", "1", "local", "192.0.2.1", "dev", "eth0")
    netns.run(ns, "ip", "link", "set", DEV, "up")
    ip_lines, bridge_lines = [], []
    for i in range(peers):
        gw = f"10.{64 + (i >> 8)}.{i & 0xFF}.0"
        mac = f"02:00:00:00:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"
        ip_lines.append(f"neigh replace {gw} lladdr {mac} dev {DEV} nud permanent")
        ip_lines.append(f"route replace {gw}/24 via {gw} dev {DEV} onlink proto 79")
        bridge_lines.append(f"fdb append {mac} dev {DEV} dst 198.51.100.{i % 250 + 1} self permanent")
    for i in range(foreign):
        net = f"172.{16 + (i >> 16)}.{(i >> 8) & 0xFF}.{i & 0xFF}"
        ip_lines.append(f"route replace {net}/32 via 192.0.2.9 proto static")
        if i < 4000:
            mac = f"02:00:00:01:{(i >> 8) & 0xFF:02x}:{i & 0xFF:02x}"
            ip_lines.append(f"neigh replace 192.0.{3 + (i >> 8)}.{i & 0xFF} lladdr {mac} dev eth0 nud permanent")
    work = Path(tempfile.mkdtemp(prefix="overlayd-dump-"))
    (work / "ip").write_text("\n".join(ip_lines) + "\n")
    (work / "bridge").write_text("\n".join(bridge_lines) + "\n")
    netns.run(ns, "ip", "addr", "add", "192.0.3.1/16", "dev", "eth0")
    netns.run(ns, "ip", "-batch", str(work / "ip"), timeout=600)
    netns.run(ns, "bridge", "-batch", str(work / "bridge"), timeout=600)


def timed(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", type=int, default=5000)
    parser.add_argument("--foreign", type=int, default=5000, help="routes (and up to 4000 neighbours) not ours")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/kernel_dump.py needs root (network namespaces)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from overlayd import netlink
    from overlayd.kernelcache import KernelCache
    from overlayd.testing import netns

    host, peer = netns.create_netns("dumphost"), netns.create_netns("dumppeer")
    try:
        netns.veth(host, "eth0", peer, "eth0", "192.0.2.1/24", "192.0.2.2/24")
        populate(host, args.peers, args.foreign)
        with netns.in_netns(host):

            def pyroute2_read() -> frozenset[object]:
                with netlink.iproute() as ipr:
                    return netlink.read_routes(ipr) | netlink.read_neighbours(ipr, DEV) | netlink.read_fdb(ipr, DEV)

            strict, loose = KernelCache(DEV), KernelCache(DEV, strict=False)
            strict.open()
            loose.open()
            t_py, want = timed(pyroute2_read, max(1, args.repeat // 2))
            t_loose, _ = timed(lambda: (loose.resync(), loose.objects())[1], args.repeat)
            t_strict, _ = timed(lambda: (strict.resync(), strict.objects())[1], args.repeat)
            assert strict.objects() == loose.objects() == want, "the readers disagree"
            strict.close()
            loose.close()
        n = len(want)  # type: ignore[arg-type]
        print(f"full read-back of {n} overlayd objects among {args.foreign} foreign routes (median of runs):")
        print(f"  pyroute2 dump + decode (un-cached daemon) {t_py * 1000:8.1f} ms")
        print(f"  struct decode, no kernel filter           {t_loose * 1000:8.1f} ms  ({t_py / t_loose:.0f}x faster)")
        print(f"  struct decode, strict kernel filter       {t_strict * 1000:8.1f} ms  ({t_py / t_strict:.0f}x faster)")
        print(f"  kernel-side filtering alone: {t_loose / t_strict:.1f}x")
    finally:
        netns.cleanup_all()


if __name__ == "__main__":
    main()
