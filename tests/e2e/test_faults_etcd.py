"""Faults of the etcd store with container pings running throughout (issue 19), each with its figure.

* **etcd's data wiped** (killed, data dir deleted, a fresh member on the same address): the
  daemons see a store without network config, keep every peer programmed and retry; once the
  config is put back by hand, every daemon re-creates its lease with the same subnet.
* **etcd killed** (SIGKILL) and restarted from its data dir after 20 s in ``make test`` (the cost
  of an outage does not grow with its length: one cheap retry a second) and after the issue's
  60 s in ``make test-faults`` (marker ``faults``): a host that joined during the outage is
  programmed on its peers within about two seconds of the store answering again; daemon CPU
  seconds and log lines written during the outage are measured and bounded.  A reservation made
  before the kill is still there, still without a TTL, after the restart, the join and a daemon
  restart.
* **a 3-member etcd losing its leader** (``make test-faults``): the leader, made the member the
  daemons talk to, is SIGKILLed; the daemons keep the datapath, renew (a 6 s TTL) and watch
  through the new leader.
* **the whole history compacted while a daemon is away** (``make test-faults``): partitioned from
  etcd (a blackhole route in its namespace) or SIGSTOPped with its watch stream stalled; back, it
  lists once and converges, with no watch error loop.

The daemons log at ``info`` (the default level), as an operator would run them, so the
log-line figure is what lands in a journal.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
import signal
import sys
import time

import pytest
from overlayd import _topology as topo

from ._mesh import (
    ETCD,
    NETWORK,
    background_ping,
    bring_up,
    cpu_seconds,
    daemon_args,
    log_lines,
    log_since,
    ping_counts,
    route_dsts,
    subnets,
    vxlan_state,
    wait_full_mesh_routes,
)

pytestmark = [pytest.mark.root, pytest.mark.etcd, pytest.mark.timeout(300)]

RESERVED = "10.244.250.0/24"  # reserved before the faults; it must survive them
RESYNC = 60.0  # the audit period, and how long the leases of a wiped store are held


@pytest.fixture(autouse=True)
def _needs_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.skip("needs Debian's etcd binary (apt-get install etcd-server)")
    if importlib.util.find_spec("overlayd.stores.etcd") is None:
        pytest.skip("the etcd store is not installed")


def _args(cluster: topo.Cluster) -> list[str]:
    return daemon_args(ETCD.store_args(cluster), "--log-level", "info", "--resync-period", str(RESYNC))


def test_wiped_etcd_keeps_every_peer_and_each_lease_comes_back_with_its_subnet(make_cluster, figures):
    cluster = make_cluster(3, store_ns=True)
    cluster.start_etcd()
    store_args = ETCD.store_args(cluster)
    bring_up(cluster, _args(cluster), init_args=store_args)
    before = subnets(cluster)
    want = {h.index: {str(n) for i, n in before.items() if i != h.index} for h in cluster.hosts}

    c0, c2 = cluster.hosts[0].container, cluster.hosts[2].container
    pinger = background_ping(c0.ns, c2.address.ip, 16)
    time.sleep(1)
    cluster.etcd.wipe()  # a fresh, empty etcd on the same address: no config, no leases
    time.sleep(6)  # the daemons have noticed (they retry every second)
    for host in cluster.hosts:
        assert want[host.index] <= route_dsts(host), f"{host.name} dropped peers on an empty store"
        assert host.daemon is not None and host.daemon.running
    assert ETCD.leases(cluster) == {}, "a daemon wrote a lease into a store without network config"

    put_back = time.monotonic()
    proc = cluster.overlayd_cli(*store_args, "network", "init", "--network", NETWORK, "--backend", "vxlan")
    assert proc.returncode == 0, proc.stderr
    expected = {str(n).replace("/", "-") for n in before.values()}
    topo.wait_until(lambda: set(ETCD.leases(cluster)) == expected, 10.0, what="every lease re-created")
    converged = time.monotonic() - put_back
    assert subnets(cluster) == before
    wait_full_mesh_routes(cluster, timeout=5)

    out, sent, received = ping_counts(pinger)
    figures.add(
        f"etcd wiped: {sent - received} of {sent} pings lost (50 ms interval); every lease back with its "
        f"subnet {converged:.2f} s after the config was put back; 0 duplicated"
    )
    assert received == sent, f"pings lost while etcd was wiped: {out.strip()}"
    leases = ETCD.leases(cluster)
    assert len({v["PublicIP"] for v in leases.values()}) == len(leases) == 3  # no host holds two


@pytest.mark.parametrize("outage", [20.0, pytest.param(60.0, marks=pytest.mark.faults)], ids=["20s", "60s"])
def test_killed_etcd_a_joining_host_is_reachable_within_two_seconds_of_the_restart(make_cluster, figures, outage):
    cluster = make_cluster(3, store_ns=True)
    cluster.start_etcd()
    args = _args(cluster)
    bring_up(cluster, args, init_args=ETCD.store_args(cluster))

    reserved = cluster.overlayd_cli(*ETCD.store_args(cluster), "reserve", RESERVED, "198.51.100.99")
    assert reserved.returncode == 0, reserved.stderr
    c0, c2 = cluster.hosts[0].container, cluster.hosts[2].container
    pinger = background_ping(c0.ns, c2.address.ip, outage + 4)
    time.sleep(1)
    cluster.etcd.kill()  # SIGKILL: connections refused until it is back
    down = time.monotonic()
    pids = {h.name: h.daemon.pid for h in cluster.hosts if h.daemon is not None and h.daemon.pid}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    lines0 = {h.name: log_lines(h) for h in cluster.hosts}
    new = cluster.add_host()
    new.start_daemon(args)  # joins during the outage: it keeps retrying until etcd answers
    time.sleep(max(0.0, outage - (time.monotonic() - down)))
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    lines = {h.name: log_lines(h) - lines0[h.name] for h in cluster.hosts[:3]}
    lasted = time.monotonic() - down
    assert all(h.daemon is not None and h.daemon.running for h in cluster.hosts[:3])

    cluster.etcd.start()
    back = time.monotonic()  # start() returns once etcd answers its health check
    env = new.wait_ready(10)
    nets = {str(env.subnet.network)}
    for peer in cluster.hosts[:3]:
        topo.wait_until(lambda p=peer: nets <= route_dsts(p), 10.0, what=f"{peer.name} programming {new.name}")
    programmed = time.monotonic() - back
    new.attach_container(env)
    for peer in cluster.hosts[:3]:
        assert peer.container is not None
        topo.wait_until(lambda p=peer: p.container.ping(new.container.address.ip, count=1).ok, 10.0,
                        what=f"{peer.name} reaching {new.name}")  # fmt: skip
    reachable = time.monotonic() - back

    out, sent, received = ping_counts(pinger)
    figures.add(
        f"etcd SIGKILLed {lasted:.0f} s: {sent - received} of {sent} pings lost; daemon CPU during the outage "
        f"{max(cpu.values()):.2f} s (max of 3; {max(cpu.values()) * 60 / lasted:.2f} s per 60 s); log lines "
        f"during the outage {max(lines.values())} (max of 3); a host joining during the outage programmed on "
        f"every peer {programmed:.2f} s and pinged {reachable:.2f} s after etcd answered"
    )
    assert received == sent, f"pings lost while etcd was down: {out.strip()}"
    assert programmed <= 2.5, f"peers programmed the new host {programmed:.2f} s after etcd was back"
    assert max(cpu.values()) * 60 / lasted <= 1.0, f"daemon CPU during the outage: {cpu}"
    assert max(lines.values()) <= 10, f"log lines during the outage: {lines}"
    wait_full_mesh_routes(cluster)
    # the reservation survived the outage, the join and a daemon restart: still there, still without TTL
    assert str(env.subnet.network) != RESERVED
    cluster.hosts[1].restart_daemon()
    cluster.hosts[1].wait_ready(30)
    key = "/coreos.com/network/subnets/" + RESERVED.replace("/", "-")
    [kv] = json.loads(cluster.etcd.etcdctl("get", key, "-w", "json"))["kvs"]
    assert not kv.get("lease") and json.loads(base64.b64decode(kv["value"]))["PublicIP"] == "198.51.100.99"


@pytest.mark.faults  # about 30 s
def test_etcd_leader_killed_daemons_renew_and_watch_through_the_new_leader(make_cluster, figures):
    """Three members, the daemons given all three endpoints; the leader -- made the member the
    daemons talk to, so that they must move -- is SIGKILLed and stays dead."""
    cluster = make_cluster(3, store_ns=True)
    cluster.start_etcd(members=3)
    etcd = cluster.etcd
    ttl = 6.0  # renewed every 2 s: a daemon that cannot renew through the new leader loses its lease
    args = daemon_args(
        ETCD.store_args(cluster),  # every member's endpoint
        "--log-level", "info", "--resync-period", str(RESYNC),
        "--etcd-ttl", str(ttl), "--etcd-renew-margin", str(ttl - 2),
    )  # fmt: skip
    bring_up(cluster, args, init_args=ETCD.store_args(cluster))
    before = subnets(cluster)
    etcd.move_leader(etcd.members[0])  # the first endpoint: where every daemon's calls go
    leader = etcd.leader()
    assert leader is etcd.members[0]

    c0, c2 = cluster.hosts[0].container, cluster.hosts[2].container
    window = 2 * ttl + 4
    pinger = background_ping(c0.ns, c2.address.ip, window + 4)
    time.sleep(1)
    pids = {h.name: h.daemon.pid for h in cluster.hosts if h.daemon is not None and h.daemon.pid}
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    lines0 = {h.name: log_lines(h) for h in cluster.hosts}
    leader.kill()
    killed = time.monotonic()
    new_leader = topo.wait_until(lambda: _leader_or_none(etcd), 15.0, what="a new etcd leader")
    elected = time.monotonic() - killed
    assert new_leader is not leader

    new = cluster.add_host()  # the watch must deliver its lease through a surviving member
    new.start_daemon(args)
    env = new.wait_ready(15)
    nets = {str(env.subnet.network)}
    for peer in cluster.hosts[:3]:
        topo.wait_until(lambda p=peer: nets <= route_dsts(p), 10.0, what=f"{peer.name} programming {new.name}")
    programmed = time.monotonic() - killed
    time.sleep(max(0.0, window - (time.monotonic() - killed)))  # over two TTLs: renewals must have worked
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    lines = {h.name: log_lines(h) - lines0[h.name] for h in cluster.hosts[:3]}
    lasted = time.monotonic() - killed
    leases = ETCD.leases(cluster)
    assert all(h.daemon is not None and h.daemon.running for h in cluster.hosts)

    out, sent, received = ping_counts(pinger)
    duplicated = len(leases) - len({v["PublicIP"] for v in leases.values()})
    figures.add(
        f"3-member etcd, leader SIGKILLed: {sent - received} of {sent} pings lost; new leader in {elected:.2f} s; "
        f"a host joining after the kill programmed on every peer {programmed:.2f} s after the kill; every lease "
        f"(TTL {ttl:g} s) still held {lasted:.0f} s later; {duplicated} duplicated; daemon CPU over those "
        f"{lasted:.0f} s {max(cpu.values()):.2f} s, log lines {max(lines.values())} (max of 3)"
    )
    assert received == sent, f"pings lost while the leader was down: {out.strip()}"
    assert len(leases) == 4 and duplicated == 0, leases
    assert {i: n for i, n in subnets(cluster).items() if i in before} == before
    assert programmed <= 5.0, f"the joining host was programmed {programmed:.2f} s after the kill"
    assert max(lines.values()) <= 10, lines
    wait_full_mesh_routes(cluster)


def _leader_or_none(etcd: object) -> object | None:
    from overlayd._lab.etcd import EtcdError

    try:
        return etcd.leader()  # type: ignore[attr-defined]
    except (EtcdError, KeyError, ValueError):
        return None


FAKE_MAC = "02:00:00:00:00:99"


def _fake_lease(cluster: topo.Cluster, subnet: str, public_ip: str) -> None:
    value = json.dumps({"PublicIP": public_ip, "BackendType": "vxlan", "BackendData": {"VtepMAC": FAKE_MAC}})
    cluster.etcd.etcdctl("put", f"/coreos.com/network/subnets/{subnet.replace('/', '-')}", value)


@pytest.mark.faults  # about 30 s each
@pytest.mark.parametrize("how", ["partitioned", "SIGSTOP"])
def test_history_compacted_while_a_daemon_is_away_it_relists_once_and_converges(make_cluster, figures, how):
    """While host2's daemon cannot read the store (its traffic to etcd blackholed, or the process
    stopped), a lease is deleted, a host joins, and the whole history is compacted.  Back, the
    daemon's watch cannot resume: it lists once and converges, without a watch error loop."""
    cluster = make_cluster(3, store_ns=True)
    cluster.start_etcd()
    args = _args(cluster)
    victim = cluster.hosts[2]
    # the victim logs at debug, which shows each listing; its figures count info and above only
    bring_up(cluster, lambda h: [*args, "--log-level", "debug"] if h is victim else args,
             init_args=ETCD.store_args(cluster))  # fmt: skip
    assert victim.daemon is not None and victim.daemon.pid
    fake = "10.244.251.0/24"
    _fake_lease(cluster, fake, "198.51.100.99")  # a host that will be gone while the victim is away
    for host in cluster.hosts:
        topo.wait_until(lambda h=host: fake in route_dsts(h), 5.0, what=f"{host.name} programming the fake lease")

    c0, c1, c2 = (h.container for h in cluster.hosts)
    away = 10.0
    unchanged = background_ping(c0.ns, c1.address.ip, away + 10)
    to_victim = background_ping(c0.ns, c2.address.ip, away + 10)
    time.sleep(0.5)
    store = str(topo.STORE_ADDRESS.ip)
    if how == "partitioned":
        victim.ip("route", "add", "blackhole", f"{store}/32")
    else:
        victim.daemon.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
    try:
        left = time.monotonic()
        lines0, cpu0 = log_lines(victim), cpu_seconds(victim.daemon.pid)
        cluster.etcd.etcdctl("del", f"/coreos.com/network/subnets/{fake.replace('/', '-')}")
        new = cluster.add_host()
        new.start_daemon(args)
        new.attach_container(new.wait_ready(15))
        if how == "SIGSTOP":
            _flood(cluster, 8)  # more events than the stopped daemon's stream can buffer: etcd gives up on it
        else:
            for _ in range(20):  # history to lose
                cluster.etcd.etcdctl("put", "/coreos.com/network/unrelated", "x")
        revision = cluster.etcd.compact()
        time.sleep(max(0.0, away - (time.monotonic() - left)))
        lines_away = len(_operator_lines(log_since(victim, lines0)))
    finally:
        if how == "partitioned":
            victim.ip("route", "del", "blackhole", f"{store}/32")
        else:
            victim.daemon.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
    back = time.monotonic()
    lines_back = log_lines(victim)
    nets = subnets(cluster)
    want = {str(nets[i]) for i in (0, 1, 3)}
    topo.wait_until(lambda: want <= route_dsts(victim) and fake not in route_dsts(victim), 15.0,
                    what="the victim converged")  # fmt: skip
    converged = time.monotonic() - back
    try:
        topo.wait_until(lambda: c2.ping(new.container.address.ip, count=1).ok, 5.0, what="host2 reaching host3")
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: host2 {vxlan_state(victim)}, host3 {vxlan_state(new)}") from exc
    time.sleep(3)  # long enough for a watch error loop to show
    debug = log_since(victim, lines_back)
    after = _operator_lines(debug)
    cpu = cpu_seconds(victim.daemon.pid) - cpu0
    relists = [line for line in debug if "overlayd.leasecache: listed" in line]
    gone = [line for line in after if "history after revision" in line]  # the watch was told: compacted
    errors = [line for line in after if "WARNING" in line or "ERROR" in line]

    out, sent, received = ping_counts(unchanged)
    out2, sent2, received2 = ping_counts(to_victim)
    leases = ETCD.leases(cluster)
    duplicated = len(leases) - len({v["PublicIP"] for v in leases.values()})
    figures.add(
        f"history compacted (to revision {revision}) while a daemon was {how} {away:.0f} s: converged "
        f"{converged:.2f} s after it was back; {len(relists)} listing(s) ({'after' if gone else 'without'} a "
        f"compacted watch), {len(errors)} warnings, {len(after)} log "
        f"lines after it was back ({lines_away} while away); daemon CPU {cpu:.2f} s; pings between unchanged hosts "
        f"{sent - received} of {sent} lost, to the away host {sent2 - received2} of {sent2} lost; {duplicated} "
        f"leases duplicated"
    )
    assert received == sent, f"pings between unchanged hosts lost: {out.strip()}"
    assert received2 == sent2, f"pings to the away host lost: {out2.strip()}"
    assert len(relists) <= 1 and len(after) <= 10, "\n".join(debug)
    assert duplicated == 0 and len(leases) == 4, leases
    assert converged <= 5.0
    if how == "SIGSTOP":
        assert gone and len(relists) == 1, "the stopped daemon's watch was not compacted: " + "\n".join(debug)


def _operator_lines(lines: list[str]) -> list[str]:
    """The lines an operator running at the default level (info) would see."""
    return [line for line in lines if " DEBUG " not in line]


def _flood(cluster: topo.Cluster, megabytes: int, small: int = 300) -> None:
    """Writes to keys the daemons watch but ignore (outside the lease directory): *megabytes* of
    1 MB values (they fill the stream's flow-control windows of a daemon that does not read), then
    *small* more revisions (more than the 128 responses etcd queues per watch stream, so etcd
    gives up on the stalled watcher and must resume it from its revision later).  One Python
    process with etcd's gRPC client, in the store namespace."""
    script = (
        "import os, sys; os.environ['PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION'] = 'python'; "
        "import etcd3; c = etcd3.client(host=sys.argv[1], port=int(sys.argv[2])); "
        "[c.put('/coreos.com/network/flood-%d' % (i % 10), 'x' * 1000000) for i in range(int(sys.argv[3]))]; "
        "[c.put('/coreos.com/network/flood-small', str(i)) for i in range(int(sys.argv[4]))]"
    )
    argv = [sys.executable, "-c", script, str(topo.STORE_ADDRESS.ip), str(topo.ETCD_CLIENT_PORT), str(megabytes)]
    assert cluster.store_ns is not None
    topo.run(topo.ns_exec(cluster.store_ns, [*argv, str(small)]), timeout=60)
