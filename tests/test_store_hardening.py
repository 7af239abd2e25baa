"""Store hardening (issue 10): lease timing, endpoints, garbled-entry reporting, a corrupted
embedded file, and ``unreserve`` of a live lease — each a regression test, each class with a
property test on a fixed, small budget."""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import timedelta
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from overlayd import open_store
from overlayd.daemon import MIN_RENEW_INTERVAL, Daemon, DaemonSettings
from overlayd.errors import StoreCorrupted, StoreUnavailable, UserError
from overlayd.plugin import MAX_TTL, MIN_TTL, LeaseTimingOptions
from overlayd.stores.embedded import FILE_CHECK_INTERVAL, EmbeddedStore
from overlayd.stores.etcd import EtcdOptions
from overlayd.testing.store_contract import NETWORK, attrs_for

OVERLAYD = [sys.executable, "-c", "from overlayd.cli import main; main()"]
BUDGET = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def run(*args: str, path: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    if path is not None:
        env["OVERLAYD_EMBEDDED_PATH"] = str(path)
    return subprocess.run([*OVERLAYD, *args], capture_output=True, text=True, env=env, timeout=timeout)


def one_line(result: subprocess.CompletedProcess[str], code: int, fragment: str) -> str:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert fragment in lines[0], lines[0]
    return lines[0]


# -- lease timing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--store", "etcd", "--etcd-ttl", "1"), "--etcd-ttl 1 is not usable"),
        (("--store", "etcd", "--etcd-ttl", "-5"), "--etcd-ttl -5 is not usable"),
        (("--store", "etcd", "--etcd-ttl", "inf"), "--etcd-ttl (not a finite number of seconds) is not usable"),
        (("--store", "etcd", "--etcd-ttl", "nan"), "--etcd-ttl (not a finite number of seconds)"),
        (("--store", "etcd", "--etcd-ttl", "600", "--etcd-renew-margin", "3600"), "--etcd-renew-margin 3600 must"),
        (("--embedded-ttl", "100", "--embedded-renew-margin", "100"), "--embedded-renew-margin 100 must"),
        (("--embedded-ttl", "1e300"), "--embedded-ttl (not a finite number of seconds)"),
    ],
)
def test_unusable_lease_timing_is_one_line(tmp_path: Path, args: tuple[str, ...], fragment: str) -> None:
    one_line(run(*args, "leases", path=tmp_path / "s.db"), 2, fragment)


def test_a_short_ttl_alone_derives_its_margin(tmp_path: Path) -> None:
    store = open_store("embedded", path=str(tmp_path / "s.db"), ttl=100)
    assert store.lease_ttl == timedelta(seconds=100) and store.renew_margin == timedelta(seconds=50)
    store.close()
    assert open_store("etcd", ttl=600).renew_margin == timedelta(seconds=300)
    assert open_store("etcd").renew_margin == timedelta(hours=1)
    assert open_store("etcd", ttl=600, renew_margin=60).renew_margin == timedelta(seconds=60)


@BUDGET
@given(
    ttl=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**12), 10**12)),
    margin=st.one_of(st.just(0), st.floats(allow_nan=True, allow_infinity=True), st.integers(-(10**6), 10**10)),
)
def test_lease_timing_is_usable_or_refused(ttl: float, margin: float) -> None:
    try:
        options = LeaseTimingOptions(ttl=ttl, renew_margin=margin)
        options.check("--x-")
    except UserError as exc:
        assert "--x-" in str(exc) and "\n" not in str(exc)
        return
    assert math.isfinite(float(ttl)) and MIN_TTL <= options.ttl <= MAX_TTL
    assert timedelta(0) < options.effective_renew_margin < options.ttl


def test_renewals_never_come_faster_than_the_floor(tmp_path: Path) -> None:
    """ttl 2 s with a 1.99 s margin used to renew every 10 ms; the floor spaces them by 1 s."""
    store = open_store("embedded", path=str(tmp_path / "s.db"), ttl=2, renew_margin=1.99)
    daemon = Daemon(DaemonSettings(), store=store)
    daemon.lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    time.sleep(0.05)
    renewals = 0
    started = time.monotonic()
    while time.monotonic() - started < 1.5:
        before = daemon.lease
        daemon._keep_lease(store.list_leases())
        renewals += daemon.lease is not before
        due = daemon._renew_due_in()
        assert due is not None
        time.sleep(min(due, 0.5) + 0.001)
    assert 1 <= renewals <= 2, renewals
    daemon._last_renewal = time.monotonic()
    assert (daemon._renew_due_in() or 0) > MIN_RENEW_INTERVAL - 0.1
    store.close()


# -- etcd endpoints ----------------------------------------------------------------------------


def test_an_unparsable_endpoint_is_one_line(tmp_path: Path) -> None:
    line = one_line(run("--store", "etcd", "--etcd-endpoints", "http://[::1", "leases"), 2, "--etcd-endpoints")
    assert "http://[::1" in line


@BUDGET
@given(st.text(max_size=60))
def test_endpoints_are_accepted_or_refused_with_a_user_error(text: str) -> None:
    try:
        options = EtcdOptions(endpoints=text)
    except UserError as exc:
        assert "--etcd-endpoints" in str(exc)
        return
    assert all(isinstance(url, str) and url for url in options.endpoints)


# -- garbled entries: once per key and revision, then a counter -------------------------------


def _junk(path: Path, keys: list[str]) -> None:
    db = sqlite3.connect(path)
    with db:
        for key in keys:
            db.execute(
                "INSERT OR REPLACE INTO leases (key, value, expires, revision) VALUES (?, 'junk', NULL, 7)", (key,)
            )
    db.close()


def test_300_junk_keys_are_warned_300_times_in_all(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.db"
    store = open_store("embedded", path=str(path))
    _junk(path, [f"junk-{i}" for i in range(300)])
    caplog.set_level(logging.WARNING)
    for _ in range(6):
        assert store.list_leases().leases == ()
    assert len([r for r in caplog.records if "garbled" in r.getMessage()]) == 300
    assert store.garbled_skipped == 1800
    store.close()


@settings(max_examples=30, deadline=None)
@given(keys=st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=20, unique=True), passes=st.integers(1, 4))
def test_each_garbled_key_is_warned_once(keys: list[str], passes: int) -> None:
    keys = [k for k in keys if "\x00" not in k]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.db"
        store = open_store("embedded", path=str(path))
        _junk(path, keys)
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logger = logging.getLogger("overlayd.plugin")
        logger.addHandler(handler)
        try:
            for _ in range(passes):
                store.list_leases()
        finally:
            logger.removeHandler(handler)
            store.close()
        assert len([r for r in records if r.levelno == logging.WARNING]) == len(keys)
        assert store.garbled_skipped == len(keys) * passes


# -- a corrupted embedded store ----------------------------------------------------------------


def _checkpointed_store(path: Path) -> EmbeddedStore:
    store = open_store("embedded", path=str(path))
    assert isinstance(store, EmbeddedStore)
    store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # what SQLite does by itself every 1000 pages
    return store


@pytest.mark.parametrize("damage", ["garbage", "truncate-100", "truncate-0", "truncate-5000"])
def test_a_running_store_notices_its_file_was_damaged(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s.db"
    store = _checkpointed_store(path)
    assert store.list_leases().leases  # fine so far
    if damage == "garbage":
        with open(path, "r+b") as handle:
            handle.write(os.urandom(8192))
    else:
        os.truncate(path, int(damage.split("-")[1]))
    time.sleep(FILE_CHECK_INTERVAL + 0.05)
    for call in (store.list_leases, lambda: store.wait_for_events(0, 0.1), store.get_config):
        with pytest.raises(StoreCorrupted, match=f"embedded store {path} is corrupted.*move the file aside"):
            call()
    # a second process (the CLI, a restarted daemon) is told at once, not after a 15 s "locked" wait
    started = time.monotonic()
    line = one_line(run("leases", path=path, timeout=30), 1, f"embedded store {path} is corrupted")
    assert time.monotonic() - started < 8, line
    with pytest.raises(StoreCorrupted):
        open_store("embedded", path=str(path))
    store.close()


def test_a_running_daemon_reports_a_damaged_store(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    settings = DaemonSettings(
        store="embedded",
        store_options={"path": str(db)},
        backend="routes-file",
        backend_options={"path": str(tmp_path / "routes.json")},
        network=IPv4Network("10.30.0.0/16"),
        ifaces=("lo",),
        public_ip="192.0.2.1",
        subnet_file=str(tmp_path / "subnet.env"),
        resync_period=0.5,
    )
    daemon, stop = Daemon(settings), threading.Event()
    thread = threading.Thread(target=daemon.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not daemon.status.first_reconcile_done and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.status.first_reconcile_done and daemon.status.store_healthy
        os.truncate(db, 0)
        while daemon.status.store_healthy and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        assert not daemon.status.store_healthy
        assert daemon.status.last_error and "is corrupted" in daemon.status.last_error
    finally:
        stop.set()
        thread.join(10)


def test_a_file_that_is_not_a_database_is_reported_as_such(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"hello, this is not sqlite" * 100)
    with pytest.raises(StoreCorrupted, match="file is not a database"):
        open_store("embedded", path=str(path))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cut=st.integers(0, 40000), garbage_at=st.one_of(st.none(), st.integers(0, 40000)))
@example(cut=0, garbage_at=25)  # the schema format number overwritten: SQLite says "unsupported file format"
def test_any_damage_is_corruption_or_harmless_never_a_hang(cut: int, garbage_at: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s.db"
        store = _checkpointed_store(path)
        for i in range(2, 40):
            store.acquire_lease(NETWORK, attrs_for(f"192.0.2.{i}"))
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if garbage_at is None:
            os.truncate(path, min(cut, path.stat().st_size))
        else:
            with open(path, "r+b") as handle:
                handle.seek(garbage_at)
                handle.write(b"\xa5" * 512)
        started = time.monotonic()
        for fresh in (False, True):
            try:
                other = open_store("embedded", path=str(path)) if fresh else store
                assert isinstance(other, EmbeddedStore)
                other._last_check = 0.0
                other.list_leases()
                other.wait_for_events(0, 0.01)
                if fresh:
                    other.close()
            except (StoreCorrupted, StoreUnavailable):
                pass
        assert time.monotonic() - started < 5
        store.close()


def test_files_from_before_created_revisions_are_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE leases (key TEXT PRIMARY KEY, value TEXT NOT NULL, expires REAL, revision INTEGER NOT NULL);
        CREATE TABLE events (revision INTEGER PRIMARY KEY, kind TEXT NOT NULL, key TEXT NOT NULL, value TEXT,
                             expires REAL);
        INSERT INTO meta VALUES ('revision', '5'), ('compacted', '0');
        """
    )
    db.execute("INSERT INTO leases VALUES ('10.244.3.0-24', ?, NULL, 5)", (attrs_for("192.0.2.3").to_json(),))
    db.commit()
    db.close()
    store = open_store("embedded", path=str(path))
    [old] = store.list_leases().leases
    assert old.revision == old.created_revision == 5
    new = store.acquire_lease(NETWORK, attrs_for("192.0.2.4"))
    assert new.created_revision == new.revision == 6
    assert store.renew_lease(old).created_revision == 5
    store.close()


# -- unreserve of a live lease -----------------------------------------------------------------


def test_unreserve_of_a_live_lease_says_so_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = open_store("embedded", path=str(path))
    lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    line = one_line(run("unreserve", str(lease.subnet), path=path), 2, f"{lease.subnet} is a live lease of 192.0.2.1")
    assert "not a reservation" in line and f"overlayd release {lease.subnet}" in line
    assert [x.subnet for x in store.list_leases().leases] == [lease.subnet]
    store.reserve(IPv4Network("10.244.9.0/24"), IPv4Address("192.0.2.9"))
    assert run("unreserve", "10.244.9.0/24", path=path).returncode == 0
    assert all(x.subnet != IPv4Network("10.244.9.0/24") for x in store.list_leases().leases)
    store.close()


def test_concurrent_unreserve_and_renew_never_delete_a_lease(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    store, other = open_store("embedded", path=path), open_store("embedded", path=path)
    lease = store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
    assert lease.subnet is not None
    stop = threading.Event()

    def renew() -> None:
        current = lease
        while not stop.is_set():
            current = store.renew_lease(current)

    thread = threading.Thread(target=renew)
    thread.start()
    try:
        for _ in range(50):
            with pytest.raises(UserError):
                other.unreserve(lease.subnet)
    finally:
        stop.set()
        thread.join()
    assert [x.subnet for x in other.list_leases().leases] == [lease.subnet]
    store.close()
    other.close()
