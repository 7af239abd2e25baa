"""Control plane at scale: real etcd, the ``overlayd`` daemon, the vxlan backend, N = 100..5000 peers.

One "host" network namespace (underlay veth 192.0.2.1/24 to a second namespace) runs a private
etcd on its loopback and one ``overlayd --store etcd --backend vxlan`` daemon as a subprocess.
The bench runs inside the same namespace and, for each N (smallest first, from a clean kernel):

1. **bulk**: writes N peer leases at once (etcd transactions of 100 puts) and times from the last
   write to the last of the N routes appearing;
2. **idle**: the daemon's CPU % of one core over a window (default 60 s) and its RSS;
3. **no-op event**: rewrites one existing lease with the same value K times and reports the
   daemon's CPU per event (the cost of one event that changes nothing: this must not grow with N);
4. **new peer / deletion latency**: S times (>= 50), writes one new lease and times until its
   route is in the kernel, then deletes it and times until the route is gone (p50 / p99);
5. deletes everything and times until the kernel is clean (reported as "bulk delete").

Routes are seen through a netlink notification socket (RTNLGRP_IPV4_ROUTE) read by a thread of the
bench that decodes only the header and RTA_DST with ``struct``, so watching costs the bench almost
nothing and no polling dump competes with the daemon for the 2 cores; the last step of each phase
confirms with a full count of routes, neighbours and FDB entries.

The physical limit for comparison: ``ip -batch`` programming the same 3N kernel objects.

Usage (root)::

    .venv/bin/python bench/scale.py --peers 100,1000,5000            # the full run (make bench)
    .venv/bin/python bench/scale.py --quick --peers 100,1000          # shorter windows
    .venv/bin/python bench/scale.py --json out.json --plot docs/performance.png \\
        --baseline docs/performance-before.json                       # plot against an earlier run

``--profile DIR`` records the daemon with py-spy (when installed) during the latency phase of the
largest N.  Everything the bench creates is removed on exit; no traffic leaves the namespaces.
This is a benchmark, not a timed test: it prints figures and only fails when something breaks.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

NETWORK = ipaddress.IPv4Network("10.64.0.0/10")  # 16384 /24s: room for 5000 peers and samples
OWN: list[ipaddress.IPv4Network] = []  # the daemon's own subnet, never written by the bench
PREFIX = "/bench/network"
RTPROT_OVERLAYD = 0x4F
RTNLGRP_IPV4_ROUTE = 7
RTM_NEWROUTE, RTM_DELROUTE = 24, 25


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
    net = ipaddress.IPv4Network((int(NETWORK.network_address) + (i + 2) * 256, 24))
    if OWN and net.network_address >= OWN[0].network_address:
        net = ipaddress.IPv4Network((int(net.network_address) + 256, 24))
    return net


def key(i: int) -> str:
    return f"{PREFIX}/subnets/{subnet(i).network_address}-24"


def count_objects() -> tuple[int, int, int]:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        routes = len(ipr.get_routes(family=2, proto=RTPROT_OVERLAYD))
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


def wait_for(check: Callable[[], bool], timeout: float, interval: float = 0.01) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(interval)
    raise TimeoutError("condition not met")


class RouteWatch:
    """Which overlayd routes exist, kept from route notifications; ``when(dst, present)`` waits."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE: never overrun
        self.sock.bind((0, 1 << (RTNLGRP_IPV4_ROUTE - 1)))
        self.present: dict[str, float] = {}  # dst -> when it appeared
        self.gone: dict[str, float] = {}  # dst -> when it was deleted
        self.cond = threading.Condition()
        self.overrun = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except OSError:
                with self.cond:
                    self.overrun = True
                    self.cond.notify_all()
                continue
            now = time.monotonic()
            offset = 0
            updates = []
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if kind in (RTM_NEWROUTE, RTM_DELROUTE):
                    body = offset + 16
                    family, dst_len, _, _, _table, proto = struct.unpack_from("=BBBBBB", data, body)
                    if family == socket.AF_INET and proto == RTPROT_OVERLAYD:
                        attr = body + 12
                        while attr + 4 <= offset + length:
                            alen, atype = struct.unpack_from("=HH", data, attr)
                            if alen < 4:
                                break
                            if atype == 1:  # RTA_DST
                                dst = f"{socket.inet_ntoa(data[attr + 4 : attr + 8])}/{dst_len}"
                                updates.append((kind == RTM_NEWROUTE, dst))
                            attr += (alen + 3) & ~3
                offset += (length + 3) & ~3
            if updates:
                with self.cond:
                    for added, dst in updates:
                        if added:
                            self.present[dst] = now
                            self.gone.pop(dst, None)
                        else:
                            self.present.pop(dst, None)
                            self.gone[dst] = now
                    self.cond.notify_all()

    def wait(self, check: Callable[[], bool], timeout: float) -> None:
        with self.cond:
            if not self.cond.wait_for(lambda: check() or self.overrun, timeout):
                raise TimeoutError("condition not met")
            if self.overrun:
                raise RuntimeError("the bench's own route watch overran")

    def appeared(self, dst: str, timeout: float) -> float:
        self.wait(lambda: dst in self.present, timeout)
        return self.present[dst]

    def vanished(self, dst: str, timeout: float) -> float:
        self.wait(lambda: dst in self.gone, timeout)
        return self.gone[dst]


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def write_many(client: Any, lease: Any, indexes: range) -> None:
    for batch in range(indexes.start, indexes.stop, 100):
        client.transaction(
            compare=[],
            success=[
                client.transactions.put(key(i), peer_value(i), lease=lease)
                for i in range(batch, min(indexes.stop, batch + 100))
            ],
            failure=[],
        )


def measure(
    n: int, args: argparse.Namespace, client: Any, lease: Any, daemon: subprocess.Popen[bytes]
) -> dict[str, Any]:
    watch = args.watch
    result: dict[str, Any] = {"n": n}
    idle_window = args.idle_seconds

    # 1. n peers written at once
    cpu_before = proc_stats(daemon.pid)[1]
    started = time.monotonic()
    write_many(client, lease, range(n))
    last_write = time.monotonic()
    last_route = max(watch.appeared(str(subnet(i)), args.timeout) for i in range(n))
    wait_for(lambda: count_objects() == (n, n, n), args.timeout, 0.2)
    result["write_s"] = last_write - started
    result["bulk_s"] = max(0.0, last_route - last_write)
    result["bulk_cpu_s"] = proc_stats(daemon.pid)[1] - cpu_before
    print(f"  N={n}: written in {result['write_s']:.2f} s, all routed {result['bulk_s']:.2f} s after the last write")

    # 2. idle
    time.sleep(1.0)
    cpu0 = proc_stats(daemon.pid)[1]
    time.sleep(idle_window)
    rss1, cpu1 = proc_stats(daemon.pid)
    result["idle_cpu_pct"] = 100 * (cpu1 - cpu0) / idle_window
    result["rss_mib"] = rss1
    print(f"  N={n}: idle {result['idle_cpu_pct']:.2f} % of a core over {idle_window:.0f} s, RSS {rss1:.1f} MiB")

    # 3. no-op events: the same value written again
    k = args.noop_events
    cpu0 = proc_stats(daemon.pid)[1]
    for _ in range(k):
        client.put(key(0), peer_value(0), lease=lease)
        time.sleep(args.noop_gap)
    time.sleep(max(0.5, args.noop_gap))
    cpu1 = proc_stats(daemon.pid)[1]
    idle_share = (cpu1 - cpu0) - (result["idle_cpu_pct"] / 100) * (k * args.noop_gap + max(0.5, args.noop_gap))
    result["noop_event_ms"] = max(0.0, idle_share) / k * 1000
    print(f"  N={n}: a no-op event costs the daemon {result['noop_event_ms']:.1f} ms of CPU")

    # 4. new-peer and deletion latency
    profiler = start_profiler(args, daemon.pid, n)
    adds: list[float] = []
    dels: list[float] = []
    for j in range(args.samples):
        i = n + j
        dst = str(subnet(i))
        time.sleep(args.gap)
        client.put(key(i), peer_value(i), lease=lease)
        written = time.monotonic()
        adds.append(watch.appeared(dst, args.timeout) - written)
        time.sleep(args.gap)
        client.delete(key(i))
        written = time.monotonic()
        dels.append(watch.vanished(dst, args.timeout) - written)
    stop_profiler(profiler)
    result.update(
        add_p50_ms=pct(adds, 50) * 1000,
        add_p99_ms=pct(adds, 99) * 1000,
        del_p50_ms=pct(dels, 50) * 1000,
        del_p99_ms=pct(dels, 99) * 1000,
    )
    print(
        f"  N={n}: new peer p50 {result['add_p50_ms']:.1f} ms p99 {result['add_p99_ms']:.1f} ms; "
        f"deletion p50 {result['del_p50_ms']:.1f} ms p99 {result['del_p99_ms']:.1f} ms ({len(adds)} each)"
    )

    # 5. everything deleted
    started = time.monotonic()
    client.delete_prefix(f"{PREFIX}/subnets/")
    wait_for(lambda: count_objects() == (0, 0, 0), args.timeout, 0.05)
    result["bulk_delete_s"] = time.monotonic() - started
    return result


def start_profiler(args: argparse.Namespace, pid: int, n: int) -> subprocess.Popen[bytes] | None:
    if not args.profile or n != max(args.peer_counts):
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(spy):
        print("  (py-spy not installed: no profile)")
        return None
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [spy, "record", "--pid", str(pid), "--rate", "200", "--format", "raw", "-o", str(out / f"daemon-n{n}.txt")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_profiler(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(60)


def inner(args: argparse.Namespace) -> None:
    import importlib

    import overlayd.stores.etcd  # noqa: F401  (sets the protobuf workaround before etcd3 is imported)

    etcd3 = importlib.import_module("etcd3")
    from overlayd.testing.etcd import EtcdServer

    work = Path(tempfile.mkdtemp(prefix="overlayd-bench-"))
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    args.watch = RouteWatch()
    results = []
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
                str(args.resync_period),
                "--log-level",
                args.log_level,
            ],
            stdout=log,
            stderr=log,
        )
        try:
            wait_for(lambda: (work / "subnet.env").exists(), 30, 0.05)
            env = dict(line.split("=", 1) for line in (work / "subnet.env").read_text().split())
            OWN.append(ipaddress.IPv4Network(env["FLANNEL_SUBNET"], strict=False))
            lease = client.lease(3600)
            for n in args.peer_counts:
                results.append(measure(n, args, client, lease, daemon))
            for n in args.peer_counts:
                if n <= args.baseline_max:
                    results_by_n = {r["n"]: r for r in results}
                    results_by_n[n]["ip_batch_s"] = ip_batch_baseline(n, work)
        except BaseException:
            print((work / "daemon.log").read_text()[-3000:], file=sys.stderr)
            raise
        finally:
            daemon.terminate()
            daemon.wait(10)
            if args.log_level == "debug":
                Path("/tmp/overlayd-bench-daemon.log").write_text((work / "daemon.log").read_text())
            subprocess.run(["ip", "link", "del", "flannel.1"], check=False)
            shutil.rmtree(work, ignore_errors=True)
    Path(args.result_file).write_text(json.dumps(results))


def ip_batch_baseline(n: int, work: Path) -> float:
    """Time for iproute2 itself to create n neighbours + n FDB entries + n routes on a scratch device."""
    subprocess.run(
        [
            *("ip", "link", "add", "bench.1", "type", "vxlan", "id", "9", "local", "192.0.2.1"),
            *("dev", "eth0", "dstport", "8999", "nolearning"),
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


COLUMNS = [
    ("N", "n", "{:d}"),
    ("new p50 ms", "add_p50_ms", "{:.1f}"),
    ("new p99 ms", "add_p99_ms", "{:.1f}"),
    ("del p50 ms", "del_p50_ms", "{:.1f}"),
    ("del p99 ms", "del_p99_ms", "{:.1f}"),
    ("N at once s", "bulk_s", "{:.2f}"),
    ("ip-batch s", "ip_batch_s", "{:.2f}"),
    ("no-op event ms CPU", "noop_event_ms", "{:.1f}"),
    ("idle CPU %", "idle_cpu_pct", "{:.2f}"),
    ("RSS MiB", "rss_mib", "{:.0f}"),
]


def table(results: list[dict[str, Any]]) -> str:
    """A Markdown table (it reads fine in a terminal too)."""
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "|" + "|".join("-" * (len(c[0]) + 2) for c in COLUMNS) + "|"
    rows = ["| " + " | ".join(fmt.format(r[k]) if k in r else "-" for _, k, fmt in COLUMNS) + " |" for r in results]
    return "\n".join([head, rule, *rows])


def plot(
    results: list[dict[str, Any]], baseline: list[dict[str, Any]] | None, path: str, label: str = "this run"
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed — pip install '.[bench]' — no plot)")
        return
    panels = [
        ("new peer latency (ms)", ["add_p50_ms", "add_p99_ms"]),
        ("deletion latency (ms)", ["del_p50_ms", "del_p99_ms"]),
        ("N peers at once (s)", ["bulk_s"]),
        ("CPU per no-op event (ms)", ["noop_event_ms"]),
        ("idle CPU (% of a core)", ["idle_cpu_pct"]),
        ("RSS (MiB)", ["rss_mib"]),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (title, keys) in zip(axes.flat, panels, strict=True):
        for name, data, style in (("before caches", baseline, "--"), (label, results, "-")):
            if not data:
                continue
            xs = [r["n"] for r in data]
            for k in keys:
                ax.plot(xs, [r.get(k, float("nan")) for r in data], style, marker="o", label=f"{name} {k}")
        ax.set_xscale("log")
        if "ms" in title:
            ax.set_yscale("log")  # before and after differ by orders of magnitude
        ax.set_title(title)
        ax.set_xlabel("peers (N)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot written to {path}")


def outer(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from overlayd.testing import netns

    result_file = Path(tempfile.mkstemp(prefix="overlayd-bench-", suffix=".json")[1])
    host, peer = netns.create_netns("benchhost"), netns.create_netns("benchpeer")
    try:
        netns.veth(host, "eth0", peer, "eth0", "192.0.2.1/24", "192.0.2.2/24")
        argv = [a for a in sys.argv[1:] if a != "--inner"]
        subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                host,
                sys.executable,
                __file__,
                "--inner",
                "--result-file",
                str(result_file),
                *argv,
            ],
            check=True,
        )
        results = json.loads(result_file.read_text())
    finally:
        netns.cleanup_all()
        result_file.unlink(missing_ok=True)
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    if args.plot:
        baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
        plot(results, baseline, args.plot, args.label)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="100,1000,5000", help="comma-separated peer counts")
    parser.add_argument("--quick", action="store_true", help="short idle window and fewer no-op events")
    parser.add_argument("--idle-seconds", type=float, default=None, help="idle CPU window (default 60, quick 10)")
    parser.add_argument("--samples", type=int, default=50, help="new-peer / deletion samples per N (>= 50)")
    parser.add_argument(
        "--gap", type=float, default=0.2, help="pause before each latency-sample write (the daemon is idle)"
    )
    parser.add_argument("--resync-period", type=float, default=300.0, help="the daemon's --resync-period (the audit)")
    parser.add_argument("--timeout", type=float, default=600.0, help="give up waiting for the kernel after this")
    parser.add_argument("--baseline-max", type=int, default=5000, help="run the ip -batch baseline up to this N")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--plot", help="write the scaling plot (PNG) here, e.g. docs/performance.png")
    parser.add_argument("--baseline", help="a --json file of an earlier run, drawn dashed in the plot")
    parser.add_argument("--label", default="this run", help="the legend of this run's curves in the plot")
    parser.add_argument("--profile", help="py-spy the daemon into this directory at the largest N")
    parser.add_argument("--log-level", default="warning", help="the daemon's log level (debug shows pass timings)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.peer_counts = sorted(int(x) for x in args.peers.split(","))
    if args.idle_seconds is None:
        args.idle_seconds = 10.0 if args.quick else 60.0
    args.noop_events = 10 if args.quick else 30
    args.noop_gap = 1.0  # longer than a pass of the un-cached daemon at 1000 peers: events do not merge
    if os.geteuid() != 0:
        sys.exit("bench/scale.py needs root (network namespaces)")
    inner(args) if args.inner else outer(args)


if __name__ == "__main__":
    main()
