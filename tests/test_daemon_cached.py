"""The daemon's cached loop in a real network namespace with the vxlan backend and a real store.

The daemon runs in-process (a thread inside the namespace) so a test can reach its caches; every
check reads the kernel independently (``ip -j``/``bridge -j``).  The audit period is long
(10 minutes) unless a test is about the audit, so whatever is repaired quickly was repaired from
netlink notifications, not by a periodic full pass.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from overlayd import open_store
from overlayd.daemon import Daemon, DaemonSettings
from overlayd.model import Lease, LeaseAttrs, WatchResult
from overlayd.plugin import Store
from overlayd.testing.netns import bridge_json, call_in_netns, ip_json, netns_factory, run, veth

pytestmark = pytest.mark.root

__all__ = ["netns_factory"]

NET = IPv4Network("10.77.0.0/16")
DEV = "flannel.1"
LONG_AUDIT = 600.0
SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, NETLINK_ADD_MEMBERSHIP = 270, 2, 1
RTNLGRP_IPV4_ROUTE = 7


def peer(i: int) -> Lease:
    attrs = LeaseAttrs(
        public_ip=IPv4Address(f"198.51.100.{i}"),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": f"02:00:00:00:01:{i:02x}"},
    )
    return Lease(IPv4Network(f"10.77.{i}.0/24"), attrs, datetime.now(UTC) + timedelta(hours=1))


def wait_for(check: Callable[[], object], timeout: float, what: str, state: Callable[[], str] | None = None) -> float:
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f": {state()}" if state else ""))
        time.sleep(0.01)
    return time.monotonic() - started


class Host:
    """One daemon (vxlan, embedded store) running in a thread inside namespace *ns*."""

    def __init__(self, ns: str, tmp: Path, resync: float, store: Store | None = None) -> None:
        self.ns = ns
        self.subnet_file = tmp / "subnet.env"
        # the daemon prefers its previous subnet: keep it clear of the peers' 10.77.1-99.0/24,
        # which the tests create by hand (a random pick could take one of them first)
        self.subnet_file.write_text(
            "FLANNEL_NETWORK=10.77.0.0/16\nFLANNEL_SUBNET=10.77.200.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        )
        settings = DaemonSettings(
            store="embedded",
            store_options={"path": str(tmp / "store.db")},
            backend="vxlan",
            network=NET,
            ifaces=("eth0",),
            subnet_file=str(self.subnet_file),
            resync_period=resync,
        )
        self.daemon = Daemon(settings, store=store)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=call_in_netns, args=(ns, self.daemon.run, self.stop), daemon=True)

    def start(self) -> Host:
        self.thread.start()
        wait_for(lambda: self.daemon.status.first_reconcile_done, 20, "the first pass")
        return self

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(15)
        assert not self.thread.is_alive()

    # -- what the kernel holds (read independently) ------------------------------------------------

    def routes(self) -> set[str]:
        return {r["dst"] for r in ip_json(self.ns, "route", "show", "proto", "79")}

    def neighbours(self) -> set[str]:
        return {n["dst"] for n in ip_json(self.ns, "neigh", "show", "dev", DEV) if "PERMANENT" in n.get("state", [])}

    def fdb(self) -> set[str]:
        return {e["mac"] for e in bridge_json(self.ns, "fdb", "show", "dev", DEV) if e.get("dst")}

    def state(self) -> str:
        cache = self.daemon.lease_cache
        return (
            f"routes {sorted(self.routes())}, neighbours {sorted(self.neighbours())}, fdb {sorted(self.fdb())}, "
            f"valid {sorted(self.daemon.valid_peer_leases)}, cached {sorted(cache.leases) if cache else None}, "
            f"listings {cache.listings if cache else None}, status {self.daemon.status}"
        )

    def programmed(self, indexes: range | list[int]) -> bool:
        want = {f"10.77.{i}.0/24" for i in indexes}
        return self.routes() == want and len(self.neighbours()) == len(want) == len(self.fdb())


@pytest.fixture
def ns(netns_factory: Callable[..., str]) -> str:
    host, far = netns_factory("dc"), netns_factory("dcu")
    veth(host, "eth0", far, "eth0", "192.0.2.1/24", "192.0.2.2/24")
    return host


@pytest.fixture
def writer(tmp_path: Path) -> Iterator[Store]:
    store = open_store("embedded", path=str(tmp_path / "store.db"), history=8)
    store.put_config('{"Network": "10.77.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1}}')
    yield store
    store.close()


@pytest.fixture
def make_host(ns: str, tmp_path: Path) -> Iterator[Callable[..., Host]]:
    hosts: list[Host] = []

    def make(resync: float = LONG_AUDIT, store: Store | None = None) -> Host:
        host = Host(ns, tmp_path, resync, store)
        hosts.append(host)
        return host.start()

    yield make
    for host in hosts:
        if host.thread.is_alive():
            host.halt()


def test_drift_is_repaired_from_notifications_within_a_second(writer: Store, make_host: Callable[..., Host]) -> None:
    for i in range(1, 4):
        writer.create_lease(peer(i))
    host = make_host()
    wait_for(lambda: host.programmed(range(1, 4)), 5, "three peers programmed", host.state)
    dumps = host.daemon.kernel_cache.dumps  # type: ignore[union-attr]
    run(host.ns, "ip", "route", "del", "10.77.2.0/24")
    took = wait_for(lambda: "10.77.2.0/24" in host.routes(), 1.0, "the deleted route back")
    run(host.ns, "ip", "neigh", "del", "10.77.1.0", "dev", DEV)
    took = max(took, wait_for(lambda: "10.77.1.0" in host.neighbours(), 1.0, "the deleted neighbour back"))
    run(host.ns, "bridge", "fdb", "del", "02:00:00:00:01:03", "dev", DEV, "dst", "198.51.100.3")
    took = max(took, wait_for(lambda: host.programmed(range(1, 4)), 1.0, "the deleted FDB entry back", host.state))
    # changed behind our back (not deleted): a route through another gateway is replaced back
    run(host.ns, "ip", "route", "replace", "10.77.3.0/24", "via", "10.77.9.0", "dev", DEV, "onlink", "proto", "79")
    wait_for(
        lambda: any(r.get("gateway") == "10.77.3.0" for r in ip_json(host.ns, "route", "show", "10.77.3.0/24")),
        1.0,
        "the changed route restored",
    )
    assert host.daemon.kernel_cache.dumps == dumps, "repaired by a full read, not from notifications"  # type: ignore[union-attr]
    assert host.daemon.lease_cache.listings == 1  # type: ignore[union-attr]
    assert took < 1.0


def test_new_and_removed_peers_and_the_vxlan_device_recreated(writer: Store, make_host: Callable[..., Host]) -> None:
    writer.create_lease(peer(1))
    host = make_host()
    wait_for(lambda: host.programmed([1]), 5, "one peer", host.state)
    leases = [writer.create_lease(peer(i)) for i in range(2, 6)]
    wait_for(lambda: host.programmed(range(1, 6)), 5, "four new peers", host.state)
    for lease in leases[:2]:
        assert lease is not None
        writer.delete_lease(lease)
    wait_for(lambda: host.programmed([1, 4, 5]), 5, "two peers removed", host.state)
    assert set(host.daemon.valid_peer_leases) == {peer(i).key for i in (1, 4, 5)}
    run(host.ns, "ip", "link", "del", DEV)
    wait_for(lambda: host.programmed([1, 4, 5]), 5, "the device recreated and reprogrammed", host.state)
    link = ip_json(host.ns, "-d", "link", "show", DEV)[0]
    assert "UP" in link["flags"] and link["linkinfo"]["info_data"]["id"] == 1


def test_a_missed_notification_is_repaired_by_the_audit(writer: Store, make_host: Callable[..., Host]) -> None:
    for i in (1, 2):
        writer.create_lease(peer(i))
    host = make_host(resync=3.0)
    wait_for(lambda: host.programmed([1, 2]), 5, "two peers", host.state)
    cache = host.daemon.kernel_cache
    assert cache is not None
    # the daemon stops hearing about routes: a deletion now is a notification it never gets
    cache._sock.setsockopt(SOL_NETLINK, NETLINK_DROP_MEMBERSHIP, RTNLGRP_IPV4_ROUTE)  # type: ignore[union-attr]
    try:
        dumps = cache.dumps
        run(host.ns, "ip", "route", "del", "10.77.1.0/24")
        time.sleep(1.0)
        assert "10.77.1.0/24" not in host.routes(), "repaired without the notification: the test proves nothing"
        wait_for(lambda: "10.77.1.0/24" in host.routes(), 4.0, "the audit's repair")
        assert cache.dumps > dumps
    finally:
        cache._sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, RTNLGRP_IPV4_ROUTE)  # type: ignore[union-attr]


def test_a_notification_overrun_makes_a_full_resync(
    writer: Store, make_host: Callable[..., Host], tmp_path: Path
) -> None:
    for i in (1, 2):
        writer.create_lease(peer(i))
    host = make_host()
    wait_for(lambda: host.programmed([1, 2]), 5, "two peers", host.state)
    cache = host.daemon.kernel_cache
    assert cache is not None and cache._sock is not None
    sock = cache._sock
    rcvbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    dumps, overruns = cache.dumps, cache.overruns
    # a tiny buffer, then a burst of foreign routes and, last, the deletion of one of ours: its
    # notification cannot fit, so only ENOBUFS says something was lost
    sock.setsockopt(socket.SOL_SOCKET, 33, 4096)  # SO_RCVBUFFORCE
    try:
        batch = tmp_path / "burst.txt"
        lines = [f"route add 10.200.{i >> 8}.{i & 0xFF}/32 via 192.0.2.2 proto static" for i in range(400)]
        batch.write_text("\n".join([*lines, "route del 10.77.2.0/24", ""]))
        run(host.ns, "ip", "-batch", str(batch))
        wait_for(lambda: "10.77.2.0/24" in host.routes(), 2.0, "the route back after the overrun")
        assert cache.overruns > overruns and cache.dumps > dumps
    finally:
        sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)


def test_lost_store_history_relists_and_misses_nothing(
    writer: Store, make_host: Callable[..., Host], tmp_path: Path
) -> None:
    for i in (1, 2, 3):
        writer.create_lease(peer(i))
    store = open_store("embedded", path=str(tmp_path / "store.db"), history=8)
    hold = threading.Event()
    real_wait = store.wait_for_events

    def wait(since: int, timeout: float) -> WatchResult:
        if hold.is_set():  # the daemon hears nothing for a while (a slow or partitioned watch)
            time.sleep(timeout)
            return WatchResult((), since)
        return real_wait(since, timeout)

    store.wait_for_events = wait  # type: ignore[method-assign]
    try:
        host = make_host(store=store)
        wait_for(lambda: host.programmed([1, 2, 3]), 5, "three peers", host.state)
        listings = host.daemon.lease_cache.listings  # type: ignore[union-attr]
        hold.set()
        time.sleep(1.5)  # a real wait that began before the hold has returned by now
        gone = next(lease for lease in writer.list_leases().leases if lease.subnet == peer(2).subnet)
        writer.delete_lease(gone)
        for i in range(10, 20):
            writer.create_lease(peer(i))
        changed = next(lease for lease in writer.list_leases().leases if lease.subnet == peer(3).subnet)
        data = {"VNI": 1, "VtepMAC": "02:00:00:00:09:99"}
        writer.update_lease(changed, LeaseAttrs(changed.attrs.public_ip, backend_type="vxlan", backend_data=data))
        for _ in range(80):  # churn past the store's history of 8 changes
            lease = writer.create_lease(peer(30))
            assert lease is not None
            writer.delete_lease(lease)
        assert not host.programmed([1, 3, *range(10, 20)])
        hold.clear()
        wait_for(lambda: host.programmed([1, 3, *range(10, 20)]), 5, "everything after the re-list", host.state)
        assert host.daemon.lease_cache.listings > listings  # type: ignore[union-attr]
        fdb = {e["mac"]: e["dst"] for e in bridge_json(host.ns, "fdb", "show", "dev", DEV) if e.get("dst")}
        assert fdb.get("02:00:00:00:09:99") == "198.51.100.3"
        assert "02:00:00:00:01:03" not in fdb
    finally:
        store.close()


def test_a_store_outage_keeps_enforcing_and_repairing(writer: Store, make_host: Callable[..., Host]) -> None:
    for i in (1, 2):
        writer.create_lease(peer(i))
    store = open_store("embedded", path=str(writer.options.path))  # type: ignore[attr-defined]
    down = threading.Event()
    real_wait, real_list = store.wait_for_events, store.list_leases

    def unavailable(*args: Any) -> Any:
        from overlayd.errors import StoreUnavailable

        raise StoreUnavailable("the store is down (test)")

    store.wait_for_events = lambda *a: unavailable() if down.is_set() else real_wait(*a)  # type: ignore[method-assign]
    store.list_leases = lambda: unavailable() if down.is_set() else real_list()  # type: ignore[method-assign]
    try:
        host = make_host(store=store)
        wait_for(lambda: host.programmed([1, 2]), 5, "two peers", host.state)
        down.set()
        wait_for(lambda: not host.daemon.status.store_healthy, 3, "the outage noticed")
        run(host.ns, "ip", "route", "del", "10.77.1.0/24")
        wait_for(lambda: "10.77.1.0/24" in host.routes(), 1.5, "drift repaired during the outage")
        down.clear()
        writer.create_lease(peer(5))
        wait_for(lambda: host.programmed([1, 2, 5]), 35, "a new peer after the outage", host.state)
    finally:
        store.close()
