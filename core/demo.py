"""``overlayd demo``: a multi-host overlay in network namespaces on this machine, in one command.

Design note.  The demo is a thin script over ``_topology``: build a switch and N hosts, run one
real ``overlayd`` per host (the installed command, as an operator would), give each host a
"container" on a cni0 bridge from the subnet file, then show what happened — the leases, an NxN
ping matrix between containers, an iperf3 figure — and remove everything again.  It is a CLI
command, so it owns the process: it installs signal handlers so that Ctrl-C or SIGTERM still
cleans up, and it exits 0 only when every ping got through (2 for usage errors such as not being
root, 1 for a failed run).

Scale.  Every host talks to every other over the shared underlay, so the cluster needs about
``hosts * (hosts + 1)`` dynamic ARP entries, and the kernel keeps them in one neighbour table
for all namespaces, bounded by ``net.ipv4.neigh.default.gc_thresh3`` (1024 by default), which
only the root namespace can change (on Linux 6.x the ``gc_thresh*`` sysctls do not exist inside
a namespace).  The demo never touches the root namespace's sysctls, so it refuses a ``--hosts``
that would overflow that table (50 hosts lost 226 of 2450 pings with "neighbor table overflow")
and names the sysctl that an operator may raise.  A step that finds a failure says FAILED, never
ok, even when it raised nothing.

``--ipv6`` shows a dual-stack cluster: the hosts get an IPv6 underlay address as well
(2001:db8::/32, see ``_topology``), the network config written to the store adds flannel's
``EnableIPv6`` with ``IPv6Network`` fd00::/48 and ``IPv6SubnetLen`` 64, each container gets an
address of both families from the host's subnet file, and the ping matrix runs once per family
(``ping -6`` between the containers' IPv6 addresses).  A subnet file without the IPv6 pair is a
failure that says so, rather than a silent IPv4-only demo.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import types
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import click

from . import _topology as topo

log = logging.getLogger(__name__)

IPERF_PORT = 5201
IPERF_SECONDS = 3
IPV6_NETWORK = IPv6Network("fd00::/48")  # the overlay's IPv6 network with --ipv6
IPV6_SUBNET_LEN = 64
FAMILY_NAME = {4: "IPv4", 6: "IPv6"}


class Progress:
    """One line per step; on a terminal the line shows a live elapsed time until the step ends."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self._detail = ""
        self._failed = False
        self._lock = threading.Lock()

    def _write(self, text: str) -> None:
        with self._lock:
            self.stream.write(text)
            self.stream.flush()

    def update(self, detail: str) -> None:
        self._detail = detail

    def fail(self, detail: str) -> None:
        """Mark the current step failed (it ends with FAILED, not ok) without raising."""
        self._detail = detail
        self._failed = True

    @contextlib.contextmanager
    def step(self, title: str) -> Iterator[Progress]:
        start = time.monotonic()
        self._detail = ""
        self._failed = False
        stop = threading.Event()
        ticker: threading.Thread | None = None
        if self.tty:

            def tick() -> None:
                frames = "|/-\\"
                i = 0
                while not stop.wait(0.1):
                    extra = f" {self._detail}" if self._detail else ""
                    self._write(f"\r\033[K {frames[i % 4]} {title}{extra} ({time.monotonic() - start:.1f}s)")
                    i += 1

            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        else:
            self._write(f"[{start - self.t0:6.1f}s] {title} ... ")
        ok = False
        try:
            yield self
            ok = not self._failed
        finally:
            stop.set()
            if ticker is not None:
                ticker.join()
            took = time.monotonic() - start
            extra = f" {self._detail}" if self._detail else ""
            mark = "ok" if ok else "FAILED"
            if self.tty:
                self._write(f"\r\033[K {'✓' if ok else '✗'} {title}{extra} ({took:.1f}s)\n")
            else:
                self._write(f"{mark}{extra} ({took:.1f}s)\n")


NEIGH_TABLE_SYSCTL = "/proc/sys/net/ipv4/neigh/default/gc_thresh3"
NEIGH_TABLE_SYSCTL6 = "/proc/sys/net/ipv6/neigh/default/gc_thresh3"  # IPv6 has a table of its own (--ipv6)
NEIGH_RESERVE = 128  # entries left for everything else on the machine (the table is shared)


def neighbour_entries_needed(hosts: int) -> int:
    """Dynamic neighbour entries a demo cluster needs: each host resolves every other host's
    underlay address, plus the container and cni0 gateway entries of each host."""
    return hosts * (hosts - 1) + 2 * hosts


def neighbour_table_size(path: str = NEIGH_TABLE_SYSCTL) -> int | None:
    """The kernel's neighbour-table limit (read-only), or None when it cannot be read."""
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None


def max_hosts_for(table_size: int) -> int:
    """The largest host count whose neighbour entries fit in *table_size* with a reserve."""
    hosts = 2
    while neighbour_entries_needed(hosts + 1) <= table_size - NEIGH_RESERVE:
        hosts += 1
    return hosts


def check_scale(hosts: int, table_size: int | None, family: int = 4) -> str | None:
    """Why *hosts* would overflow the IPv*family* neighbour table, or None when it fits."""
    if table_size is None or neighbour_entries_needed(hosts) <= table_size - NEIGH_RESERVE:
        return None
    return (
        f"--hosts {hosts} needs about {neighbour_entries_needed(hosts)} neighbour entries, but the kernel's "
        f"table holds {table_size} for all namespaces (net.ipv{family}.neigh.default.gc_thresh3, set only in the "
        f"root namespace); use --hosts {max_hosts_for(table_size)} or fewer, or raise gc_thresh3 (and gc_thresh2)"
    )


def _raise_interrupt(signum: int, frame: types.FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _store_args(store: str, cluster: topo.Cluster) -> list[str]:
    if store == "etcd":
        return ["--store", "etcd", "--etcd-endpoints", cluster.etcd_endpoint]
    return ["--store", "embedded", "--embedded-path", str(cluster.workdir / "store.db")]


def fetch_leases(cluster: topo.Cluster, store_args: list[str]) -> list[dict[str, Any]]:
    """``overlayd leases --json`` run inside host0 (where an etcd on the underlay is reachable)."""
    proc = cluster.overlayd_cli(*store_args, "--log-level", "error", "leases", "--json")
    if proc.returncode != 0:
        raise topo.TopologyError(f"overlayd leases failed: {proc.stderr.strip() or proc.stdout.strip()}")
    doc = json.loads(proc.stdout)
    rows = doc["leases"] if isinstance(doc, dict) else doc
    return [row for row in rows if isinstance(row, dict)]


def network_config(network: str, backend: str, ipv6: bool) -> dict[str, Any]:
    """flannel's network config for the demo: *network* (IPv4) and, with *ipv6*, fd00::/48 too."""
    config: dict[str, Any] = {"Network": network, "Backend": {"Type": backend}}
    if ipv6:
        config.update(EnableIPv6=True, IPv6Network=str(IPV6_NETWORK), IPv6SubnetLen=IPV6_SUBNET_LEN)
    return config


def _row_family(row: dict[str, Any]) -> int:
    """A lease row's family: a row read from a ``v6-subnets/`` key has only ``ipv6_subnet``."""
    return 4 if row.get("subnet") else 6


def format_leases(cluster: topo.Cluster, rows: list[dict[str, Any]]) -> list[str]:
    by_ip = {str(a.ip): h.name for h in cluster.hosts for a in h.underlay_addresses}
    table = [("SUBNET", "HOST", "PUBLIC IP", "BACKEND", "VTEP MAC", "EXPIRES")]
    for row in rows:
        v6 = _row_family(row) == 6
        subnet = row.get("ipv6_subnet") if v6 else row.get("subnet")
        public = (row.get("public_ipv6") or row.get("public_ip")) if v6 else row.get("public_ip")
        data = (row.get("backend_v6_data") if v6 else row.get("backend_data")) or {}
        table.append(
            (
                str(subnet),
                by_ip.get(str(public), "?"),
                str(public),
                str(row.get("backend_type") or "-"),
                str(data.get("VtepMAC", "-")) if isinstance(data, dict) else "-",
                str(row.get("expiration") or "never")[:19],
            )
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in table]


def format_matrix(cluster: topo.Cluster, results: dict[tuple[int, int], topo.PingResult]) -> list[str]:
    names = [h.name for h in cluster.hosts]
    width = max(10, *(len(n) for n in names))
    lines = ["from \\ to".ljust(width) + "".join(n.rjust(width + 2) for n in names)]
    for a in cluster.hosts:
        cells = []
        for b in cluster.hosts:
            res = results.get((a.index, b.index))
            if a is b or res is None:
                cell = "-"
            elif res.ok and res.rtt_avg_ms is not None:
                cell = f"{res.rtt_avg_ms:.3f} ms"
            else:
                cell = f"FAIL {res.received}/{res.sent}"
            cells.append(cell.rjust(width + 2))
        lines.append(a.name.ljust(width) + "".join(cells))
    return lines


def run_iperf(cluster: topo.Cluster, client: topo.Host, server: topo.Host) -> float:
    """TCP throughput in bit/s from *client*'s container to *server*'s, bounded in time."""
    if client.container is None or server.container is None:
        raise topo.TopologyError("iperf3 needs a container on both hosts")
    src_ns, dst_ns = client.container.ns, server.container.ns
    dst = str(server.container.address.ip)
    srv = cluster.start_process(dst_ns, ["iperf3", "-s", "-1", "-B", dst, "-p", str(IPERF_PORT)], "iperf3-server.log")
    try:

        def listening() -> bool:
            if not srv.running:
                raise topo.TopologyError(f"iperf3 server exited: {srv.log_tail(5)}")
            out = topo.run(topo.ns_exec(dst_ns, ["ss", "-Hltn", f"sport = :{IPERF_PORT}"]), check=False)
            return bool(out.stdout.strip())

        topo.wait_until(listening, 10, what="iperf3 server listening")
        argv = ["iperf3", "-c", dst, "-p", str(IPERF_PORT), "-t", str(IPERF_SECONDS), "-J"]
        proc = topo.run(topo.ns_exec(src_ns, argv), check=False, timeout=IPERF_SECONDS + 20)
        try:
            result = json.loads(proc.stdout)
        except ValueError as exc:
            raise topo.TopologyError(f"iperf3 gave no JSON: {(proc.stdout + proc.stderr)[-300:]}") from exc
        try:
            return float(result["end"]["sum_received"]["bits_per_second"])
        except (KeyError, TypeError) as exc:
            raise topo.TopologyError(f"iperf3 failed: {result.get('error', 'no result')}") from exc
    finally:
        srv.stop(timeout=2)


def _subnets(env: topo.SubnetEnv) -> str:
    return "+".join(str(s.network) for s in (env.subnet, env.ipv6_subnet) if s is not None)


def _networks(env: topo.SubnetEnv) -> list[IPv4Network | IPv6Network]:
    return [s.network for s in (env.subnet, env.ipv6_subnet) if s is not None]


def _human_bits(bps: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.2f} {unit}"
    return f"{bps:.0f} bit/s"


def _wait_peer_routes(host: topo.Host, peers: list[IPv4Network | IPv6Network], timeout: float) -> None:
    def present() -> bool:
        have = {r.get("dst") for family in {p.version for p in peers} for r in host.routes(family)}
        return all(str(p) in have for p in peers)

    topo.wait_until(present, timeout, what=f"routes to every peer on {host.name}")


def _check_families(envs: dict[int, topo.SubnetEnv], families: tuple[int, ...]) -> None:
    """Every host's subnet file carries each family the network config asked for."""
    for index, env in envs.items():
        missing = [f for f in families if f not in env.families]
        if missing:
            keys = " / ".join("FLANNEL_IPV6_SUBNET" if f == 6 else "FLANNEL_SUBNET" for f in missing)
            raise topo.TopologyError(
                f"host{index}'s subnet file has no {keys}: the daemon did not lease an "
                f"{'/'.join(FAMILY_NAME[f] for f in missing)} subnet (does this overlayd support EnableIPv6?)"
            )


def run_demo(
    hosts: int,
    backend: str,
    store: str,
    keep: bool,
    network: str,
    timeout: float,
    out: Any = None,
    *,
    ipv6: bool = False,
) -> int:
    """The demo itself; returns the exit code.  Cleans up on every path unless *keep*."""
    echo = (lambda text: click.echo(text, file=out)) if out is not None else click.echo
    progress = Progress()
    cluster = topo.Cluster(hosts, store_ns=(store == "etcd"), keep=keep, ipv6=ipv6)
    families = (4, 6) if ipv6 else (4,)
    all_ok = False
    try:
        with progress.step(f"building {hosts} hosts on a switch (prefix {cluster.prefix})"):
            cluster.build()
        if store == "etcd":
            with progress.step(f"starting etcd at {cluster.etcd_endpoint} in {cluster.store_ns}"):
                cluster.start_etcd(timeout=timeout)
        store_args = _store_args(store, cluster)
        global_args = [
            *store_args,
            "--backend", backend,
            "--network", network,
            "--healthz-port", "0",
            "--resync-period", "5",
            "--log-level", "info",
        ]  # fmt: skip
        shown = f"{network} + {IPV6_NETWORK}" if ipv6 else network
        with progress.step(f"writing the network config {shown} to the store (overlayd network init)"):
            if ipv6:
                conf = cluster.workdir / "net-conf.json"
                conf.write_text(json.dumps(network_config(network, backend, ipv6)))
                how = ["--from-json", str(conf)]
            else:
                how = ["--network", network, "--backend", backend]
            init = cluster.overlayd_cli(*store_args, "--log-level", "error", "network", "init", *how)
            if init.returncode != 0:
                raise topo.TopologyError(f"overlayd network init failed: {(init.stderr or init.stdout).strip()}")
        with progress.step(f"starting overlayd --backend {backend} --store {store} on every host"):
            for host in cluster.hosts:
                host.start_daemon(global_args)
        with progress.step("waiting for each host's lease (its subnet file)") as p:
            envs = {}
            for host in cluster.hosts:
                envs[host.index] = host.wait_ready(timeout)
                p.update(f"{len(envs)}/{hosts}")
            p.update(", ".join(f"{cluster.hosts[i].name}={_subnets(e)}" for i, e in envs.items()))
            _check_families(envs, families)
        with progress.step("attaching a container to cni0 on every host"):
            for host in cluster.hosts:
                host.attach_container(envs[host.index])
        if backend in ("vxlan", "host-gw"):
            with progress.step("waiting for routes to every peer") as p:
                subnets = {h.index: _networks(envs[h.index]) for h in cluster.hosts}
                for host in cluster.hosts:
                    peers = [s for i, nets in subnets.items() if i != host.index for s in nets]
                    _wait_peer_routes(host, peers, timeout)
                    p.update(f"{host.index + 1}/{hosts}")
        with progress.step("reading the leases back from the store"):
            rows = fetch_leases(cluster, store_args)
        echo("")
        echo(f"Leases ({len(rows)}):")
        for line in format_leases(cluster, rows):
            echo("  " + line)
        matrices: dict[int, dict[tuple[int, int], topo.PingResult]] = {}
        for family in families:
            label = f" ({FAMILY_NAME[family]})" if ipv6 else ""
            with progress.step(f"ping matrix{label}: {hosts * (hosts - 1)} pairs, 3 packets each") as p:
                matrix = cluster.ping_matrix(count=3, timeout=1, family=family)
                lost = sum(1 for r in matrix.values() if not r.ok)
                if lost or not matrix:
                    p.fail(f"{lost} of {len(matrix)} pairs failed")
            matrices[family] = matrix
        for family, matrix in matrices.items():
            echo("")
            if family == 4:
                what = "ping -c 3 -W 1, container .2 to container .2"
            else:
                what = "ping -6 -c 3 -W 1, container ::2 to container ::2"
            label = f"{FAMILY_NAME[family]} c" if ipv6 else "C"
            echo(f"{label}ontainer ping matrix (average RTT of {what}):")
            for line in format_matrix(cluster, matrix):
                echo("  " + line)
        results = {(f, a, b): r for f, matrix in matrices.items() for (a, b), r in matrix.items()}
        failed = [(f, a, b) for (f, a, b), r in results.items() if not r.ok]
        echo("")
        for family, matrix in matrices.items():
            rtts = [r.rtt_avg_ms for r in matrix.values() if r.rtt_avg_ms is not None]
            if rtts:
                label = f"{FAMILY_NAME[family]} " if ipv6 else ""
                echo(
                    f"{label}RTT: median {statistics.median(rtts):.3f} ms, max {max(rtts):.3f} ms "
                    f"over {len(rtts)} pairs"
                )
        if failed:
            echo("iperf3: skipped, the containers do not reach each other")
        elif shutil.which("iperf3"):
            try:
                with progress.step(f"iperf3 {IPERF_SECONDS}s TCP, host0 container -> host1 container"):
                    bps = run_iperf(cluster, cluster.hosts[0], cluster.hosts[1])
                echo(f"Throughput host0 -> host1 (TCP, {IPERF_SECONDS}s, MTU {envs[0].mtu}): {_human_bits(bps)}")
            except topo.TopologyError as exc:
                echo(f"iperf3: no figure ({exc})")
        else:
            echo("iperf3: not installed, no throughput figure")
        if failed:
            echo(f"FAILED: {len(failed)} of {len(results)} pings did not get through: "
                 + ", ".join(f"host{a}->host{b}" + (f" (IPv{f})" if ipv6 else "") for f, a, b in failed))  # fmt: skip
            for f, a, b in failed[:3]:
                log.info("ping host%d->host%d (IPv%d): %s", a, b, f, results[(f, a, b)].output)
            echo(f"daemon logs: {cluster.workdir}/host*/overlayd.log" + ("" if keep else " (removed on exit)"))
        else:
            both = " for IPv4 and IPv6" if ipv6 else ""
            echo(f"OK: all {len(results)} container pairs reach each other over the {backend} overlay{both}")
        all_ok = not failed and bool(results)
    except topo.TopologyError as exc:
        echo(f"overlayd demo: {exc}")
        return 1
    except TimeoutError as exc:
        echo(f"overlayd demo: {exc}")
        for host in cluster.hosts:
            if host.daemon is not None:
                echo(f"--- {host.name} overlayd log (tail) ---\n{host.daemon.log_tail(15)}")
        return 1
    except KeyboardInterrupt:
        echo("\ninterrupted; cleaning up")
        return 130
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # do not leave half a cleanup
        try:
            if keep:
                cluster.detach()
                echo("")
                echo(f"Kept: namespaces {cluster.prefix}*, files in {cluster.workdir}.")
                echo(f"  e.g. ip netns exec {cluster.prefix}c0 ping 10.244.x.2; ip -n {cluster.prefix}h0 route")
                if ipv6:
                    c0, h0 = f"{cluster.prefix}c0", f"{cluster.prefix}h0"
                    echo(f"       ip netns exec {c0} ping -6 fd00:0:0:x::2; ip -n {h0} -6 route")
                echo("  remove with: overlayd demo --cleanup")
            else:
                with progress.step("cleaning up namespaces and processes"):
                    cluster.cleanup()
        finally:
            signal.signal(signal.SIGINT, previous)
    return 0 if all_ok else 1


@click.command("demo")
@click.option(
    "--hosts", type=click.IntRange(2, topo.MAX_HOSTS), default=3, show_default=True, help="Number of namespace hosts."
)
@click.option("--backend", default="vxlan", show_default=True, help="Backend plugin the daemons use.")
@click.option(
    "--store",
    "store_name",
    type=click.Choice(["embedded", "etcd"]),
    default="embedded",
    show_default=True,
    help="Where the leases live: a shared SQLite file, or an etcd in a namespace.",
)
@click.option("--network", default="10.244.0.0/16", show_default=True, help="Overlay network CIDR (10.x).")
@click.option(
    "--timeout",
    type=click.FloatRange(1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for each step (leases, routes).",
)
@click.option(
    "--ipv6",
    is_flag=True,
    help=f"Dual-stack: IPv6 underlay addresses too, the overlay adds {IPV6_NETWORK} (EnableIPv6), pings both families.",
)
@click.option("--keep", is_flag=True, help="Leave the namespaces and daemons running; remove later with --cleanup.")
@click.option(
    "--cleanup",
    "cleanup_only",
    is_flag=True,
    help="Only remove what earlier demo runs (--keep, or a crash) left behind.",
)
def demo_command(
    hosts: int, backend: str, store_name: str, network: str, timeout: float, ipv6: bool, keep: bool, cleanup_only: bool
) -> None:  # fmt: skip
    """A multi-host cluster in network namespaces on this machine: leases, ping matrix, iperf3.

    Builds a switch namespace with one namespace per host, runs one overlayd per host, attaches a
    container namespace to each, pings every container from every other, and removes it all.
    Needs root.  Exit code 0 only when every ping got through.
    """
    if os.geteuid() != 0:
        click.echo("overlayd demo: needs root (it creates network namespaces); run it with sudo", err=True)
        sys.exit(2)
    if cleanup_only:
        removed = topo.cleanup_leftovers()
        click.echo(f"removed {len(removed)} namespaces" + (f": {', '.join(removed)}" if removed else ""))
        return
    try:
        net = IPv4Network(network)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--network") from exc
    if not net.subnet_of(IPv4Network("10.0.0.0/8")):
        raise click.BadParameter("the demo keeps overlays inside 10.0.0.0/8", param_hint="--network")
    too_many = check_scale(hosts, neighbour_table_size())
    if ipv6 and not too_many:
        too_many = check_scale(hosts, neighbour_table_size(NEIGH_TABLE_SYSCTL6), family=6)
    if too_many:
        raise click.BadParameter(too_many, param_hint="--hosts")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _raise_interrupt)
    code = run_demo(hosts, backend, store_name, keep, str(net), timeout, ipv6=ipv6)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover - ``python -m overlayd.demo`` until the CLI registers it
    demo_command()
