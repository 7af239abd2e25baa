"""The kernel-state cache in a real network namespace (root): every check compares the cache with an
independent full read-back through pyroute2 (``overlayd.netlink.read_*``), after changes made by
hand with ``ip``/``bridge`` — the way drift happens in production."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest
from overlayd import netlink
from overlayd.kernelcache import KernelCache
from overlayd.netlink import FdbEntry, MacAddress, Neighbour, Route
from overlayd.testing.netns import call_in_netns, in_netns, netns_factory, run, veth

pytestmark = pytest.mark.root

__all__ = ["netns_factory"]  # fixtures, re-exported for pytest

DEV = "flannel.1"


def full_read() -> frozenset[object]:
    """What the un-cached daemon read every pass (run inside the namespace)."""
    with netlink.iproute() as ipr:
        return netlink.read_routes(ipr) | netlink.read_neighbours(ipr, DEV) | netlink.read_fdb(ipr, DEV)


def peer(i: int) -> tuple[str, str, str, str]:
    """(subnet, gateway, VTEP MAC, public IP) of fake peer *i*."""
    return f"10.90.{i}.0/24", f"10.90.{i}.0", f"02:00:00:00:{i >> 8:02x}:{i & 0xFF:02x}", f"198.51.100.{i % 250 + 1}"


def program(ns: str, i: int) -> None:
    net, gw, mac, public = peer(i)
    run(ns, "ip", "neigh", "replace", gw, "lladdr", mac, "dev", DEV, "nud", "permanent")
    run(ns, "bridge", "fdb", "replace", mac, "dev", DEV, "dst", public, "self", "permanent")
    run(ns, "ip", "route", "replace", net, "via", gw, "dev", DEV, "onlink", "proto", "79")


@pytest.fixture
def host(netns_factory: Callable[..., str]) -> str:
    """A namespace with an underlay, a VXLAN device, two programmed peers and unrelated state."""
    netns, other = netns_factory("kc"), netns_factory("kcpeer")
    veth(netns, "eth0", other, "eth0", "192.0.2.1/24", "192.0.2.2/24")
    run(netns, "ip", "link", "add", DEV, "type", "vxlan", "id", "1", "local", "192.0.2.1", "dev", "eth0")
    run(netns, "ip", "link", "set", DEV, "up")
    for i in (1, 2):
        program(netns, i)
    # not ours: another protocol, another table, a non-permanent neighbour
    run(netns, "ip", "route", "add", "10.91.0.0/24", "via", "192.0.2.9", "proto", "static")
    run(netns, "ip", "route", "add", "10.92.0.0/24", "via", "192.0.2.9", "proto", "79", "table", "100")
    run(netns, "ip", "neigh", "add", "192.0.2.7", "lladdr", "02:00:00:00:99:99", "dev", "eth0", "nud", "reachable")
    return netns


@pytest.fixture
def cache(host: str) -> Iterator[KernelCache]:
    made = KernelCache(DEV)
    with in_netns(host):
        made.open()
    yield made
    made.close()


def settle(cache: KernelCache, check: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        cache.drain()
        if check():
            return
        assert time.monotonic() < deadline, "the cache did not see the change"
        time.sleep(0.01)


def test_open_reads_exactly_what_a_full_dump_reads(host: str, cache: KernelCache) -> None:
    truth = call_in_netns(host, full_read)
    assert cache.objects() == truth
    assert len(truth) == 6  # 2 peers x (route, neighbour, FDB entry): nothing foreign
    assert cache.strict, "this kernel (>= 4.20) filters dumps itself"
    assert cache.dumps == 1


def test_strict_and_unfiltered_dumps_agree(host: str) -> None:
    loose, tight = KernelCache(DEV, strict=False), KernelCache(DEV)
    with in_netns(host):
        loose.open()
        tight.open()
    try:
        assert not loose.strict
        assert loose.objects() == tight.objects() == call_in_netns(host, full_read)
    finally:
        loose.close()
        tight.close()


def test_a_route_added_and_deleted_by_hand_is_seen(host: str, cache: KernelCache) -> None:
    cache.take_changes()
    run(host, "ip", "route", "add", "10.90.50.0/24", "via", "192.0.2.5", "dev", "eth0", "proto", "79")
    route = Route(dst=IPv4Network("10.90.50.0/24"), dev="eth0", gateway=IPv4Address("192.0.2.5"))
    settle(cache, lambda: route in cache.objects())
    assert cache.take_changes() == {route.key}
    assert cache.objects() == call_in_netns(host, full_read)

    run(host, "ip", "route", "del", "10.90.50.0/24", "proto", "79")
    settle(cache, lambda: route not in cache.objects())
    assert cache.take_changes() == {route.key}
    assert cache.objects() == call_in_netns(host, full_read)
    assert cache.dumps == 1, "seen from notifications, without a dump"


def test_deleted_neighbour_fdb_and_replaced_route_are_seen(host: str, cache: KernelCache) -> None:
    net, gw, mac, public = peer(1)
    neigh = Neighbour(dst=IPv4Address(gw), lladdr=mac, dev=DEV)
    fdb = FdbEntry(lladdr=mac, dst=IPv4Address(public), dev=DEV)
    assert {neigh, fdb} <= cache.objects()
    cache.take_changes()
    run(host, "ip", "neigh", "del", gw, "dev", DEV)
    run(host, "bridge", "fdb", "del", mac, "dev", DEV, "dst", public, "self")
    settle(cache, lambda: not {neigh, fdb} & cache.objects())
    assert cache.take_changes() == {neigh.key, fdb.key}

    # someone else's route replaces ours in its slot: the slot is no longer ours
    run(host, "ip", "route", "replace", net, "via", "192.0.2.9", "proto", "static")
    settle(cache, lambda: all(o.key != ("route", 254, IPv4Network(net), 0) for o in cache.objects()))
    # a changed route (new gateway) of ours replaces the slot's content
    run(host, "ip", "route", "replace", peer(2)[0], "via", "192.0.2.8", "dev", "eth0", "proto", "79")
    settle(
        cache,
        lambda: Route(dst=IPv4Network(peer(2)[0]), dev="eth0", gateway=IPv4Address("192.0.2.8")) in cache.objects(),
    )
    assert cache.objects() == call_in_netns(host, full_read)
    assert cache.dumps == 1


def test_device_removed_or_down_is_seen(host: str, cache: KernelCache) -> None:
    run(host, "ip", "link", "set", DEV, "down")
    cache.drain()
    assert cache.needs_resync, "IPv4 flushes routes through a down device without telling"
    assert cache.maybe_resync()
    assert cache.objects() == call_in_netns(host, full_read)
    run(host, "ip", "link", "set", DEV, "up")
    for i in (1, 2):
        program(host, i)
    settle(cache, lambda: len(cache.objects()) == 6)
    cache.take_changes()

    run(host, "ip", "link", "del", DEV)
    settle(cache, lambda: not cache.objects())
    assert len(cache.take_changes()) == 6
    assert call_in_netns(host, full_read) == frozenset()
    # recreated under the same name: entries on the new device are seen
    run(host, "ip", "link", "add", DEV, "type", "vxlan", "id", "1", "local", "192.0.2.1", "dev", "eth0")
    run(host, "ip", "link", "set", DEV, "up")
    program(host, 3)
    settle(cache, lambda: len(cache.objects()) == 3)
    assert cache.objects() == call_in_netns(host, full_read)


def test_a_device_that_went_down_under_our_objects_is_reported_back_up(host: str, cache: KernelCache) -> None:
    """The daemon retries writes that failed through a down device as soon as it is up again
    (host-gw with its underlay flapping), instead of at its next backoff retry."""
    run(host, "ip", "link", "set", "eth0", "up")  # carries none of our objects: not counted
    run(host, "sysctl", "-q", "-w", f"net/ipv6/conf/{DEV}/disable_ipv6=1")  # no IPv6 link-local route on up
    run(host, "ip", "link", "set", DEV, "down")
    cache.drain()
    assert cache.maybe_resync() and cache.devices_back == 0
    assert not [obj for obj in cache.objects() if isinstance(obj, Route)], "the kernel flushed the routes"
    run(host, "ip", "link", "set", DEV, "up")
    settle(cache, lambda: cache.devices_back == 1)  # the link back up
    run(host, "ip", "route", "add", "10.95.0.0/24", "dev", DEV)  # the first IPv4 route through it
    run(host, "ip", "route", "add", "10.96.0.0/24", "dev", DEV)  # not counted: one per family
    settle(cache, lambda: cache.devices_back == 2)
    run(host, "ip", "link", "set", "eth0", "down")
    run(host, "ip", "link", "set", "eth0", "up")  # never carried anything of ours
    cache.drain()
    assert cache.devices_back == 2


def test_last_address_removed_flushes_silently_and_is_seen(host: str, cache: KernelCache) -> None:
    """A device losing its last IPv4 address loses its routes with no RTM_DELROUTE (fib_disable_ip);
    the address notification makes the cache re-read."""
    run(host, "ip", "route", "add", "10.93.0.0/24", "dev", DEV, "proto", "79")  # needs no address
    settle(cache, lambda: any(getattr(o, "dst", None) == IPv4Network("10.93.0.0/24") for o in cache.objects()))
    run(host, "ip", "addr", "add", "10.90.99.0/32", "dev", DEV)
    run(host, "ip", "route", "add", "10.94.0.0/24", "dev", DEV, "proto", "79", "src", "10.90.99.0")
    settle(cache, lambda: len(cache.objects()) == 8)
    assert not cache.needs_resync
    run(host, "ip", "addr", "del", "10.90.99.0/32", "dev", DEV)
    cache.drain()
    truth = call_in_netns(host, full_read)
    assert cache.objects() != truth, "the kernel told us everything: this test proves nothing"
    assert cache.needs_resync
    assert cache.maybe_resync()
    assert cache.objects() == call_in_netns(host, full_read)


def test_overrun_marks_resync_and_resync_matches_a_full_dump(host: str) -> None:
    cache = KernelCache(DEV, rcvbuf=1)  # the kernel's minimum buffer: a few notifications
    with in_netns(host):
        cache.open()
    try:
        lines = []
        for i in range(10, 210):
            net, gw, _mac, _public = peer(i)
            lines.append(f"route add {net} via {gw} dev {DEV} onlink proto 79")
        run(host, "sh", "-c", "ip -batch - <<'EOF'\n" + "\n".join(lines) + "\nEOF")
        cache.drain()
        assert cache.needs_resync and cache.overruns >= 1
        assert cache.objects() != call_in_netns(host, full_read), "notifications were really lost"
        cache.take_changes()
        assert cache.maybe_resync()
        assert not cache.needs_resync
        assert cache.objects() == call_in_netns(host, full_read)
        assert len(cache.take_changes()) >= 190
    finally:
        cache.close()


def test_missed_notification_is_repaired_by_the_audit(host: str) -> None:
    now = [0.0]
    cache = KernelCache(DEV, audit_period=300.0, clock=lambda: now[0])
    with in_netns(host):
        cache.open()
    try:
        _net, gw, mac, _public = peer(2)
        lost = Neighbour(dst=IPv4Address(gw), lladdr=MacAddress.parse(mac), dev=DEV)
        cache._slots.pop(lost.key)  # a notification the cache never got
        cache.take_changes()
        assert not cache.drain() and not cache.maybe_resync()
        assert lost not in cache.objects()
        now[0] = 301.0
        assert cache.maybe_resync()
        assert cache.objects() == call_in_netns(host, full_read)
        assert cache.take_changes() == {lost.key}
    finally:
        cache.close()


def test_objects_in_reads_only_the_asked_slots(host: str, cache: KernelCache) -> None:
    net, gw, _mac, _public = peer(1)
    route = Route(dst=IPv4Network(net), dev=DEV, gateway=IPv4Address(gw), onlink=True)
    assert cache.objects_in([route.key, ("neigh", DEV, IPv4Address("10.99.0.0"))]) == {route}


def test_without_a_device_only_routes_are_cached(host: str) -> None:
    cache = KernelCache(None)
    with in_netns(host):
        cache.open()
    try:
        assert cache.objects() == {o for o in call_in_netns(host, full_read) if isinstance(o, Route)}
        assert len(cache.objects()) == 2
        run(host, "ip", "neigh", "del", peer(1)[1], "dev", DEV)
        assert not cache.drain()
    finally:
        cache.close()
