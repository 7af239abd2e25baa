"""Dual-stack and IPv6-only leases through the whole daemon, on a real etcd and the embedded store.

The ``alloc`` backend programs nothing, so these run without kernel state: what is checked is the
lease layer — one key per family carrying the same attrs JSON (read back raw from the store), the
subnet file's IPv6 lines, a restart keeping both subnets, a v6 key deleted by hand coming back
with the same subnet, flannel's own v6 lease values, and the user errors about IPv6 addresses.
The kernel side (vxlan/host-gw over IPv6) has its own functional and end-to-end tests.
"""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from ipaddress import IPv4Network, IPv6Address, IPv6Network, ip_interface
from pathlib import Path
from typing import Any

import attrs
import pytest
from overlayd import open_store
from overlayd.config import NetworkConfig
from overlayd.daemon import Daemon, DaemonSettings
from overlayd.errors import UserError
from overlayd.hostiface import select_host
from overlayd.model import LeaseAttrs
from overlayd.plugin import Store
from overlayd.subnetfile import read_env
from overlayd.testing.etcd import EtcdServer
from overlayd.testing.netns import call_in_netns, netns_factory, run, veth

__all__ = ["netns_factory"]

DUAL = {
    "Network": "10.31.0.0/16",
    "EnableIPv6": True,
    "IPv6Network": "fd00:31::/48",
    "Backend": {"Type": "alloc"},
}
V6_ONLY = {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:32::/48", "Backend": {"Type": "alloc"}}

_prefixes = itertools.count(1)


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


class Where:
    """One empty store namespace: its plugin options, and a raw reader of one lease key."""

    def __init__(self, name: str, options: dict[str, Any], raw: Callable[[str, str], str | None]) -> None:
        self.name, self.options, self.raw = name, options, raw

    def open(self) -> Store:
        return open_store(self.name, **self.options)


@pytest.fixture(params=["etcd", "embedded"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    if request.param == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd")
        prefix = f"/overlayd-test/{os.getpid()}-v6-{next(_prefixes)}/network"

        def raw_etcd(directory: str, key: str) -> str | None:
            out = server.etcdctl("get", f"{prefix}/{directory}/{key}", "--print-value-only").strip()
            return out or None

        return Where("etcd", server.store_options(prefix), raw_etcd)
    db = tmp_path / "store.db"

    def raw_embedded(directory: str, key: str) -> str | None:
        store = open_store("embedded", path=str(db))
        try:
            entry = store.get_entry(key)
        finally:
            store.close()
        assert entry is None or entry.ipv6 == (directory == "v6-subnets")
        return None if entry is None else str(entry.value if isinstance(entry.value, str) else entry.value.decode())

    return Where("embedded", {"path": str(db)}, raw_embedded)


class Host:
    def __init__(self, where: Where, tmp: Path, name: str, ip: str | None, ip6: str | None) -> None:
        self.subnet_file = tmp / f"{name}-subnet.env"
        self.settings = DaemonSettings(
            store=where.name,
            store_options=where.options,
            backend="alloc",
            ifaces=("lo",),
            public_ip=ip,
            public_ipv6=ip6,
            subnet_file=str(self.subnet_file),
            resync_period=0.5,
        )
        self.stop = threading.Event()
        self.daemon = Daemon(self.settings)
        self.thread = threading.Thread(target=self.daemon.run, args=(self.stop,), daemon=True)

    def start(self) -> Host:
        self.thread.start()
        # a restarted host finds its old subnet file: wait for this daemon's own write
        wait_for(lambda: self.daemon.status.subnet_file_written or not self.thread.is_alive(), what="subnet file")
        assert self.daemon.lease is not None, "the daemon stopped before writing its subnet file"
        lease = self.daemon.lease
        assert (self.subnet(4), self.subnet(6)) == tuple(
            str(s) if s else None for s in (lease.subnet, lease.ipv6_subnet)
        )
        return self

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()

    @property
    def env(self) -> dict[str, str]:
        return read_env(str(self.subnet_file))

    def subnet(self, version: int) -> str | None:
        raw = self.env.get("FLANNEL_SUBNET" if version == 4 else "FLANNEL_IPV6_SUBNET")
        return None if raw is None else str(ip_interface(raw).network)


def wait_for(check: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def cluster(where: Where, tmp_path: Path) -> Iterator[Callable[..., Host]]:
    hosts: list[Host] = []

    def make(name: str, ip: str | None, ip6: str | None, config: dict[str, Any] | None = None) -> Host:
        if config is not None:
            store = where.open()
            try:
                store.put_config(NetworkConfig.from_dict(config).to_json(), only_if_absent=True)
            finally:
                store.close()
        host = Host(where, tmp_path, name, ip, ip6)
        hosts.append(host)
        return host.start()

    yield make
    for host in hosts:
        if host.thread.is_alive():
            host.halt()


def key(subnet: str) -> str:
    net = IPv4Network(subnet) if ":" not in subnet else IPv6Network(subnet)
    return f"{net.network_address}-{net.prefixlen}"


def test_three_dual_stack_hosts_hold_one_key_per_family_with_the_same_json(
    cluster: Callable[..., Host], where: Where
) -> None:
    hosts = [cluster(f"h{i}", f"192.0.2.{i}", f"2001:db8::{i}", DUAL) for i in (1, 2, 3)]
    v4 = [h.subnet(4) for h in hosts]
    v6 = [h.subnet(6) for h in hosts]
    assert len(set(v4)) == 3 and len(set(v6)) == 3 and None not in v4 and None not in v6
    config = NetworkConfig.from_dict(DUAL)
    for i, host in enumerate(hosts, start=1):
        env = host.env
        assert env["FLANNEL_NETWORK"] == "10.31.0.0/16" and env["FLANNEL_IPV6_NETWORK"] == "fd00:31::/48"
        assert env["FLANNEL_IPV6_SUBNET"].endswith("::1/64") and "FLANNEL_MTU" in env
        four, six = host.subnet(4), host.subnet(6)
        assert four is not None and six is not None
        assert config.contains_of(6, IPv6Network(six))
        raw4, raw6 = where.raw("subnets", key(four)), where.raw("v6-subnets", key(six))
        assert raw4 is not None and raw4 == raw6  # the same attrs JSON under both keys
        doc = json.loads(raw6)
        assert doc["PublicIP"] == f"192.0.2.{i}" and doc["PublicIPv6"] == f"2001:db8::{i}"
        assert doc["BackendType"] == "alloc"
    store = where.open()
    try:
        families = sorted(lease.families for lease in store.list_leases().leases)
    finally:
        store.close()
    assert families == [(4,)] * 3 + [(6,)] * 3


def test_ipv6_only_hosts_need_no_ipv4_at_all(cluster: Callable[..., Host], where: Where) -> None:
    a = cluster("a", None, "2001:db8::a", V6_ONLY)
    b = cluster("b", None, "2001:db8::b")
    assert "FLANNEL_NETWORK" not in a.env and "FLANNEL_SUBNET" not in a.env
    assert a.env["FLANNEL_IPV6_NETWORK"] == "fd00:32::/48"
    six_a, six_b = a.subnet(6), b.subnet(6)
    assert six_a is not None and six_b is not None and six_a != six_b
    raw = where.raw("v6-subnets", key(six_a))
    assert raw is not None
    doc = json.loads(raw)
    assert doc["PublicIP"] is None and doc["PublicIPv6"] == "2001:db8::a"
    store = where.open()
    try:
        assert all(lease.families == (6,) for lease in store.list_leases().leases)
    finally:
        store.close()


def test_restart_keeps_both_subnets_even_after_the_store_lost_them(
    cluster: Callable[..., Host], where: Where, tmp_path: Path
) -> None:
    a = cluster("a", "192.0.2.1", "2001:db8::1", DUAL)
    before = (a.subnet(4), a.subnet(6))
    a.halt()
    again = Host(where, tmp_path, "a", "192.0.2.1", "2001:db8::1").start()  # the lease still in the store
    try:
        assert (again.subnet(4), again.subnet(6)) == before
    finally:
        again.halt()
    store = where.open()  # now the store forgets them: the subnet file alone brings both back
    try:
        for lease in store.list_leases().leases:
            store.delete_lease(lease)
        # another host moves in meanwhile, and must not be given them
        intruder = LeaseAttrs.from_json('{"PublicIP":"192.0.2.9","PublicIPv6":"2001:db8::9","BackendType":"alloc"}')
        other = store.acquire_lease(NetworkConfig.from_dict(DUAL), intruder)
    finally:
        store.close()
    assert (str(other.subnet), str(other.ipv6_subnet)) != before
    third = Host(where, tmp_path, "a", "192.0.2.1", "2001:db8::1").start()
    try:
        assert (third.subnet(4), third.subnet(6)) == before
    finally:
        third.halt()


def test_a_v6_key_deleted_by_hand_comes_back_with_the_same_subnet(cluster: Callable[..., Host], where: Where) -> None:
    a = cluster("a", "192.0.2.1", "2001:db8::1", DUAL)
    four, six = a.subnet(4), a.subnet(6)
    assert four is not None and six is not None
    store = where.open()
    try:
        [mine] = [x for x in store.list_leases().leases if x.families == (6,)]
        revision4 = next(x.revision for x in store.list_leases().leases if x.families == (4,))
        store.delete_lease(mine)

        def recreated() -> bool:  # a new key (created after the deletion), not the old one seen late
            v6 = [x for x in store.list_leases().leases if x.families == (6,)]
            return bool(v6) and v6[0].created_revision > mine.created_revision

        wait_for(recreated, what="the v6 key to be re-created")
        assert (a.subnet(4), a.subnet(6)) == (four, six)
        raw4, raw6 = where.raw("subnets", key(four)), where.raw("v6-subnets", key(six))
        assert raw4 == raw6
        assert next(x.revision for x in store.list_leases().leases if x.families == (4,)) >= revision4
    finally:
        store.close()


def test_a_flannel_nodes_v6_lease_is_read_and_its_subnet_left_alone(cluster: Callable[..., Host], where: Where) -> None:
    # What flannel v0.26 writes for a dual-stack vxlan node, under v6-subnets/fd00:31:0:5::-64.
    flannel = (
        '{"PublicIP":"192.0.2.50","PublicIPv6":"2001:db8::50","BackendType":"vxlan",'
        '"BackendData":{"VNI":1,"VtepMAC":"6e:ec:17:45:4f:6b"},'
        '"BackendV6Data":{"VNI":1,"VtepMAC":"12:0c:9a:51:de:e0"}}'
    )
    store = where.open()
    try:
        store.put_config(NetworkConfig.from_dict(DUAL).to_json())
        assert store.create_entry("fd00:31:0:5::-64", flannel, timedelta(hours=1)) is not None
        [lease] = store.list_leases().leases
    finally:
        store.close()
    assert lease.families == (6,) and lease.ipv6_subnet == IPv6Network("fd00:31:0:5::/64")
    assert lease.attrs.public_ipv6 == IPv6Address("2001:db8::50")
    assert lease.attrs.backend_data_of(6) == {"VNI": 1, "VtepMAC": "12:0c:9a:51:de:e0"}
    assert json.loads(lease.attrs.to_json()) == json.loads(flannel)  # written back byte-compatible
    a = cluster("a", "192.0.2.1", "2001:db8::1")
    assert a.subnet(6) != "fd00:31:0:5::/64"


def test_ipv6_on_without_an_ipv6_address_is_one_line_before_any_lease(where: Where, tmp_path: Path) -> None:
    store = where.open()
    try:
        store.put_config(NetworkConfig.from_dict(DUAL).to_json())
    finally:
        store.close()
    host = Host(where, tmp_path, "a", "192.0.2.1", None)  # lo has only ::1, which is not usable
    with pytest.raises(
        UserError, match=r"carries IPv6 but interface lo has no global IPv6 address; pass --public-ipv6"
    ):
        host.daemon.run(threading.Event())
    store = where.open()
    try:
        assert store.list_leases().leases == ()
    finally:
        store.close()
    assert not host.subnet_file.exists()


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("ff02::1", "multicast"),
        ("192.0.2.1", "is not an IPv6 address"),
        ("nonsense", "is not an IPv6 address"),
    ],
)
def test_public_ipv6_is_validated_like_public_ip(given: str, why: str) -> None:
    with pytest.raises(UserError, match=rf"^--public-ipv6 .*{why}"):
        select_host(("lo",), public_ipv6=given)


def test_public_ipv6_is_advertised_and_the_interface_needs_no_ipv4(tmp_path: Path) -> None:
    host = select_host(("lo",), public_ipv6="2001:db8::7")
    assert host.public_ipv6 == IPv6Address("2001:db8::7") and host.iface == "lo"


def test_dry_run_merges_the_hosts_keys_and_finds_an_ipv6_only_host(where: Where) -> None:
    import overlayd

    store = where.open()
    try:
        store.put_config(NetworkConfig.from_dict(DUAL).to_json())
        config = NetworkConfig.from_dict(DUAL)
        mine = store.acquire_lease(config, LeaseAttrs.from_json('{"PublicIP":"192.0.2.1","PublicIPv6":"2001:db8::1"}'))
        theirs = store.acquire_lease(
            config, LeaseAttrs.from_json('{"PublicIP":"192.0.2.2","PublicIPv6":"2001:db8::2"}')
        )
        for asked in ("192.0.2.1", "2001:db8::1"):
            result = overlayd.dry_run(store, asked)
            assert (result.own.subnet, result.own.ipv6_subnet) == (mine.subnet, mine.ipv6_subnet)
            assert {p.key for p in result.peers} <= set(theirs.keys)  # never one of our own keys
        with pytest.raises(UserError, match="no lease in the store has PublicIPv6 2001:db8::9"):
            overlayd.dry_run(store, "2001:db8::9")
    finally:
        store.close()


@pytest.mark.root
def test_an_ipv6_only_host_with_no_ipv4_address_publishes_its_interfaces_address(
    netns_factory: Callable[..., str], tmp_path: Path
) -> None:
    """A namespace whose only underlay address is IPv6: the daemon picks it (no --public-ipv6)."""
    ns, far = netns_factory("v6h"), netns_factory("v6f")
    veth(ns, "eth0", far, "e0")
    run(ns, "ip", "-6", "addr", "add", "2001:db8:7::1/64", "dev", "eth0", "nodad")
    db = tmp_path / "store.db"
    store = open_store("embedded", path=str(db))
    try:
        store.put_config(NetworkConfig.from_dict(V6_ONLY).to_json())
    finally:
        store.close()
    where = Where("embedded", {"path": str(db)}, lambda directory, key: None)
    host = Host(where, tmp_path, "a", None, None)
    host.settings = attrs.evolve(host.settings, ifaces=("eth0",))
    host.daemon = Daemon(host.settings)
    host.thread = threading.Thread(target=call_in_netns, args=(ns, host.daemon.run, host.stop), daemon=True)
    host.start()
    try:
        assert "FLANNEL_SUBNET" not in host.env and host.subnet(6) is not None
        assert host.daemon.lease is not None and host.daemon.lease.attrs.public_ip is None
        assert host.daemon.lease.attrs.public_ipv6 == IPv6Address("2001:db8:7::1")
    finally:
        host.halt()
