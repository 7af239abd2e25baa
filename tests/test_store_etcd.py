"""The store contract and fault tests against real etcd processes (Debian's /usr/bin/etcd).

One etcd serves the contract suite (a fresh key prefix per test); the fault tests start their
own members so that killing, pausing or compacting one never disturbs another test.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any

import attrs
import pytest
from overlayd import open_store
from overlayd.daemon import resolve_network_config
from overlayd.errors import ConfigError, HistoryGone, LeaseLost, StoreUnavailable, UserError
from overlayd.model import EventKind, Lease, LeaseEvent, LeaseList
from overlayd.stores.etcd import EtcdOptions
from overlayd.testing import StoreContract, StoreSpec
from overlayd.testing.etcd import EtcdCluster, EtcdServer, free_port, make_tls
from overlayd.testing.netns import netns_factory, netns_pids, run
from overlayd.testing.store_contract import DEEP_JSON, NETWORK, attrs_for

pytestmark = [
    pytest.mark.etcd,
    pytest.mark.skipif(not os.path.exists("/usr/bin/etcd"), reason="needs Debian's etcd-server"),
]

__all__ = ["netns_factory"]  # the fixture, re-exported for pytest

_prefixes = itertools.count(1)


@pytest.fixture(scope="session")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


def _raw_writer(server: EtcdServer, prefix: str) -> Any:
    def write(key: str, value: str) -> None:
        server.etcdctl("put", f"{prefix}/subnets/{key}", value)

    return write


@pytest.fixture
def prefix() -> str:
    return f"/overlayd-test/{os.getpid()}-{next(_prefixes)}/network"


class TestEtcdContract(StoreContract):
    @pytest.fixture
    def store_spec(self, etcd: EtcdServer, prefix: str) -> StoreSpec:
        return StoreSpec("etcd", etcd.store_options(prefix), write_raw=_raw_writer(etcd, prefix))


def _events_until(events: Iterator[LeaseEvent | LeaseList], count: int, timeout: float) -> list[LeaseEvent]:
    """The next *count* events from a watch_leases generator, pulled in a helper thread."""
    got: list[LeaseEvent] = []
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            while len(got) < count:
                item = next(events)
                assert isinstance(item, LeaseEvent), item
                got.append(item)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=pull, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not errors, errors
    assert len(got) == count, f"only {got} within {timeout}s"
    return got


# -- flannel compatibility -------------------------------------------------------------------


def test_etcdctl_shows_flannel_format(etcd: EtcdServer, prefix: str) -> None:
    store = open_store("etcd", **etcd.store_options(prefix))
    try:
        store.put_config(NETWORK.to_json())
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.7", mac="aa:bb:cc:dd:ee:07"))
        assert lease.subnet is not None
        key = f"{prefix}/subnets/{lease.subnet.network_address}-{lease.subnet.prefixlen}"
        value = etcd.etcdctl("get", key, "--print-value-only").strip()
        assert value == (
            '{"PublicIP":"192.0.2.7","PublicIPv6":null,"BackendType":"vxlan",'
            '"BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:07"}}'
        )
        listed = json.loads(etcd.etcdctl("get", key, "-w", "json"))
        lease_id = listed["kvs"][0]["lease"]
        ttl = json.loads(etcd.etcdctl("lease", "timetolive", format(lease_id, "x"), "-w", "json"))
        assert 24 * 3600 - 60 < ttl["ttl"] <= 24 * 3600
        assert json.loads(etcd.etcdctl("get", f"{prefix}/config", "--print-value-only"))["Network"] == "10.244.0.0/16"
    finally:
        store.close()


def test_reads_leases_written_by_flannel(etcd: EtcdServer, prefix: str) -> None:
    """A lease put the way flannel does (own etcd lease, JSON value) is listed with its expiry."""
    granted = etcd.etcdctl("lease", "grant", "600")
    lease_id = granted.split()[1]
    value = '{"PublicIP":"192.0.2.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"x"}}'
    etcd.etcdctl("put", f"{prefix}/subnets/10.244.9.0-24", value, f"--lease={lease_id}")
    etcd.etcdctl("put", f"{prefix}/subnets/10.244.10.0-24", '{"PublicIP":"192.0.2.10","BackendType":"vxlan"}')
    store = open_store("etcd", **etcd.store_options(prefix))
    try:
        leases = {lease.subnet: lease for lease in store.list_leases().leases}
        flannel = leases[IPv4Network("10.244.9.0/24")]
        assert flannel.attrs.public_ip == IPv4Address("192.0.2.9") and flannel.attrs.backend_data["VtepMAC"] == "x"
        assert flannel.expiration is not None
        remaining = (flannel.expiration - datetime.now(UTC)).total_seconds()
        assert 590 < remaining <= 601
        assert leases[IPv4Network("10.244.10.0/24")].is_reservation
    finally:
        store.close()


def test_bad_options_are_user_errors(etcd: EtcdServer) -> None:
    with pytest.raises(UserError, match="--etcd-cafile"):
        open_store("etcd", endpoints="https://127.0.0.1:1")
    with pytest.raises(UserError, match="--etcd-keyfile"):
        open_store("etcd", endpoints=etcd.endpoint, certfile="/nonexistent.pem")
    with pytest.raises(UserError, match="not a URL"):
        open_store("etcd", endpoints="ftp://x")


def test_unreachable_etcd_fails_promptly() -> None:
    store = open_store("etcd", endpoints=f"http://127.0.0.1:{free_port()}")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.wait_for_events(0, 1.0)
        with pytest.raises(StoreUnavailable):
            store.list_leases()
        assert time.monotonic() - started < 12
    finally:
        store.close()


def test_watch_wakes_within_50ms(etcd: EtcdServer, prefix: str) -> None:
    watcher = open_store("etcd", **etcd.store_options(prefix))
    writer = open_store("etcd", **etcd.store_options(prefix))
    try:
        since = watcher.list_leases().revision
        delays = []
        for i in range(15):
            done: list[float] = []

            def wait(since: int = since, done: list[float] = done) -> None:
                result = watcher.wait_for_events(since, 5.0)
                assert result.events
                done.append(time.monotonic())

            thread = threading.Thread(target=wait)
            thread.start()
            time.sleep(0.05)
            started = time.monotonic()
            lease = writer.acquire_lease(NETWORK, attrs_for(f"192.0.2.{i + 1}"))
            thread.join(10)
            delays.append(done[0] - started)
            since = lease.revision
        delays.sort()
        assert delays[len(delays) // 2] < 0.05, delays
    finally:
        watcher.close()
        writer.close()


def test_one_watch_stream_serves_many_waits_and_a_relist_restarts_it(etcd: EtcdServer, prefix: str) -> None:
    """Idle waits and event deliveries reuse one gRPC stream; a call from another revision (what a
    re-list does) opens a new one there, so nothing is skipped or delivered twice."""
    watcher = open_store("etcd", **etcd.store_options(prefix))
    writer = open_store("etcd", **etcd.store_options(prefix))
    try:
        since = watcher.list_leases().revision
        assert not watcher.wait_for_events(since, 0.05).events
        stream = watcher._stream  # type: ignore[attr-defined]
        assert stream is not None
        first = writer.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        got = []
        for _ in range(20):
            result = watcher.wait_for_events(since, 0.1)
            got.extend(result.events)
            since = result.revision
        assert [e.subnet for e in got] == [first.subnet] and since == first.revision
        assert watcher._stream is stream  # type: ignore[attr-defined]
        second = writer.acquire_lease(NETWORK, attrs_for("192.0.2.2"))
        replay = watcher.wait_for_events(first.revision, 2.0)
        assert [e.subnet for e in replay.events] == [second.subnet]
        assert watcher._stream is stream  # type: ignore[attr-defined]
        # a caller from an older revision (a re-list there): a new stream replays both, in order
        again = watcher.wait_for_events(first.revision - 1, 2.0)
        assert watcher._stream is not stream  # type: ignore[attr-defined]
        subnets = [e.subnet for e in again.events]
        while len(subnets) < 2:
            more = watcher.wait_for_events(again.revision, 2.0)
            subnets.extend(e.subnet for e in more.events)
            again = more
        assert subnets == [first.subnet, second.subnet]
    finally:
        watcher.close()
        writer.close()


def test_list_of_1000_leases_is_complete_and_timed(etcd: EtcdServer, prefix: str) -> None:
    writer = open_store("etcd", **etcd.store_options(prefix))
    reader = open_store("etcd", **etcd.store_options(prefix))
    try:
        threads = []
        for block in range(4):

            def create(block: int = block) -> None:
                for i in range(250):
                    n = block * 250 + i
                    subnet = IPv4Network(f"10.{100 + n // 256}.{n % 256}.0/24")
                    assert writer.create_lease(Lease(subnet, attrs_for(f"192.0.2.{n % 250 + 1}"), None))

            threads.append(threading.Thread(target=create))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        started = time.monotonic()
        first = reader.list_leases()
        cold = time.monotonic() - started
        started = time.monotonic()
        second = reader.list_leases()
        warm = time.monotonic() - started
        assert len(first.leases) == len(second.leases) == 1000
        assert all(lease.expiration is not None for lease in first.leases)
        print(f"listing 1000 leases: {cold:.2f} s cold, {warm:.2f} s warm (figures, not a timed assertion)")
    finally:
        writer.close()
        reader.close()


# -- faults ----------------------------------------------------------------------------------


def test_cluster_member_killed_leases_and_watch_continue(tmp_path: Path) -> None:
    with EtcdCluster(3) as cluster:
        options = {"endpoints": cluster.endpoints, "prefix": "/killed/network"}
        store = open_store("etcd", **options)
        # the writer talks to the last member, which survives
        writer = open_store("etcd", endpoints=cluster.members[2].endpoint, prefix="/killed/network")
        try:
            lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
            stop = threading.Event()
            events = store.watch_leases(stop, poll=0.5)
            snapshot = next(events)
            assert isinstance(snapshot, LeaseList) and len(snapshot.leases) == 1
            used = store._current  # type: ignore[attr-defined]
            assert used == 0
            pulled: list[LeaseEvent] = []
            puller = threading.Thread(target=lambda: pulled.extend(_events_until(events, 1, timeout=20)))
            puller.start()
            time.sleep(0.3)  # the watch stream to member 0 is open now
            cluster.members[used].kill()
            other = writer.acquire_lease(NETWORK, attrs_for("192.0.2.2"))
            puller.join(25)
            [added] = pulled
            assert added.kind is EventKind.ADDED and added.subnet == other.subnet
            assert store._current != used  # type: ignore[attr-defined]
            renewed = store.renew_lease(lease)
            assert renewed.revision > lease.revision and renewed.subnet == lease.subnet
            [renewal] = _events_until(events, 1, timeout=20)
            assert renewal.kind is EventKind.ADDED and renewal.subnet == lease.subnet
            writer.release_lease(other)
            [removed] = _events_until(events, 1, timeout=20)
            assert removed.kind is EventKind.REMOVED and removed.subnet == other.subnet
            stop.set()
        finally:
            store.close()
            writer.close()


def _eventually(fn: Callable[[], Any], timeout: float = 15.0) -> Any:
    """*fn*'s result, retrying on StoreUnavailable (as the daemon does) for up to *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize(("mode", "seconds"), [("paused", 20.0), ("stopped", 10.0)])
def test_etcd_outage_costs_no_cpu_and_everything_resumes(mode: str, seconds: float) -> None:
    """etcd SIGSTOPped for 20 s (hung) or stopped for 10 s (refusing connections): calls fail
    with StoreUnavailable, the client does not spin, and afterwards the watch delivers again and
    the lease is still ours."""
    with EtcdServer() as server:
        options = server.store_options(f"/{mode}/network")
        store = open_store("etcd", **options)
        writer = open_store("etcd", **options)
        stop = threading.Event()
        try:
            lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
            since = store.list_leases().revision
            outcomes: list[str] = []
            seen: list[LeaseEvent] = []

            def daemon_like() -> None:
                """What the daemon does: watch, and back off (capped) on StoreUnavailable."""
                nonlocal since
                backoff = 0.2
                while not stop.is_set():
                    try:
                        result = store.wait_for_events(since, 1.0)
                    except StoreUnavailable:
                        outcomes.append("unavailable")
                        stop.wait(backoff)
                        backoff = min(backoff * 2, 2.0)
                        continue
                    backoff = 0.2
                    seen.extend(result.events)
                    since = result.revision

            thread = threading.Thread(target=daemon_like, daemon=True)
            thread.start()
            time.sleep(0.5)
            if mode == "paused":
                server.pause()
            else:
                server.terminate()
            cpu_before = time.process_time()
            outage_started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                store.renew_lease(lease)
            assert time.monotonic() - outage_started < 12
            time.sleep(max(0.0, seconds - (time.monotonic() - outage_started)))
            cpu = time.process_time() - cpu_before
            if mode == "paused":
                server.resume()
            else:
                server.start()
            assert "unavailable" in outcomes
            assert cpu < 3.0, f"{cpu:.2f}s of CPU while etcd was {mode}"
            renewed = _eventually(lambda: store.renew_lease(lease))  # no lease lost
            assert renewed.subnet == lease.subnet
            other = _eventually(lambda: writer.acquire_lease(NETWORK, attrs_for("192.0.2.2")))
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not any(e.subnet == other.subnet for e in seen):
                time.sleep(0.05)
            assert any(e.subnet == other.subnet and e.kind is EventKind.ADDED for e in seen)
        finally:
            stop.set()
            store.close()
            writer.close()


def test_compaction_during_a_disconnect_relists_without_missing_changes() -> None:
    with EtcdServer() as server:
        options = server.store_options("/compacted/network")
        watcher = open_store("etcd", **options)
        writer = open_store("etcd", **options)
        try:
            keep = writer.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
            gone = writer.acquire_lease(NETWORK, attrs_for("192.0.2.2"))
            stop = threading.Event()
            events = watcher.watch_leases(stop, poll=0.5)
            snapshot = next(events)
            assert isinstance(snapshot, LeaseList) and len(snapshot.leases) == 2
            server.terminate()  # the watcher is cut off
            with pytest.raises(StoreUnavailable):
                watcher.wait_for_events(snapshot.revision, 0.5)
            server.start()
            writer.release_lease(gone)
            new = writer.acquire_lease(NETWORK, attrs_for("192.0.2.3"))
            changed = writer.update_lease(keep, attrs_for("192.0.2.1", mac="aa:bb:cc:dd:ee:99"))
            server.compact()
            with pytest.raises(HistoryGone):
                watcher.wait_for_events(snapshot.revision, 1.0)
            got = _events_until(events, 3, timeout=15)
            by_subnet = {(e.kind, e.subnet) for e in got}
            assert by_subnet == {
                (EventKind.REMOVED, gone.subnet),
                (EventKind.ADDED, new.subnet),
                (EventKind.ADDED, changed.subnet),
            }
            updated = next(e for e in got if e.subnet == keep.subnet)
            assert updated.lease is not None and updated.lease.attrs.backend_data["VtepMAC"] == "aa:bb:cc:dd:ee:99"
            stop.set()
        finally:
            watcher.close()
            writer.close()


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    other = make_tls(tmp_path / "other-pki")
    with EtcdServer(tls=tls) as server:
        assert server.endpoint.startswith("https://")
        store = open_store("etcd", **server.store_options("/tls/network"))
        try:
            lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
            assert [x.subnet for x in store.list_leases().leases] == [lease.subnet]
            assert store.wait_for_events(0, 0.5).events
        finally:
            store.close()
        wrong_ca = {**server.store_options("/tls/network"), "cafile": str(other.ca)}
        bad = open_store("etcd", **wrong_ca)
        with pytest.raises(UserError, match="TLS handshake"):
            bad.list_leases()
        bad.close()
        wrong_cert = {
            **server.store_options("/tls/network"),
            "certfile": str(other.client_cert),
            "keyfile": str(other.client_key),
        }
        bad = open_store("etcd", **wrong_cert)
        with pytest.raises(UserError, match="--etcd-certfile"):
            bad.list_leases()
        bad.close()
        no_cert = {**server.store_options("/tls/network"), "certfile": "", "keyfile": ""}
        bad = open_store("etcd", **no_cert)
        with pytest.raises(UserError, match="TLS handshake"):
            bad.list_leases()
        bad.close()


def test_username_and_password_auth() -> None:
    with EtcdServer(extra_args=["--auth-token-ttl=1"]) as server:
        server.enable_auth("s3cret")
        store = open_store("etcd", **server.store_options("/auth/network"))
        try:
            lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
            assert store.renew_lease(lease).subnet == lease.subnet
            assert store.wait_for_events(0, 0.5).events
            time.sleep(2.5)  # the auth token expires; the store authenticates again
            assert [x.subnet for x in store.list_leases().leases] == [lease.subnet]
        finally:
            store.close()
        bad = open_store("etcd", endpoints=server.endpoint, username="root", password="wrong")
        with pytest.raises(UserError, match="wrong --etcd-username or --etcd-password"):
            bad.get_config()
        bad.close()
        anonymous = open_store("etcd", endpoints=server.endpoint)
        with pytest.raises(UserError, match="--etcd-username"):
            anonymous.list_leases()
        anonymous.close()


def test_password_is_secret_and_not_in_repr(etcd: EtcdServer) -> None:
    assert attrs.fields(EtcdOptions).password.metadata["secret"] is True
    store = open_store("etcd", endpoints=etcd.endpoint, username="u", password="hunter2")
    assert "hunter2" not in repr(store) and "hunter2" not in repr(store.options)
    store.close()


def test_ipv6_leases_live_under_v6_subnets(etcd: EtcdServer, prefix: str) -> None:
    store = open_store("etcd", **etcd.store_options(prefix))
    try:
        since = store.list_leases().revision
        subnet = IPv6Network("fd00:10:244:3::/64")
        host = attrs.evolve(attrs_for("192.0.2.1"), public_ipv6=IPv6Address("2001:db8::1"))
        lease = store.create_lease(Lease(None, host, None, ipv6_subnet=subnet))
        assert lease is not None and lease.expiration is not None
        assert etcd.etcdctl("get", f"{prefix}/v6-subnets/fd00:10:244:3::-64", "--keys-only").strip()
        [listed] = store.list_leases().leases
        assert listed.ipv6_subnet == subnet and listed.subnet is None
        [added] = store.wait_for_events(since, 2.0).events
        assert added.kind is EventKind.ADDED and added.subnet == subnet
        assert store.update_lease(lease, lease.attrs).ipv6_subnet == subnet
        store.delete_lease(lease)
        assert store.list_leases().leases == ()
    finally:
        store.close()


def test_watch_skips_garbled_values(etcd: EtcdServer, prefix: str) -> None:
    store = open_store("etcd", **etcd.store_options(prefix))
    try:
        since = store.list_leases().revision
        etcd.etcdctl("put", f"{prefix}/subnets/10.244.200.0-24", "{not json")
        etcd.etcdctl("put", f"{prefix}/subnets/nonsense", "{}")
        etcd.etcdctl("put", f"{prefix}/config", "{}")
        lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        result = store.wait_for_events(since, 2.0)
        assert [(e.kind, e.subnet) for e in result.events] == [(EventKind.ADDED, lease.subnet)]
        assert result.revision == lease.revision
    finally:
        store.close()


def test_update_never_steals_and_reservations_stay(etcd: EtcdServer, prefix: str) -> None:
    store = open_store("etcd", **etcd.store_options(prefix))
    try:
        subnet = IPv4Network("10.244.5.0/24")
        reserved = store.reserve(subnet, IPv4Address("192.0.2.5"))
        assert reserved.is_reservation
        with pytest.raises(LeaseLost, match=r"192\.0\.2\.5"):
            store.update_lease(Lease(subnet, attrs_for("192.0.2.6"), None), attrs_for("192.0.2.6"))
        again = store.acquire_lease(NETWORK, attrs_for("192.0.2.5"))
        assert again.subnet == subnet and again.is_reservation
        data = json.loads(etcd.etcdctl("get", f"{prefix}/subnets/10.244.5.0-24", "-w", "json"))
        assert "lease" not in data["kvs"][0] or data["kvs"][0]["lease"] == 0
    finally:
        store.close()


@pytest.mark.root
def test_harness_runs_etcd_inside_a_network_namespace(netns_factory: Callable[..., str]) -> None:
    """What the end-to-end tests need: a member on a documentation address inside a namespace."""
    netns = netns_factory("etcd")
    run(netns, "ip", "addr", "add", "192.0.2.1/32", "dev", "lo")
    server = EtcdServer(listen_host="192.0.2.1", command_prefix=["ip", "netns", "exec", netns])
    try:
        server.start()
        assert server.endpoint.startswith("http://192.0.2.1:")
        server.etcdctl("put", "/ns-test", "hello")
        assert server.etcdctl("get", "/ns-test", "--print-value-only").strip() == "hello"
        assert server.pid in netns_pids(netns)
    finally:
        server.stop()
    assert not server.running and not server.base_dir.exists()


def test_deeply_nested_config_is_one_line_for_the_cli_and_start_up(etcd: EtcdServer, prefix: str) -> None:
    """~2 KB of 1100-level nested JSON at <prefix>/config used to be a RecursionError traceback."""
    etcd.etcdctl("put", f"{prefix}/config", DEEP_JSON)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    args = ["--store", "etcd", "--etcd-endpoints", etcd.endpoint, "--etcd-prefix", prefix, "network", "show"]
    result = subprocess.run(
        [sys.executable, "-c", "from overlayd.cli import main; main()", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1 and "nested more than" in result.stderr
    store = open_store("etcd", **etcd.store_options(prefix))
    with pytest.raises(ConfigError, match="nested more than"):
        resolve_network_config(store, None, None, None)  # the daemon's start-up path
    store.close()


def test_created_revision_is_etcds_create_revision(etcd: EtcdServer, prefix: str) -> None:
    store = open_store("etcd", **etcd.store_options(prefix))
    lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    renewed = store.renew_lease(lease)
    out = json.loads(etcd.etcdctl("get", "-w", "json", f"{prefix}/subnets/{lease.key}"))
    assert int(out["kvs"][0]["create_revision"]) == lease.created_revision == renewed.created_revision
    assert int(out["kvs"][0]["mod_revision"]) == renewed.revision > lease.revision
    store.close()
