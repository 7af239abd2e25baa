"""Faults of the kernel side with container pings running throughout (issue 19), each with its figure.

* **the VXLAN device deleted by hand** (``ip link del flannel.1``): the kernel takes every route,
  neighbour and FDB entry on it along; the daemon recreates the device with the MAC its lease
  publishes (so no peer has to change anything) and puts every peer's entries back.
* **the underlay link set down and up** (the host's veth in its namespace, flannel #1759):
  afterwards the routes and the VXLAN device are all there, and traffic flows again.
* **netlink failures on apply**: the daemon's kernel writes are refused (every second request of
  a batch answered ``EBUSY``) and then its kernel dumps fail (``ENOBUFS`` on receive), through the
  one test seam at the IO boundary (``overlayd.netlink.FAULTS_ENV``); everything above it runs
  as is.  The daemon keeps running, logs a bounded number of lines, retries with backoff and
  converges once the failures stop, leaving nothing half-made.

The figures: pings lost beyond what the fault itself cuts (goal 0), the daemon's CPU seconds,
time to converge, log lines written during the fault.  The daemons log at ``info``, as an
operator runs them.  Store: the embedded one (the store plays no part in these faults).
"""

from __future__ import annotations

import time
from ipaddress import IPv4Network

import pytest
from overlayd import _topology as topo
from overlayd.api import open_store
from overlayd.netlink import FAULTS_ENV

from ._mesh import (
    VXLAN_DEV,
    VxlanState,
    background_ping,
    bring_up,
    cpu_seconds,
    embedded_args,
    embedded_store_args,
    log_lines,
    log_since,
    ping_counts,
    store_path,
    subnets,
    vxlan_state,
    wait_state,
)

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

INTERVAL = 0.05  # background_ping's interval
OVERLAY = IPv4Network("10.244.0.0/16")


def _args(cluster: topo.Cluster, *extra: str) -> list[str]:
    return embedded_args(cluster, "--log-level", "info", *extra)


def _expected(cluster: topo.Cluster, host: topo.Host, macs: dict[int, str]) -> VxlanState:
    """What *host* must hold for its peers: a route, a neighbour and an FDB entry each."""
    nets = subnets(cluster)
    peers = [p for p in cluster.hosts if p is not host and p.index in macs]
    return VxlanState(
        macs[host.index],
        frozenset((str(nets[p.index]), str(nets[p.index].network_address)) for p in peers),
        frozenset((str(nets[p.index].network_address), macs[p.index]) for p in peers),
        frozenset((macs[p.index], str(p.underlay.ip)) for p in peers),
    )


def _lost_beyond(lost: int, cut_seconds: float) -> int:
    """Pings lost beyond the window the fault itself cuts (one ping in flight either side)."""
    return max(0, lost - int(cut_seconds / INTERVAL) - 2)


def test_vxlan_device_deleted_by_hand_is_back_with_its_mac_and_every_peer(make_cluster, figures):
    cluster = make_cluster(3)
    bring_up(cluster, _args(cluster), init_args=embedded_store_args(cluster))
    victim = cluster.hosts[1]
    before = {h.index: vxlan_state(h) for h in cluster.hosts}
    assert before[1].mac and len(before[1].routes) == len(before[1].fdb) == len(before[1].neighbours) == 2
    c0, c1, c2 = (h.container for h in cluster.hosts)
    through = background_ping(c0.ns, c1.address.ip, 6)  # crosses the victim's device
    beside = background_ping(c0.ns, c2.address.ip, 6)  # does not
    time.sleep(1)
    assert victim.daemon is not None and victim.daemon.pid
    cpu0, lines0 = cpu_seconds(victim.daemon.pid), log_lines(victim)

    victim.ip("link", "del", VXLAN_DEV)
    assert vxlan_state(victim).mac is None
    took = wait_state(victim, before[1], 5.0, "the VXLAN device and every peer's entries back")
    cpu = cpu_seconds(victim.daemon.pid) - cpu0
    lines = log_since(victim, lines0)
    for host in cluster.hosts:
        assert vxlan_state(host) == before[host.index], f"{host.name} changed"

    out, sent, received = ping_counts(through)
    out2, sent2, received2 = ping_counts(beside)
    beyond = _lost_beyond(sent - received, took)
    figures.add(
        f"VXLAN device deleted: back with its MAC and all 2 peers' route/neigh/fdb in {took:.2f} s; pings "
        f"through it {sent - received} of {sent} lost ({beyond} beyond the {took:.2f} s the fault cut); "
        f"pings beside it {sent2 - received2} of {sent2} lost; daemon CPU {cpu:.2f} s; {len(lines)} log lines; "
        f"{_duplicated(cluster)} leases duplicated"
    )
    assert received2 == sent2, f"pings between unaffected hosts lost: {out2.strip()}"
    assert beyond == 0, f"pings lost beyond the repair window: {out.strip()}"
    assert took <= 1.5, f"the device came back after {took:.2f} s"
    assert len(lines) <= 5, lines
    assert _duplicated(cluster) == 0


def _overlay_state(host: topo.Host, backend: str) -> VxlanState:
    """vxlan: the device, routes, neighbours and FDB; host-gw: the routes to peers' subnets."""
    if backend == "vxlan":
        return vxlan_state(host)
    routes = frozenset(
        (str(r["dst"]), f"{r.get('gateway')} dev {r.get('dev')}")
        for r in host.routes()
        if r.get("dev") != "cni0" and "/" in str(r.get("dst")) and IPv4Network(r["dst"]).subnet_of(OVERLAY)
    )
    return VxlanState(None, routes, frozenset(), frozenset())


@pytest.mark.parametrize("backend", ["vxlan", "host-gw"])
def test_underlay_link_down_and_up_keeps_routes_and_the_vxlan_device(make_cluster, figures, backend):
    """flannel #1759: routes (host-gw's go through the underlay device, and the kernel flushes
    them silently when it goes down) and the VXLAN device must all be there after a flap."""
    cluster = make_cluster(3)
    # a cold store: the daemons write the config, with this backend
    bring_up(cluster, _args(cluster, "--backend", backend))
    victim = cluster.hosts[1]
    before = {h.index: _overlay_state(h, backend) for h in cluster.hosts}
    assert len(before[1].routes) == 2, before[1]
    c0, c1, c2 = (h.container for h in cluster.hosts)
    down_for = 5.0
    through = background_ping(c0.ns, c1.address.ip, down_for + 6)
    beside = background_ping(c0.ns, c2.address.ip, down_for + 6)
    time.sleep(1)
    assert victim.daemon is not None and victim.daemon.pid
    cpu0, lines0 = cpu_seconds(victim.daemon.pid), log_lines(victim)

    victim.ip("link", "set", victim.underlay_if, "down")
    down = time.monotonic()
    time.sleep(down_for)
    during = _overlay_state(victim, backend)
    victim.ip("link", "set", victim.underlay_if, "up")
    up = time.monotonic()
    took = wait_state(victim, before[1], 10.0, "routes and the VXLAN device after the link came back",
                      read=lambda h: _overlay_state(h, backend))  # fmt: skip
    topo.wait_until(lambda: c0.ping(c1.address.ip, count=1).ok, 10.0, what="host0 reaching host1 again")
    reachable = time.monotonic() - up
    cpu = cpu_seconds(victim.daemon.pid) - cpu0
    lines = log_since(victim, lines0)
    for host in cluster.hosts:
        assert _overlay_state(host, backend) == before[host.index], f"{host.name} changed"

    out, sent, received = ping_counts(through)
    out2, sent2, received2 = ping_counts(beside)
    beyond = _lost_beyond(sent - received, up - down)
    kept = "kept" if during == before[1] else f"flushed by the kernel ({len(during.routes)} of 2 routes left)"
    figures.add(
        f"{backend}: underlay link down {up - down:.1f} s then up: overlay state {kept} while down; state equal to "
        f"before {took:.2f} s and host0 reaching host1 {reachable:.2f} s after the link came up; pings through it "
        f"{sent - received} of {sent} lost ({beyond} beyond the down window); pings beside it "
        f"{sent2 - received2} of {sent2} lost; daemon CPU {cpu:.2f} s; {len(lines)} log lines; "
        f"{_duplicated(cluster)} leases duplicated"
    )
    assert received2 == sent2, f"pings between unaffected hosts lost: {out2.strip()}"
    assert beyond == 0, f"pings lost beyond the down window: {out.strip()}"
    assert took <= 0.5, f"converged {took:.2f} s after the link came up"  # not at the next backoff retry
    assert not _repeated_warnings(lines), "\n".join(lines)  # the same failure each retry: logged once
    assert _duplicated(cluster) == 0


def _repeated_warnings(lines: list[str]) -> list[str]:
    """Warnings logged more than once (timestamps aside): a log flood in the making."""
    seen: set[str] = set()
    repeated = []
    for line in lines:
        text = line.split(" ", 2)[-1]
        if "WARNING" in text and text in seen:
            repeated.append(line)
        seen.add(text)
    return repeated


def _duplicated(cluster: topo.Cluster) -> int:
    """Leases in the store beyond one per host (read with the embedded store, not the daemons)."""
    store = open_store("embedded", path=str(store_path(cluster)))
    try:
        leases = store.list_leases().leases
    finally:
        store.close()
    return len(leases) - len({lease.attrs.public_ip for lease in leases})


def test_netlink_failures_on_apply_are_retried_and_converge(make_cluster, figures):
    cluster = make_cluster(3)
    faults = cluster.workdir / "netlink-faults"
    victim = cluster.hosts[1]
    args = _args(cluster)
    victim_args = _args(cluster, "--resync-period", "2")  # audits (kernel dumps) every 2 s
    victim.daemon = topo.NsProcess(
        victim.ns,
        victim.daemon_argv(victim_args),
        victim.workdir / "overlayd.log",
        {**topo._child_env(), FAULTS_ENV: str(faults)},
    )
    bring_up(cluster, lambda h: victim_args if h is victim else args, init_args=embedded_store_args(cluster))
    c0, c1, c2 = (h.container for h in cluster.hosts)
    window = 4.0  # each phase of the fault
    beside = background_ping(c0.ns, c2.address.ip, 2 * window + 6)  # unchanged hosts
    from_victim = background_ping(c1.ns, c0.address.ip, 2 * window + 6)  # the victim's existing state
    time.sleep(0.5)
    assert victim.daemon.pid
    cpu0, lines0 = cpu_seconds(victim.daemon.pid), log_lines(victim)

    # phase 1: writes refused -- a host joins, which the victim must program
    faults.write_text("write EBUSY 2\n")
    start = time.monotonic()
    new = cluster.add_host()
    new.start_daemon(args)
    new.attach_container(new.wait_ready(30))
    time.sleep(max(0.0, window - (time.monotonic() - start)))
    during = vxlan_state(victim)
    # phase 2: every kernel dump fails on receive (the audit, every 2 s, reads the kernel)
    faults.write_text("dump ENOBUFS\n")
    time.sleep(window)
    assert victim.daemon.running, victim.daemon.log_tail()
    fault_lines = log_since(victim, lines0)
    cpu = cpu_seconds(victim.daemon.pid) - cpu0
    faults.unlink()
    ended = time.monotonic()

    macs = {h.index: vxlan_state(h).mac for h in cluster.hosts}
    assert all(macs.values()), macs
    want = _expected(cluster, victim, macs)  # type: ignore[arg-type]
    parts = (during.routes & want.routes, during.neighbours & want.neighbours, during.fdb & want.fdb)
    made = sum(len(p) for p in parts) - 3 * (len(cluster.hosts) - 2)  # the new peer's objects made
    half_made = 0 < made < 3
    took = wait_state(victim, want, 10.0, "the victim converged after the failures stopped")
    topo.wait_until(lambda: c1.ping(new.container.address.ip, count=1).ok, 5.0, what="host1 reaching host3")
    reachable = time.monotonic() - ended
    for host in cluster.hosts:
        if host is not victim:
            assert vxlan_state(host) == _expected(cluster, host, macs), f"{host.name} is not converged"

    out, sent, received = ping_counts(beside)
    out2, sent2, received2 = ping_counts(from_victim)
    figures.add(
        f"netlink failures ({window:.0f} s of EBUSY on every 2nd write while a host joined, then {window:.0f} s "
        f"of ENOBUFS on every dump): daemon kept running, {len(fault_lines)} log lines and {cpu:.2f} s CPU "
        f"during the {2 * window:.0f} s; the joining host {'half-made' if half_made else 'absent'} on the victim "
        f"during the fault; converged {took:.2f} s and reaching the new host {reachable:.2f} s after the "
        f"failures stopped; pings between unchanged hosts {sent - received} of {sent} lost, from the victim "
        f"{sent2 - received2} of {sent2} lost"
    )
    assert received == sent, f"pings between unchanged hosts lost: {out.strip()}"
    assert received2 == sent2, f"pings from the victim lost: {out2.strip()}"
    assert took <= 3.0, f"converged {took:.2f} s after the failures stopped"
    assert len(fault_lines) <= 10 and not _repeated_warnings(fault_lines), "\n".join(fault_lines)
    text = "\n".join(fault_lines)
    assert "Device or resource busy" in text and "netlink dump" in text, f"a phase did not bite:\n{text}"
    assert _duplicated(cluster) == 0
