"""Embedded store: the network config and leases in one SQLite file.

For one machine with many processes (the demo, tests, single-host setups); the default store.
It implements the key-value primitives of ``Store``; the lease policy (owner checks,
reservations, retries, decoding) is the base class's, shared with every other store.

Design notes:
* WAL journal so readers never block the writer; every write is a ``BEGIN IMMEDIATE``
  transaction, which makes the compare-and-swap primitives atomic across processes.
* A global revision counter in ``meta`` is bumped by every write, and every lease change is
  appended to ``events`` with its revision — the etcd model in miniature, so the embedded store
  has the same semantics (list at a revision, watch from a revision) as the etcd store.  Each
  lease row keeps its modification revision (the CAS version) and the revision that created it
  (``created``; files from before that column get it added, filled with the row's revision).
* ``events`` is trimmed to the last ``history`` rows; asking for older changes raises
  ``HistoryGone`` and the caller re-lists, exactly as after an etcd compaction.
* TTLs are wall-clock expiry times (several processes share them).  Expired rows are swept
  lazily, by whichever process reads next, and produce an ``expired`` event.
* Watching polls the revision counter every 20 ms: far inside the 100 ms wake-up budget and
  cheap (a single-row primary-key read).
* Corruption is not lock contention.  A connection keeps serving cached pages after the file
  under it was truncated or overwritten, so every store call checks the file's header (a stat
  and a 100-byte read, at most once a second), and SQLite's "file is not a database" /
  "malformed" errors become ``StoreCorrupted`` naming the file and what to do, for the CLI at
  open time (no 15 s "locked" wait) and for running daemons alike.
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
from typing import Any

import attrs
from overlayd.sdk import (
    Change,
    ChangeList,
    Entry,
    EntryList,
    EventKind,
    HistoryGone,
    LeaseTimingOptions,
    Store,
    StoreCorrupted,
    StoreUnavailable,
    UserError,
    is_ipv6_key,
    option,
)

log = logging.getLogger(__name__)

POLL_INTERVAL = 0.02
SWEEP_INTERVAL = 0.5
OPEN_TIMEOUT = 15.0
#: How often a call re-reads the file header to notice a file damaged under the connection.
FILE_CHECK_INTERVAL = 1.0

_MAGIC = b"SQLite format 3\x00"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS leases (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    expires REAL,
    revision INTEGER NOT NULL,
    created INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT,
    expires REAL,
    created INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', '0'), ('compacted', '0');
"""

_CORRUPT_CODES = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}


@attrs.frozen
class EmbeddedOptions(LeaseTimingOptions):
    path: str = option("/var/lib/overlayd/store.db", "SQLite file holding the config and leases")
    history: int = option(10000, "lease changes kept for watchers that resume", converter=int)


def _corrupted(path: str, what: str) -> StoreCorrupted:
    return StoreCorrupted(
        f"embedded store {path} is corrupted ({what}): stop every overlayd using it, move the file "
        "aside (or restore a backup) and start again; hosts then acquire their leases anew"
    )


def file_damage(path: str) -> str | None:
    """What is wrong with the SQLite file at *path* judging by its size and header, or None.

    A missing or empty file is a new store, unless WAL files beside it show it was in use
    (a database in WAL mode always has its first page written).
    """
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(100)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot read it: {exc.strerror}"
    if size == 0:
        in_use = os.path.exists(path + "-shm") or os.path.exists(path + "-wal")
        return "truncated to 0 bytes while in use" if in_use else None
    if size < 100 or not header.startswith(_MAGIC):
        return "file is not a database" if not header.startswith(_MAGIC[: len(header)]) else "truncated header"
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    if page_size < 512 or size % page_size:
        return f"truncated to {size} bytes, not a whole number of {page_size}-byte pages"
    # file format versions (bytes 18-19: 1 legacy, 2 WAL) and schema format (44-47: 0 for an
    # empty file, else 1-4), see https://www.sqlite.org/fileformat.html#the_database_header
    if header[18] not in (1, 2) or header[19] not in (1, 2) or int.from_bytes(header[44:48], "big") > 4:
        return "unsupported file format (damaged header)"
    return None


class EmbeddedStore(Store):
    """SQLite file on this machine; many processes, one host (the default store)."""

    Options = EmbeddedOptions
    options: EmbeddedOptions

    def __init__(self, options: EmbeddedOptions) -> None:
        super().__init__(options)
        self._lock = threading.RLock()
        self._last_sweep = 0.0
        self._last_check = 0.0
        self._damage: str | None = None  # once seen, every call reports it: the connection is stale
        self._path = options.path
        directory = os.path.dirname(os.path.abspath(options.path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"cannot open the embedded store at {options.path} ({exc}); pass --embedded-path with a writable file"
            ) from exc
        self._check_file(force=True)
        try:
            # Created here, private (0600), before SQLite makes it with the umask's mode: SQLite
            # gives the -wal and -shm files the mode of the database file.
            os.close(os.open(options.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
            self._db = sqlite3.connect(options.path, timeout=10.0, isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError) as exc:
            raise UserError(
                f"cannot open the embedded store at {options.path} ({exc}); pass --embedded-path with a writable file"
            ) from exc
        self._initialise(options.path)

    def _initialise(self, path: str) -> None:
        """Switch to WAL, create or upgrade the schema.  Several processes may do this to a new
        file at once; switching the journal mode does not wait for the busy handler, so retry it."""
        deadline = time.monotonic() + OPEN_TIMEOUT
        while True:
            try:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=NORMAL")
                with self._write() as db:
                    for statement in _SCHEMA.strip().split(";"):
                        if statement.strip():
                            db.execute(statement)
                    self._upgrade(db)
                return
            except StoreCorrupted:
                raise
            except sqlite3.OperationalError as exc:
                if "unsupported file format" in str(exc) or "malformed" in str(exc):
                    raise self._translate(exc) from exc
                self._retry_open(path, exc, deadline)
            except StoreUnavailable as exc:
                self._retry_open(path, exc, deadline)
            except sqlite3.DatabaseError as exc:
                raise self._translate(exc) from exc

    def _retry_open(self, path: str, exc: Exception, deadline: float) -> None:
        """Lock contention while opening waits (up to ``OPEN_TIMEOUT``); anything else is the user's."""
        if "locked" not in str(exc) and "busy" not in str(exc):
            raise UserError(
                f"cannot open the embedded store at {path} ({exc}); pass --embedded-path with a writable file"
            ) from exc
        self._check_file(force=True)
        if time.monotonic() > deadline:
            raise StoreUnavailable(f"embedded store {path} stayed locked for {OPEN_TIMEOUT:.0f}s") from exc
        time.sleep(0.05)

    def _upgrade(self, db: sqlite3.Connection) -> None:
        """Add the ``created`` column to files written before it existed."""
        for table in ("leases", "events"):
            columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            if "created" not in columns:
                db.execute(f"ALTER TABLE {table} ADD COLUMN created INTEGER NOT NULL DEFAULT 0")
                db.execute(f"UPDATE {table} SET created = revision")
                log.info("embedded store %s: added the created-revision column to %s", self._path, table)

    # -- plumbing -----------------------------------------------------------------------------

    def _check_file(self, force: bool = False) -> None:
        """Raise ``StoreCorrupted`` when the file header shows damage (read at most once a second)."""
        now = time.monotonic()
        if self._damage is None and (force or now - self._last_check >= FILE_CHECK_INTERVAL):
            self._last_check = now
            self._damage = file_damage(self._path)
        if self._damage is not None:
            raise _corrupted(self._path, self._damage)

    def _translate(self, exc: sqlite3.Error) -> Exception:
        """SQLite's error as ours: lock contention is transient, damage is ``StoreCorrupted``."""
        text = str(exc)
        name = getattr(exc, "sqlite_errorname", "")
        if isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError):  # e.g. used after close()
            return StoreUnavailable(f"embedded store {self._path}: {text}")
        damaged = name in _CORRUPT_CODES or "no such table" in text or "unsupported file format" in text
        if isinstance(exc, sqlite3.OperationalError) and not damaged:
            if "locked" in text or "busy" in text:
                return StoreUnavailable(f"embedded store {self._path} is locked: {text}")
            return StoreUnavailable(f"embedded store {self._path} failed: {text}")
        self._damage = text
        return _corrupted(self._path, text)

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock, with SQLite errors translated."""
        with self._lock:
            self._check_file()
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction: serialised against every other process."""
        with self._lock:
            self._check_file()
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise self._translate(exc) from exc
            try:
                yield self._db
            except BaseException as exc:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    raise self._translate(exc) from exc
                raise
            else:
                try:
                    self._db.execute("COMMIT")
                except sqlite3.Error as exc:
                    raise self._translate(exc) from exc

    def _bump(self, db: sqlite3.Connection) -> int:
        row = db.execute(
            "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision' RETURNING value"
        ).fetchone()
        return int(row[0])

    def _record(
        self,
        db: sqlite3.Connection,
        kind: EventKind,
        key: str,
        value: str | None,
        expires: float | None,
        created: int | None = None,
    ) -> int:
        """Bump the revision and log the change; *created* None means "created by this change"."""
        revision = self._bump(db)
        db.execute(
            "INSERT INTO events (revision, kind, key, value, expires, created) VALUES (?, ?, ?, ?, ?, ?)",
            (revision, kind.value, key, value, expires, revision if created is None else created),
        )
        cutoff = revision - self.options.history
        if cutoff > 0 and revision % 64 == 0:
            db.execute("DELETE FROM events WHERE revision <= ?", (cutoff,))
            db.execute("UPDATE meta SET value = ? WHERE key = 'compacted'", (str(cutoff),))
        return revision

    def _meta(self, key: str) -> int:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0])

    def _sweep(self, force: bool = False) -> None:
        """Delete expired leases, recording an ``expired`` event for each."""
        now = time.time()
        if not force and now - self._last_sweep < SWEEP_INTERVAL:
            return
        self._last_sweep = now
        with self._read() as db:
            stale = db.execute(
                "SELECT 1 FROM leases WHERE expires IS NOT NULL AND expires <= ? LIMIT 1", (now,)
            ).fetchone()
        if stale is None:
            return
        with self._write() as db:
            self._expire(db, now)

    def _expire(self, db: sqlite3.Connection, now: float) -> None:
        rows = db.execute(
            "SELECT key, value, expires, created FROM leases WHERE expires IS NOT NULL AND expires <= ?", (now,)
        ).fetchall()
        for key, value, expires, created in rows:
            db.execute("DELETE FROM leases WHERE key = ?", (key,))
            self._record(db, EventKind.EXPIRED, key, value, expires, created)

    @staticmethod
    def _entry(key: str, value: Any, expires: float | None, revision: int, created: int) -> Entry:
        expiration = None if expires is None else datetime.fromtimestamp(expires, UTC)
        text = value if isinstance(value, str | bytes) else str(value)
        return Entry(key, text, int(revision), expiration, int(created or 0), ipv6=is_ipv6_key(key))

    def _expires(self, ttl: timedelta | None, now: float) -> float | None:
        return None if ttl is None else now + ttl.total_seconds()

    # -- config -------------------------------------------------------------------------------

    def get_config(self) -> str | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'config'").fetchone()
        return None if row is None else str(row[0])

    def put_config(self, text: str, *, only_if_absent: bool = False) -> bool:
        with self._write() as db:
            if only_if_absent:
                cursor = db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('config', ?)", (text,))
            else:
                cursor = db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('config', ?)", (text,))
            return cursor.rowcount == 1

    # -- key-value primitives -----------------------------------------------------------------

    def list_entries(self) -> EntryList:
        self._sweep(force=True)
        with self._read() as db:
            db.execute("BEGIN")
            try:
                rows = db.execute("SELECT key, value, expires, revision, created FROM leases").fetchall()
                revision = int(db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])
            finally:
                db.execute("COMMIT")
        now = time.time()
        entries = tuple(
            self._entry(key, value, expires, rev, created)
            for key, value, expires, rev, created in rows
            if expires is None or expires > now
        )
        return EntryList(entries, revision)

    def get_entry(self, key: str) -> Entry | None:
        with self._read() as db:
            row = db.execute("SELECT value, expires, revision, created FROM leases WHERE key = ?", (key,)).fetchone()
        if row is None or (row[1] is not None and row[1] <= time.time()):
            return None
        return self._entry(key, row[0], row[1], row[2], row[3])

    def create_entry(self, key: str, value: str, ttl: timedelta | None) -> Entry | None:
        now = time.time()
        expires = self._expires(ttl, now)
        with self._write() as db:
            self._expire(db, now)
            if db.execute("SELECT 1 FROM leases WHERE key = ?", (key,)).fetchone():
                return None
            revision = self._record(db, EventKind.ADDED, key, value, expires)
            db.execute(
                "INSERT INTO leases (key, value, expires, revision, created) VALUES (?, ?, ?, ?, ?)",
                (key, value, expires, revision, revision),
            )
        return self._entry(key, value, expires, revision, revision)

    def put_entry(self, current: Entry, value: str, ttl: timedelta | None) -> Entry | None:
        now = time.time()
        expires = self._expires(ttl, now)
        with self._write() as db:
            self._expire(db, now)
            row = db.execute("SELECT revision, created FROM leases WHERE key = ?", (current.key,)).fetchone()
            if row is None or row[0] != current.version:
                return None
            created = int(row[1])
            revision = self._record(db, EventKind.ADDED, current.key, value, expires, created)
            db.execute(
                "UPDATE leases SET value = ?, expires = ?, revision = ? WHERE key = ?",
                (value, expires, revision, current.key),
            )
        return self._entry(current.key, value, expires, revision, created)

    def delete_entry(self, current: Entry) -> bool:
        with self._write() as db:
            row = db.execute(
                "SELECT value, expires, revision, created FROM leases WHERE key = ?", (current.key,)
            ).fetchone()
            if row is None:
                return True
            if row[2] != current.version:
                return False
            db.execute("DELETE FROM leases WHERE key = ?", (current.key,))
            self._record(db, EventKind.REMOVED, current.key, row[0], row[1], row[3])
        return True

    def watch_entries(self, since_revision: int, timeout: float) -> ChangeList:
        deadline = time.monotonic() + timeout
        while True:
            self._sweep()
            if self._meta("revision") > since_revision:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return ChangeList((), since_revision)
            time.sleep(min(POLL_INTERVAL, remaining))
        with self._read() as db:
            compacted = self._meta("compacted")
            if since_revision < compacted:
                raise HistoryGone(f"embedded store history before revision {compacted} is gone")
            rows = db.execute(
                "SELECT revision, kind, key, value, expires, created FROM events WHERE revision > ? ORDER BY revision",
                (since_revision,),
            ).fetchall()
        changes = []
        revision = since_revision
        for rev, kind, key, value, expires, created in rows:
            revision = rev
            entry = None if value is None else self._entry(key, value, expires, rev, created)
            changes.append(Change(EventKind(kind), key, entry, rev, ipv6=is_ipv6_key(key)))
        return ChangeList(tuple(changes), max(revision, since_revision))

    def close(self) -> None:
        with self._lock:
            self._db.close()
