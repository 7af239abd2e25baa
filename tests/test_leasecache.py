"""The lease cache against real stores: events applied, lost history re-listed, an outage survived.

Every check compares the cache with a fresh listing taken by an independent client: the cache is
right when it equals what ``list_leases`` says now, whatever happened in between.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator, Mapping
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any

import pytest
from overlayd import open_store
from overlayd.errors import StoreUnavailable
from overlayd.leasecache import LeaseCache, NetworkConfigMissing
from overlayd.plugin import Store
from overlayd.testing.etcd import EtcdServer
from overlayd.testing.store_contract import NETWORK, attrs_for

_prefixes = itertools.count(1)
needs_etcd = pytest.mark.skipif(not os.path.exists("/usr/bin/etcd"), reason="needs Debian's etcd-server")


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    if not os.path.exists("/usr/bin/etcd"):
        pytest.skip("needs Debian's etcd-server")
    with EtcdServer() as server:
        yield server


@pytest.fixture(params=["embedded", pytest.param("etcd", marks=[pytest.mark.etcd, needs_etcd])])
def options(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """Options for two independent clients of one fresh store (small history for the embedded one)."""
    if request.param == "embedded":
        return {"name": "embedded", "path": str(tmp_path / "store.db"), "history": 5}
    server: EtcdServer = request.getfixturevalue("etcd")
    return {"name": "etcd", **server.store_options(f"/leasecache-test/{os.getpid()}-{next(_prefixes)}/network")}


def _open(options: dict[str, Any]) -> Store:
    opts = dict(options)
    return open_store(opts.pop("name"), **opts)


@pytest.fixture
def stores(options: dict[str, Any]) -> Iterator[tuple[Store, Store]]:
    """(the cache's client, a writer acting as the other hosts)."""
    reader, writer = _open(options), _open(options)
    writer.put_config(NETWORK.to_json(), only_if_absent=True)
    yield reader, writer
    reader.close()
    writer.close()


def listed(store: Store) -> dict[str, tuple[int, Any]]:
    return view(store.list_leases().leases)


def view(leases: Any) -> dict[str, tuple[int, Any]]:
    """key -> (revision, attrs): what identifies a stored lease version (etcd recomputes expirations)."""
    if isinstance(leases, dict | Mapping):
        leases = leases.values()
    return {lease.key: (lease.revision, lease.attrs) for lease in leases}


def poll_until(cache: LeaseCache, check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the cache did not converge"
        try:
            cache.poll(0.2)
        except StoreUnavailable:
            time.sleep(0.2)


def test_first_poll_lists_then_events_keep_it_current(stores: tuple[Store, Store]) -> None:
    reader, writer = stores
    first = writer.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    cache = LeaseCache(reader)
    assert cache.poll(0.1) and cache.listings == 1
    assert view(cache.leases) == listed(writer)
    assert cache.take_changes() == {first.key}
    assert cache.take_changes() == frozenset()

    second = writer.acquire_lease(NETWORK, attrs_for("192.0.2.2"))
    changed = writer.update_lease(first, attrs_for("192.0.2.1", mac="aa:bb:cc:dd:ee:99"))
    poll_until(cache, lambda: view(cache.leases) == listed(writer))
    assert cache.leases[first.key].attrs.backend_data["VtepMAC"] == "aa:bb:cc:dd:ee:99"
    assert cache.take_changes() == {second.key, changed.key}

    writer.release_lease(second)
    poll_until(cache, lambda: second.key not in cache.leases)
    assert view(cache.leases) == listed(writer)
    assert cache.take_changes() == {second.key}
    assert cache.listings == 1, "events alone kept the cache current"
    assert view(cache.snapshot().leases) == listed(writer)


def test_nothing_happening_is_no_change(stores: tuple[Store, Store]) -> None:
    reader, writer = stores
    writer.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    cache = LeaseCache(reader)
    cache.poll(0.1)
    cache.take_changes()
    assert cache.poll(0.3) is False
    assert cache.take_changes() == frozenset()


def _lose_history(options: dict[str, Any], writer: Store, server: EtcdServer | None) -> None:
    """Make the history the cache needs disappear: etcd compaction, or overflowing the embedded log."""
    if options["name"] == "etcd":
        assert server is not None
        server.compact()
    else:
        keeper = writer.acquire_lease(NETWORK, attrs_for("192.0.2.200"))
        for _ in range(70):  # the log is trimmed to history=5 every 64 revisions
            keeper = writer.renew_lease(keeper)


def test_lost_history_relists_and_reports_only_what_changed(
    options: dict[str, Any], stores: tuple[Store, Store], request: pytest.FixtureRequest
) -> None:
    reader, writer = stores
    keep = writer.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    gone = writer.acquire_lease(NETWORK, attrs_for("192.0.2.2"))
    untouched = writer.acquire_lease(NETWORK, attrs_for("192.0.2.3"))
    cache = LeaseCache(reader)
    cache.poll(0.1)
    cache.take_changes()

    writer.release_lease(gone)
    new = writer.acquire_lease(NETWORK, attrs_for("192.0.2.4"))
    changed = writer.update_lease(keep, attrs_for("192.0.2.1", mac="aa:bb:cc:dd:ee:99"))
    server = request.getfixturevalue("etcd") if options["name"] == "etcd" else None
    _lose_history(options, writer, server)

    assert cache.poll(1.0)
    assert cache.listings == 2, "lost history was answered by a listing"
    assert view(cache.leases) == listed(writer)
    taken = cache.take_changes()
    assert {gone.key, new.key, changed.key} <= taken
    assert untouched.key not in taken
    # and the watch resumes from the listing's revision
    later = writer.acquire_lease(NETWORK, attrs_for("192.0.2.5"))
    poll_until(cache, lambda: later.key in cache.leases)
    assert cache.listings == 2


@pytest.mark.etcd
@needs_etcd
def test_store_down_and_back_converges() -> None:
    with EtcdServer() as server:
        options = {"name": "etcd", **server.store_options("/leasecache-outage/network")}
        reader, writer = _open(options), _open(options)
        try:
            writer.put_config(NETWORK.to_json(), only_if_absent=True)
            gone = writer.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
            cache = LeaseCache(reader)
            cache.poll(0.1)
            cache.take_changes()

            server.terminate()
            with pytest.raises(StoreUnavailable):
                cache.poll(0.5)
            assert not cache.synced
            assert gone.key in cache.leases, "an outage keeps the last snapshot"
            server.start()
            writer = _reopen(writer, options)
            writer.release_lease(gone)
            new = writer.acquire_lease(NETWORK, attrs_for("192.0.2.2"))

            poll_until(cache, lambda: cache.synced, timeout=30)
            assert cache.listings == 2, "the reconnect re-listed"
            assert view(cache.leases) == listed(writer)
            assert cache.take_changes() == {gone.key, new.key}
        finally:
            reader.close()
            writer.close()


def _reopen(store: Store, options: dict[str, Any]) -> Store:
    """A writer that retries until etcd answers again (the test's other host)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            store.list_leases()
            return store
        except StoreUnavailable:
            assert time.monotonic() < deadline
            time.sleep(0.2)


def test_periodic_audit_repairs_a_missed_event(tmp_path: Path) -> None:
    now = [0.0]
    store = open_store("embedded", path=str(tmp_path / "store.db"))
    try:
        store.put_config(NETWORK.to_json(), only_if_absent=True)
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        cache = LeaseCache(store, audit_period=60.0, clock=lambda: now[0])
        cache.poll(0.1)
        cache.take_changes()
        cache._leases.pop(lease.key)  # a missed event: the cache is wrong and the watch is silent
        assert cache.poll(0.1) is False
        assert lease.key not in cache.leases
        now[0] = 61.0
        assert cache.poll(0.1) is True
        assert cache.listings == 2
        assert view(cache.leases) == listed(store)
        assert cache.take_changes() == {lease.key}
    finally:
        store.close()


@pytest.mark.etcd
def test_a_wiped_store_is_an_outage_and_its_missing_leases_are_held_then_dropped() -> None:
    """The trust rules of the module note, on an etcd whose data is wiped: no config -> the cache
    keeps its view; back with a config at a lower revision -> what it lacks is held until a lease
    of the same host replaces it or the hold runs out."""
    if not os.path.exists("/usr/bin/etcd"):
        pytest.skip("needs Debian's etcd-server")
    now = [0.0]
    with EtcdServer() as server:
        reader, writer = open_store("etcd", **server.store_options()), open_store("etcd", **server.store_options())
        try:
            writer.put_config(NETWORK.to_json())
            a = writer.acquire_lease(NETWORK, attrs_for("198.51.100.1"))
            b = writer.acquire_lease(NETWORK, attrs_for("198.51.100.2", "aa:bb:cc:dd:ee:02"))
            c = writer.acquire_lease(NETWORK, attrs_for("198.51.100.3", "aa:bb:cc:dd:ee:03"))
            for _ in range(20):  # a revision the fresh member will not reach by itself
                writer.put_config(NETWORK.to_json())
            cache = LeaseCache(reader, require_config=True, hold_after_reset=30.0, clock=lambda: now[0])
            cache.poll(0.0)
            assert set(cache.leases) == {a.key, b.key, c.key}
            cache.take_changes()

            server.wipe()
            deadline = time.monotonic() + 10
            missing = None
            while missing is None:  # connection errors first, then the empty store answers
                assert time.monotonic() < deadline, "the wiped store never answered"
                try:
                    cache.poll(0.2)
                except NetworkConfigMissing as exc:
                    missing = exc
                except StoreUnavailable:
                    time.sleep(0.2)
            assert set(cache.leases) == {a.key, b.key, c.key} and not cache.take_changes()

            writer.put_config(NETWORK.to_json())
            again = writer.acquire_lease(NETWORK, a.attrs, prefer=[a.subnet])  # host 1, same subnet
            moved = writer.acquire_lease(NETWORK, c.attrs, prefer=[IPv4Network("10.244.200.0/24")])  # host 3
            assert again.key == a.key and moved.key != c.key
            cache.poll(0.0)
            assert cache.held == {b.key}
            assert set(cache.leases) == {a.key, b.key, moved.key}  # c went: its host holds another subnet
            assert cache.take_changes() == {a.key, c.key, moved.key}

            now[0] += 31.0
            assert cache.poll(0.0)
            assert set(cache.leases) == {a.key, moved.key} and cache.held == frozenset()
            assert cache.take_changes() == {b.key}
        finally:
            reader.close()
            writer.close()
