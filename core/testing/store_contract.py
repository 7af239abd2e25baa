"""The store contract: behaviour every store must have, as a pytest suite.

Usage::

    class TestMyStore(StoreContract):
        @pytest.fixture
        def store_spec(self, tmp_path):
            return StoreSpec("mystore", {"url": ...}, write_raw=...)

``store_spec`` must describe an *empty* store namespace for each test.  ``write_raw(key, value)``
writes a raw value under the lease prefix (``key`` like ``10.244.3.0-24``) bypassing the plugin,
the way a buggy third party would, and so that a watcher sees the write; the suite uses it to
check that garbage is skipped (and reported once) on the list and the watch paths.

The suite holds every store to the policy the ``Store`` base class writes once: another host's
lease is never overwritten or deleted, a missing lease raises ``LeaseLost``, ``unreserve``
never deletes a live lease, store data is decoded bounded in depth and size.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import attrs
import pytest

from ..api import open_store
from ..config import NetworkConfig
from ..errors import ConfigError, LeaseLost, NotAReservation, SubnetExhausted, UserError
from ..model import EventKind, Lease, LeaseAttrs, LeaseEvent, LeaseList
from ..plugin import Store

#: ~2 KB of JSON nested 1100 levels deep: ``json.loads`` of it raises RecursionError.
DEEP_JSON = "[" * 1100 + "]" * 1100

NETWORK = NetworkConfig.from_dict({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}})
SMALL = NetworkConfig.from_dict({"Network": "10.250.0.0/24", "SubnetLen": 28})
DUAL = NetworkConfig.from_dict(
    {"Network": "10.244.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10:244::/48", "Backend": {"Type": "vxlan"}}
)
V6_ONLY = NetworkConfig.from_dict(
    {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:20::/48", "Backend": {"Type": "vxlan"}}
)
#: 15 leasable /124s: small enough to exhaust, in a family where enumerating a real range is not an option.
SMALL_V6 = NetworkConfig.from_dict(
    {"EnableIPv4": False, "EnableIPv6": True, "IPv6Network": "fd00:30::/120", "IPv6SubnetLen": 124}
)


@attrs.frozen
class StoreSpec:
    name: str
    options: dict[str, Any]
    write_raw: Callable[[str, str], None] | None = None
    supports_ttl: bool = True
    #: The shortest TTL the store takes (Consul: 10 s), for the expiry test.
    short_ttl: float = 2.0
    #: How long past the TTL the store may keep an expired entry (Consul: up to 2x the TTL).
    expiry_slack: float = 8.0


def attrs_for(ip: str, mac: str = "aa:bb:cc:dd:ee:01") -> LeaseAttrs:
    return LeaseAttrs(public_ip=IPv4Address(ip), backend_type="vxlan", backend_data={"VNI": 1, "VtepMAC": mac})


def dual_attrs_for(ip: str | None, ip6: str, mac: str = "aa:bb:cc:dd:ee:01") -> LeaseAttrs:
    """A dual-stack (or, with *ip* None, IPv6-only) host's attrs, as flannel writes them."""
    return LeaseAttrs(
        public_ip=IPv4Address(ip) if ip else None,
        public_ipv6=IPv6Address(ip6),
        backend_type="vxlan",
        backend_data={"VNI": 1, "VtepMAC": mac} if ip else {},
        backend_v6_data={"VNI": 1, "VtepMAC": mac.replace("aa:", "ae:", 1)},
    )


def _race_worker(name: str, options: dict[str, Any], first_ip: int, count: int, out: Any) -> None:
    store = open_store(name, **options)
    got: list[str] = []
    errors: list[str] = []
    for i in range(count):
        try:
            lease = store.acquire_lease(SMALL, attrs_for(f"198.51.100.{first_ip + i}"))
            got.append(str(lease.subnet))
        except SubnetExhausted as exc:
            errors.append(str(exc))
    store.close()
    out.put((got, errors))


def _next_event(events: Iterator[LeaseEvent | LeaseList], timeout: float) -> LeaseEvent:
    result: list[LeaseEvent | LeaseList] = []
    thread = threading.Thread(target=lambda: result.append(next(events)), daemon=True)
    thread.start()
    thread.join(timeout)
    assert result, f"no event within {timeout}s"
    item = result[0]
    assert isinstance(item, LeaseEvent), item
    return item


class StoreContract:
    """Subclass and provide the ``store_spec`` fixture."""

    @pytest.fixture
    def store_spec(self) -> StoreSpec:  # pragma: no cover - provided by subclasses
        raise NotImplementedError

    @pytest.fixture
    def store(self, store_spec: StoreSpec) -> Iterator[Store]:
        store = open_store(store_spec.name, **store_spec.options)
        yield store
        store.close()

    @pytest.fixture
    def other_store(self, store_spec: StoreSpec) -> Iterator[Store]:
        """A second, independent client of the same store (another host)."""
        store = open_store(store_spec.name, **store_spec.options)
        yield store
        store.close()

    # -- config --------------------------------------------------------------------------------

    def test_config_absent_then_roundtrip(self, store: Store) -> None:
        assert store.get_config() is None
        assert store.put_config(NETWORK.to_json())
        assert NetworkConfig.from_json(store.get_config() or "") == NETWORK

    def test_put_config_only_if_absent_keeps_existing(self, store: Store) -> None:
        store.put_config(NETWORK.to_json())
        assert not store.put_config(SMALL.to_json(), only_if_absent=True)
        assert NetworkConfig.from_json(store.get_config() or "") == NETWORK

    # -- leases --------------------------------------------------------------------------------

    def test_acquire_lists_lease_with_flannel_attrs(self, store: Store, other_store: Store) -> None:
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        assert lease.subnet is not None and NETWORK.contains_subnet(lease.subnet)
        assert lease.expiration is not None and lease.expiration > datetime.now(UTC)
        listed = other_store.list_leases()
        assert [(x.subnet, x.attrs) for x in listed.leases] == [(lease.subnet, lease.attrs)]
        assert listed.revision >= lease.revision > 0

    def test_same_host_reuses_its_subnet(self, store: Store, other_store: Store) -> None:
        first = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        again = other_store.acquire_lease(NETWORK, attrs_for("192.0.2.1", mac="aa:bb:cc:dd:ee:02"))
        assert again.subnet == first.subnet
        assert again.attrs.backend_data["VtepMAC"] == "aa:bb:cc:dd:ee:02"
        assert len(store.list_leases().leases) == 1

    def test_hosts_get_distinct_subnets(self, store: Store) -> None:
        subnets = {store.acquire_lease(NETWORK, attrs_for(f"192.0.2.{i}")).subnet for i in range(1, 21)}
        assert len(subnets) == 20

    def test_preferred_subnet_is_used_when_free(self, store: Store) -> None:
        wanted = IPv4Network("10.244.77.0/24")
        assert store.acquire_lease(NETWORK, attrs_for("192.0.2.1"), prefer=[wanted]).subnet == wanted
        other = store.acquire_lease(NETWORK, attrs_for("192.0.2.2"), prefer=[wanted])
        assert other.subnet != wanted

    def test_create_is_compare_and_create(self, store: Store, other_store: Store) -> None:
        subnet = IPv4Network("10.244.9.0/24")
        assert store.create_lease(Lease(subnet, attrs_for("192.0.2.1"), None)) is not None
        assert other_store.create_lease(Lease(subnet, attrs_for("192.0.2.2"), None)) is None
        [only] = store.list_leases().leases
        assert only.attrs.public_ip == IPv4Address("192.0.2.1")

    def test_renew_extends_and_release_removes(self, store: Store) -> None:
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        time.sleep(0.01)
        renewed = store.renew_lease(lease)
        assert renewed.expiration is not None and lease.expiration is not None
        assert renewed.expiration > lease.expiration
        assert renewed.revision > lease.revision
        store.release_lease(renewed)
        assert store.list_leases().leases == ()
        with pytest.raises(LeaseLost):
            store.renew_lease(renewed)

    def test_exhaustion_is_reported(self, store: Store) -> None:
        for i in range(SMALL.subnet_count()):
            store.acquire_lease(SMALL, attrs_for(f"192.0.2.{i + 1}"))
        with pytest.raises(SubnetExhausted, match=r"10\.250\.0\.0/24 is exhausted: all 15 /28"):
            store.acquire_lease(SMALL, attrs_for("192.0.2.200"))

    def test_two_processes_racing_never_share_a_subnet(self, store_spec: StoreSpec) -> None:
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        workers = [
            ctx.Process(target=_race_worker, args=(store_spec.name, store_spec.options, base, 10, out))
            for base in (10, 100)
        ]
        for worker in workers:
            worker.start()
        results = [out.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(30)
            assert worker.exitcode == 0
        subnets = [s for got, _ in results for s in got]
        errors = [e for _, errs in results for e in errs]
        assert len(subnets) == len(set(subnets)) == SMALL.subnet_count() == 15
        assert len(errors) == 5 and all("exhausted" in e for e in errors)

    # -- reservations --------------------------------------------------------------------------

    def test_reservation_is_kept_for_its_owner_only(self, store: Store) -> None:
        subnet = IPv4Network("10.250.0.32/28")
        store.reserve(subnet, IPv4Address("192.0.2.50"))
        others = {store.acquire_lease(SMALL, attrs_for(f"192.0.2.{i}")).subnet for i in range(1, 15)}
        assert subnet not in others
        with pytest.raises(SubnetExhausted):
            store.acquire_lease(SMALL, attrs_for("192.0.2.99"))
        owner = store.acquire_lease(SMALL, attrs_for("192.0.2.50"))
        assert owner.subnet == subnet and owner.is_reservation
        assert store.renew_lease(owner).is_reservation
        store.release_lease(owner)  # releasing a reservation keeps it
        assert any(x.subnet == subnet and x.is_reservation for x in store.list_leases().leases)
        store.unreserve(subnet)
        assert all(x.subnet != subnet for x in store.list_leases().leases)

    def test_reserve_refuses_a_subnet_leased_by_another_host(self, store: Store) -> None:
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        assert lease.subnet is not None
        with pytest.raises(UserError, match=r"leased by 192\.0\.2\.1"):
            store.reserve(lease.subnet, IPv4Address("192.0.2.2"))

    # -- expiry and garbage --------------------------------------------------------------------

    def test_lease_expires_after_ttl(self, store_spec: StoreSpec) -> None:
        if not store_spec.supports_ttl:
            pytest.skip("this store has no TTLs")  # pragma: no cover
        store = open_store(store_spec.name, **{**store_spec.options, "ttl": store_spec.short_ttl})
        try:
            store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
            start = store.list_leases().revision
            stop = threading.Event()
            events = store.watch_leases(stop, since_revision=start)
            event = _next_event(events, timeout=store_spec.short_ttl + store_spec.expiry_slack)
            assert event.kind is EventKind.EXPIRED
            assert store.list_leases().leases == ()
            stop.set()
        finally:
            store.close()

    def test_garbled_leases_are_skipped(self, store: Store, store_spec: StoreSpec) -> None:
        assert store_spec.write_raw is not None, "provide write_raw to test garbage handling"
        good = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        store_spec.write_raw("10.244.200.0-24", "{not json")
        store_spec.write_raw("10.244.201.0-24", '{"PublicIP": "not-an-ip", "BackendType": "vxlan"}')
        store_spec.write_raw("not-a-subnet", '{"PublicIP": "192.0.2.9"}')
        assert [x.subnet for x in store.list_leases().leases] == [good.subnet]

    def test_deeply_nested_values_are_skipped_on_list_and_watch(
        self, store: Store, other_store: Store, store_spec: StoreSpec
    ) -> None:
        assert store_spec.write_raw is not None, "provide write_raw to test garbage handling"
        stop = threading.Event()
        events = store.watch_leases(stop, poll=0.2)
        assert isinstance(next(events), LeaseList)
        store_spec.write_raw("10.244.202.0-24", DEEP_JSON)
        store_spec.write_raw("10.244.203.0-24", '{"PublicIP": "192.0.2.7", "BackendData": ' + DEEP_JSON + "}")
        store_spec.write_raw("10.244.204.0-24", '{"PublicIP": "192.0.2.8", "X": "' + "a" * 80_000 + '"}')
        good = other_store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        event = _next_event(events, timeout=5)  # the watch path skipped the garbage and lives on
        assert event.kind is EventKind.ADDED and event.lease is not None and event.lease.subnet == good.subnet
        stop.set()
        assert [x.subnet for x in other_store.list_leases().leases] == [good.subnet]
        assert store.garbled_skipped >= 3

    def test_deeply_nested_config_is_a_config_error(self, store: Store) -> None:
        store.put_config(DEEP_JSON)
        with pytest.raises(ConfigError, match="nested more than"):
            NetworkConfig.from_json(store.get_config() or "")

    def test_garbled_entries_are_warned_once_then_counted(
        self, store: Store, store_spec: StoreSpec, caplog: pytest.LogCaptureFixture
    ) -> None:
        assert store_spec.write_raw is not None, "provide write_raw to test garbage handling"
        for i in range(5):
            store_spec.write_raw(f"junk-{i}", "{not json")
        caplog.set_level(logging.WARNING)
        for _ in range(4):
            assert store.list_leases().leases == ()
        warnings = [r for r in caplog.records if "garbled" in r.getMessage()]
        assert len(warnings) == 5, [r.getMessage() for r in warnings]
        assert store.garbled_skipped == 20
        store_spec.write_raw("junk-0", "{still not json")  # a new revision of the key is news
        store.list_leases()
        assert len([r for r in caplog.records if "garbled" in r.getMessage()]) == 6

    # -- the lease policy every store shares ----------------------------------------------------

    def test_delete_never_removes_another_hosts_lease(self, store: Store, other_store: Store) -> None:
        mine = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        assert mine.subnet is not None
        other_store.delete_lease(Lease(mine.subnet, attrs_for("192.0.2.2"), None))
        assert [x.subnet for x in store.list_leases().leases] == [mine.subnet]
        store.delete_lease(Lease(IPv4Network("10.244.250.0/24"), attrs_for("192.0.2.1"), None))  # missing: no-op

    def test_update_never_overwrites_another_hosts_lease(self, store: Store, other_store: Store) -> None:
        mine = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        assert mine.subnet is not None
        with pytest.raises(LeaseLost, match=r"belongs to 192\.0\.2\.1"):
            other_store.update_lease(Lease(mine.subnet, attrs_for("192.0.2.2"), None), attrs_for("192.0.2.2"))
        [only] = store.list_leases().leases
        assert only.attrs == mine.attrs and only.revision == mine.revision

    def test_a_missing_lease_raises_lease_lost(self, store: Store) -> None:
        ghost = Lease(IPv4Network("10.244.251.0/24"), attrs_for("192.0.2.1"), None)
        with pytest.raises(LeaseLost):
            store.update_lease(ghost, ghost.attrs)
        with pytest.raises(LeaseLost):
            store.renew_lease(ghost)

    def test_a_garbled_value_under_our_key_raises_lease_lost(self, store: Store, store_spec: StoreSpec) -> None:
        assert store_spec.write_raw is not None, "provide write_raw to test garbage handling"
        store_spec.write_raw("10.244.252.0-24", "{not json")
        ours = Lease(IPv4Network("10.244.252.0/24"), attrs_for("192.0.2.1"), None)
        with pytest.raises(LeaseLost, match="unreadable"):
            store.renew_lease(ours)

    def test_unreserve_refuses_a_live_lease(self, store: Store) -> None:
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        assert lease.subnet is not None
        with pytest.raises(NotAReservation, match=r"live lease of 192\.0\.2\.1, not a reservation"):
            store.unreserve(lease.subnet)
        assert [x.subnet for x in store.list_leases().leases] == [lease.subnet]
        store.unreserve(IPv4Network("10.244.253.0/24"))  # a missing reservation is a no-op

    def test_created_revision_is_kept_across_renewals(self, store: Store, other_store: Store) -> None:
        first = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        second = other_store.acquire_lease(NETWORK, attrs_for("192.0.2.2"))
        assert 0 < first.created_revision == first.revision < second.created_revision
        renewed = store.renew_lease(first)
        assert renewed.created_revision == first.created_revision < renewed.revision
        listed = {x.subnet: x for x in other_store.list_leases().leases}
        assert listed[first.subnet].created_revision == first.created_revision
        assert listed[second.subnet].created_revision == second.created_revision
        reserved = store.reserve(IPv4Network("10.244.254.0/24"), IPv4Address("192.0.2.9"))
        assert reserved.created_revision == reserved.revision > 0

    # -- dual-stack and IPv6-only ------------------------------------------------------------

    def test_dual_stack_lease_is_one_key_per_family_with_the_same_attrs(self, store: Store, other_store: Store) -> None:
        host = dual_attrs_for("192.0.2.1", "2001:db8::1")
        lease = store.acquire_lease(DUAL, host)
        assert lease.families == (4, 6) and lease.attrs == host
        assert lease.subnet is not None and DUAL.contains_of(4, lease.subnet)
        assert lease.ipv6_subnet is not None and DUAL.contains_of(6, lease.ipv6_subnet)
        listed = sorted(other_store.list_leases().leases, key=lambda x: x.families)
        assert [(x.families, x.subnet_of(x.families[0]), x.attrs) for x in listed] == [
            ((4,), lease.subnet, host),
            ((6,), lease.ipv6_subnet, host),
        ]
        again = other_store.acquire_lease(DUAL, host)
        assert (again.subnet, again.ipv6_subnet) == (lease.subnet, lease.ipv6_subnet)
        other = store.acquire_lease(DUAL, dual_attrs_for("192.0.2.2", "2001:db8::2", mac="aa:bb:cc:dd:ee:02"))
        assert other.subnet != lease.subnet and other.ipv6_subnet != lease.ipv6_subnet

    def test_dual_stack_renew_and_release_act_on_both_keys(self, store: Store, store_spec: StoreSpec) -> None:
        lease = store.acquire_lease(DUAL, dual_attrs_for("192.0.2.1", "2001:db8::1"))
        before = {x.key: x.revision for x in store.list_leases().leases}
        renewed = store.renew_lease(lease)
        assert (renewed.subnet, renewed.ipv6_subnet) == (lease.subnet, lease.ipv6_subnet)
        after = {x.key: x.revision for x in store.list_leases().leases}
        assert set(after) == set(lease.keys) and all(after[k] > before[k] for k in after)
        if store_spec.supports_ttl:
            assert renewed.expiration is not None and lease.expiration is not None
            assert renewed.expiration >= lease.expiration
        store.release_lease(renewed)
        assert store.list_leases().leases == ()
        with pytest.raises(LeaseLost):
            store.renew_lease(renewed)

    def test_a_lost_ipv6_key_raises_lease_lost(self, store: Store, other_store: Store) -> None:
        lease = store.acquire_lease(DUAL, dual_attrs_for("192.0.2.1", "2001:db8::1"))
        other_store.delete_lease(lease.only(6))
        assert [x.key for x in store.list_leases().leases] == [lease.only(4).key]
        with pytest.raises(LeaseLost, match="no longer exists"):
            store.renew_lease(lease)
        again = store.acquire_lease(DUAL, lease.attrs, prefer=[s for s in (lease.subnet, lease.ipv6_subnet) if s])
        assert (again.subnet, again.ipv6_subnet) == (lease.subnet, lease.ipv6_subnet)

    def test_ipv6_key_owner_is_the_public_ipv6(self, store: Store, other_store: Store) -> None:
        mine = store.acquire_lease(V6_ONLY, dual_attrs_for(None, "2001:db8::1"))
        theirs = dual_attrs_for(None, "2001:db8::2")
        with pytest.raises(LeaseLost, match=r"belongs to 2001:db8::1"):
            other_store.update_lease(attrs.evolve(mine, attrs=theirs), theirs)
        other_store.delete_lease(attrs.evolve(mine, attrs=theirs))
        assert [x.ipv6_subnet for x in store.list_leases().leases] == [mine.ipv6_subnet]

    def test_ipv6_only_lease(self, store: Store, other_store: Store) -> None:
        attrs_ = dual_attrs_for(None, "2001:db8::1")
        lease = store.acquire_lease(V6_ONLY, attrs_)
        assert lease.families == (6,) and lease.subnet is None and lease.attrs.public_ip is None
        assert lease.ipv6_subnet is not None and V6_ONLY.contains_of(6, lease.ipv6_subnet)
        [listed] = other_store.list_leases().leases
        assert (listed.families, listed.ipv6_subnet, listed.attrs) == ((6,), lease.ipv6_subnet, attrs_)
        wanted = IPv6Network("fd00:20:0:77::/64")
        other = store.acquire_lease(V6_ONLY, dual_attrs_for(None, "2001:db8::2"), prefer=[wanted])
        assert other.ipv6_subnet == wanted
        store.renew_lease(lease)
        store.release_lease(lease)
        assert [x.ipv6_subnet for x in store.list_leases().leases] == [wanted]

    def test_ipv6_exhaustion_is_reported(self, store: Store) -> None:
        got = {
            store.acquire_lease(SMALL_V6, dual_attrs_for(None, f"2001:db8::{i + 1:x}")).ipv6_subnet for i in range(15)
        }
        assert len(got) == 15
        with pytest.raises(SubnetExhausted, match=r"IPv6 network fd00:30::/120 is exhausted: all 15 /124"):
            store.acquire_lease(SMALL_V6, dual_attrs_for(None, "2001:db8::ff"))

    def test_release_never_removes_another_hosts_lease(self, store: Store, other_store: Store) -> None:
        mine = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        assert mine.subnet is not None
        # another host's stale view of the subnet, live lease and reservation alike
        other_store.release_lease(attrs.evolve(mine, attrs=attrs_for("192.0.2.2")))
        other_store.release_lease(Lease(mine.subnet, attrs_for("192.0.2.2"), None))
        [only] = store.list_leases().leases
        assert only.attrs == mine.attrs and only.revision == mine.revision

    def test_a_reservation_survives_every_path_but_unreserve(self, store: Store, other_store: Store) -> None:
        subnet = IPv4Network("10.250.0.48/28")
        owner = IPv4Address("192.0.2.50")
        reserved = store.reserve(subnet, owner)
        as_lease = Lease(subnet, attrs_for(str(owner)), None)  # a stale, non-reservation view of it
        other = attrs_for("192.0.2.51")
        other_store.release_lease(Lease(subnet, other, None))
        other_store.delete_lease(Lease(subnet, other, None))
        with pytest.raises(LeaseLost):
            other_store.update_lease(Lease(subnet, other, None), other)
        with pytest.raises(UserError, match=r"leased by 192\.0\.2\.50"):
            other_store.reserve(subnet, IPv4Address("192.0.2.51"))
        assert other_store.create_lease(Lease(subnet, other, None)) is None
        assert other_store.acquire_lease(SMALL, other, prefer=[subnet]).subnet != subnet
        store.release_lease(reserved)  # the owner's own release keeps a reservation
        store.release_lease(as_lease)  # ... even through a view that predates the reservation
        store.delete_lease(as_lease)
        renewed = store.acquire_lease(SMALL, attrs_for(str(owner), mac="aa:bb:cc:dd:ee:02"))
        assert renewed.subnet == subnet and renewed.is_reservation
        assert store.renew_lease(renewed).is_reservation
        [kept] = [x for x in other_store.list_leases().leases if x.subnet == subnet]
        assert kept.is_reservation and kept.attrs.public_ip == owner

    def test_a_lease_turned_into_a_reservation_survives_its_hosts_release(
        self, store: Store, other_store: Store
    ) -> None:
        """``overlayd reserve SUBNET IP`` on a running host's lease, then that host stops with
        ``--release-on-exit`` holding the lease as it was before: the reservation stays."""
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        assert lease.subnet is not None and not lease.is_reservation
        other_store.reserve(lease.subnet, IPv4Address("192.0.2.1"))
        store.release_lease(lease)
        [kept] = other_store.list_leases().leases
        assert kept.subnet == lease.subnet and kept.is_reservation

    def test_racing_hosts_never_take_a_lease_or_a_reservation(self, store: Store, store_spec: StoreSpec) -> None:
        reserved = store.reserve(IPv4Network("10.250.0.16/28"), IPv4Address("192.0.2.50"))
        held = store.acquire_lease(SMALL, attrs_for("192.0.2.1"))
        got: list[IPv4Network | None] = []
        failures: list[Exception] = []

        def host(i: int) -> None:
            client = open_store(store_spec.name, **store_spec.options)
            try:
                wanted = [x for x in (reserved.subnet, held.subnet) if x is not None]
                got.append(client.acquire_lease(SMALL, attrs_for(f"198.51.100.{i}"), prefer=wanted).subnet)
            except SubnetExhausted:
                pass
            except Exception as exc:  # reported below
                failures.append(exc)
            finally:
                client.close()

        threads = [threading.Thread(target=host, args=(i,)) for i in range(1, 17)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not failures, failures
        assert reserved.subnet not in got and held.subnet not in got and len(got) == len(set(got)) == 13
        listed = {x.subnet: x for x in store.list_leases().leases}
        assert listed[reserved.subnet].is_reservation and listed[reserved.subnet].attrs == reserved.attrs
        assert listed[held.subnet].attrs == held.attrs

    # -- watching ------------------------------------------------------------------------------

    def test_watch_sees_add_and_remove_quickly(self, store: Store, other_store: Store) -> None:
        stop = threading.Event()
        events = store.watch_leases(stop, poll=0.2)
        snapshot = next(events)
        assert isinstance(snapshot, LeaseList) and snapshot.leases == ()
        started = time.monotonic()
        lease = other_store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        added = _next_event(events, timeout=5)
        latency = time.monotonic() - started
        assert added.kind is EventKind.ADDED and added.lease is not None
        assert added.lease.subnet == lease.subnet
        assert latency < 1.0, f"watch took {latency:.3f}s"
        other_store.release_lease(lease)
        removed = _next_event(events, timeout=5)
        assert removed.kind is EventKind.REMOVED and removed.subnet == lease.subnet
        stop.set()

    def test_watch_resumes_from_a_revision(self, store: Store, other_store: Store) -> None:
        first = other_store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        second = other_store.acquire_lease(NETWORK, attrs_for("192.0.2.2"))
        stop = threading.Event()
        events = store.watch_leases(stop, since_revision=first.revision)
        event = _next_event(events, timeout=5)
        assert event.kind is EventKind.ADDED and event.lease is not None
        assert event.lease.subnet == second.subnet
        stop.set()
