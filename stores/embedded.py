"""Embedded store: the network config and leases in one SQLite file.

For one machine with many processes (the demo, tests, single-host setups); the default store.

Design notes:
* WAL journal so readers never block the writer; every write is a ``BEGIN IMMEDIATE``
  transaction, which makes compare-and-create atomic across processes.
* A global revision counter in ``meta`` is bumped by every write, and every lease change is
  appended to ``events`` with its revision — the etcd model in miniature, so the embedded store
  has the same semantics (list at a revision, watch from a revision) as the etcd store.
* ``events`` is trimmed to the last ``history`` rows; asking for older changes raises
  ``HistoryGone`` and the caller re-lists, exactly as after an etcd compaction.
* TTLs are wall-clock expiry times (several processes share them).  Expired rows are swept
  lazily, by whichever process reads next, and produce an ``expired`` event.
* Watching polls the revision counter every 20 ms: far inside the 100 ms wake-up budget and
  cheap (a single-row primary-key read).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address, IPv4Network

import attrs
from overlayd.errors import GarbledLease, HistoryGone, LeaseLost, StoreUnavailable, UserError
from overlayd.model import (
    EventKind,
    Lease,
    LeaseAttrs,
    LeaseEvent,
    LeaseList,
    WatchResult,
    key_to_subnet,
    parse_lease,
    subnet_to_key,
)
from overlayd.plugin import Store, option, seconds

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.02
SWEEP_INTERVAL = 0.5
OPEN_TIMEOUT = 15.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires REAL,
    revision INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT,
    expires REAL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', '0'), ('compacted', '0');
"""


@attrs.frozen
class EmbeddedOptions:
    path: str = option("/var/lib/overlayd/store.db", "SQLite file holding the config and leases")
    ttl: timedelta = option(timedelta(hours=24), "lease lifetime in seconds", converter=seconds)
    renew_margin: timedelta = option(
        timedelta(hours=1), "renew a lease when less than this many seconds are left", converter=seconds
    )
    history: int = option(10000, "lease changes kept for watchers that resume", converter=int)


class EmbeddedStore(Store):
    """SQLite file on this machine; many processes, one host (the default store)."""

    Options = EmbeddedOptions
    options: EmbeddedOptions

    def __init__(self, options: EmbeddedOptions) -> None:
        super().__init__(options)
        self._lock = threading.RLock()
        self._last_sweep = 0.0
        directory = os.path.dirname(os.path.abspath(options.path))
        try:
            os.makedirs(directory, exist_ok=True)
            self._db = sqlite3.connect(options.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise UserError(
                f"cannot open the embedded store at {options.path} ({exc}); pass --embedded-path with a writable file"
            ) from exc
        self._initialise(options.path)

    def _initialise(self, path: str) -> None:
        """Switch to WAL and create the schema.  Several processes may do this to a new file at
        once; switching the journal mode does not wait for the busy handler, so retry it."""
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                with self._write() as db:
                    for statement in _SCHEMA.strip().split(";"):
                        if statement.strip():
                            db.execute(statement)
                return
            except (sqlite3.OperationalError, StoreUnavailable) as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise UserError(
                        f"cannot open the embedded store at {path} ({exc}); pass --embedded-path with a writable file"
                    ) from exc
                if time.monotonic() > deadline:
                    raise StoreUnavailable(f"embedded store {path} stayed locked for {OPEN_TIMEOUT:.0f}s") from exc
                time.sleep(0.05)
            except sqlite3.Error as exc:
                raise UserError(
                    f"cannot open the embedded store at {path} ({exc}); pass --embedded-path with a writable file"
                ) from exc

    # -- plumbing -----------------------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: serialised against every other process."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise StoreUnavailable(f"embedded store is locked or unreadable: {exc}") from exc
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            else:
                self._db.execute("COMMIT")

    def _bump(self, db: sqlite3.Connection) -> int:
        row = db.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision' RETURNING value"
        ).fetchone()
        return int(row[0])

    def _record(
        self, db: sqlite3.Connection, kind: EventKind, key: str, value: str | None, expires: float | None
    ) -> int:
        revision = self._bump(db)
        db.execute(
            "INSERT INTO events (revision, kind, key, value, expires) VALUES (?, ?, ?, ?, ?)",
            (revision, kind.value, key, value, expires),
        )
        cutoff = revision - self.options.history
        if cutoff > 0 and revision % 64 == 0:
            db.execute("DELETE FROM events WHERE revision <= ?", (cutoff,))
            db.execute("UPDATE meta SET value = ? WHERE key = 'compacted'", (str(cutoff),))
        return revision

    def _meta(self, key: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    def _sweep(self, force: bool = False) -> None:
        """Delete expired leases, recording an ``expired`` event for each."""
        now = time.time()
        if not force and now - self._last_sweep < SWEEP_INTERVAL:
            return
        self._last_sweep = now
        with self._lock:
            stale = self._db.execute(
                "SELECT 1 FROM leases WHERE expires IS NOT NULL AND expires <= ? LIMIT 1", (now,)
            ).fetchone()
        if stale is None:
            return
        with self._write() as db:
            self._expire(db, now)

    def _expire(self, db: sqlite3.Connection, now: float) -> None:
        rows = db.execute(
            "SELECT key, value, expires FROM leases WHERE expires IS NOT NULL AND expires <= ?", (now,)
        ).fetchall()
        for key, value, expires in rows:
            db.execute("DELETE FROM leases WHERE key = ?", (key,))
            self._record(db, EventKind.EXPIRED, key, value, expires)

    def _to_lease(self, key: str, value: str, expires: float | None, revision: int) -> Lease:
        expiration = None if expires is None else datetime.fromtimestamp(expires, UTC)
        return parse_lease(key, value, expiration=expiration, revision=revision, ipv6=":" in key)

    # -- config -------------------------------------------------------------------------------

    def get_config(self) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        return None if row is None else str(row[0])

    def put_config(self, text: str, *, only_if_absent: bool = False) -> bool:
        with self._write() as db:
            if only_if_absent:
                cursor = db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('config', ?)", (text,))
            else:
                cursor = db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('config', ?)", (text,))
            return cursor.rowcount == 1

    # -- leases -------------------------------------------------------------------------------

    def list_leases(self) -> LeaseList:
        self._sweep(force=True)
        with self._lock:
            self._db.execute("BEGIN")
            try:
                rows = self._db.execute("SELECT key, value, expires, revision FROM leases").fetchall()
                revision = int(self._db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])
            finally:
                self._db.execute("COMMIT")
        leases = []
        now = time.time()
        for key, value, expires, rev in rows:
            if expires is not None and expires <= now:
                continue
            try:
                leases.append(self._to_lease(key, value, expires, rev))
            except GarbledLease as exc:
                log.warning("embedded store: skipping garbled lease %s: %s", key, exc)
        return LeaseList(tuple(leases), revision)

    def create_lease(self, lease: Lease) -> Lease | None:
        key = lease.key
        value = lease.attrs.to_json()
        now = time.time()
        expires = now + self.lease_ttl.total_seconds()
        with self._write() as db:
            self._expire(db, now)
            if db.execute("SELECT 1 FROM leases WHERE key = ?", (key,)).fetchone():
                return None
            revision = self._record(db, EventKind.ADDED, key, value, expires)
            db.execute(
                "INSERT INTO leases (key, value, expires, revision) VALUES (?, ?, ?, ?)",
                (key, value, expires, revision),
            )
        return self._to_lease(key, value, expires, revision)

    def update_lease(self, lease: Lease, attrs: LeaseAttrs) -> Lease:
        key = lease.key
        value = attrs.to_json()
        now = time.time()
        with self._write() as db:
            self._expire(db, now)
            row = db.execute("SELECT value, expires FROM leases WHERE key = ?", (key,)).fetchone()
            if row is None:
                raise LeaseLost(f"lease {key} no longer exists in the embedded store")
            current = LeaseAttrs.from_json(row[0])
            if current.public_ip != attrs.public_ip:
                raise LeaseLost(f"lease {key} now belongs to {current.public_ip}")
            expires = None if row[1] is None else now + self.lease_ttl.total_seconds()
            revision = self._record(db, EventKind.ADDED, key, value, expires)
            db.execute(
                "UPDATE leases SET value = ?, expires = ?, revision = ? WHERE key = ?",
                (value, expires, revision, key),
            )
        return self._to_lease(key, value, expires, revision)

    def delete_lease(self, lease: Lease) -> None:
        self._delete(lease.key)

    def _delete(self, key: str) -> None:
        with self._write() as db:
            row = db.execute("SELECT value, expires FROM leases WHERE key = ?", (key,)).fetchone()
            if row is None:
                return
            db.execute("DELETE FROM leases WHERE key = ?", (key,))
            self._record(db, EventKind.REMOVED, key, row[0], row[1])

    def reserve(self, subnet: IPv4Network, public_ip: IPv4Address) -> Lease:
        key = subnet_to_key(subnet)
        with self._write() as db:
            self._expire(db, time.time())
            row = db.execute("SELECT value FROM leases WHERE key = ?", (key,)).fetchone()
            if row is not None:
                current = LeaseAttrs.from_json(row[0])
                if current.public_ip != public_ip:
                    raise UserError(
                        f"subnet {subnet} is leased by {current.public_ip}; "
                        "release that lease first or reserve another subnet"
                    )
                attrs = current
            else:
                attrs = LeaseAttrs(public_ip=public_ip, backend_type="")
            value = attrs.to_json()
            revision = self._record(db, EventKind.ADDED, key, value, None)
            db.execute(
                "INSERT OR REPLACE INTO leases (key, value, expires, revision) VALUES (?, ?, NULL, ?)",
                (key, value, revision),
            )
        return self._to_lease(key, value, None, revision)

    def unreserve(self, subnet: IPv4Network) -> None:
        key = subnet_to_key(subnet)
        with self._lock:
            row = self._db.execute("SELECT expires FROM leases WHERE key = ?", (key,)).fetchone()
        if row is not None and row[0] is None:
            self._delete(key)

    def wait_for_events(self, since_revision: int, timeout: float) -> WatchResult:
        deadline = time.monotonic() + timeout
        while True:
            self._sweep()
            if self._meta("revision") > since_revision:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return WatchResult((), since_revision)
            time.sleep(min(POLL_INTERVAL, remaining))
        with self._lock:
            if since_revision < self._meta("compacted"):
                raise HistoryGone(f"embedded store history before revision {self._meta('compacted')} is gone")
            rows = self._db.execute(
                "SELECT revision, kind, key, value, expires FROM events WHERE revision > ? ORDER BY revision",
                (since_revision,),
            ).fetchall()
        events = []
        revision = since_revision
        for rev, kind, key, value, expires in rows:
            revision = rev
            try:
                subnet = key_to_subnet(key)
            except GarbledLease as exc:
                log.warning("embedded store: skipping event for garbled key %s: %s", key, exc)
                continue
            lease = None
            try:
                lease = self._to_lease(key, value, expires, rev) if value is not None else None
            except GarbledLease as exc:
                if kind == EventKind.ADDED.value:
                    log.warning("embedded store: skipping garbled lease %s: %s", key, exc)
                    continue
            events.append(LeaseEvent(EventKind(kind), subnet, lease, rev))
        return WatchResult(tuple(events), max(revision, since_revision))

    def close(self) -> None:
        with self._lock:
            self._db.close()
