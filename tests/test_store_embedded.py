"""The store contract against the embedded (SQLite) store, plus its own details."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest
from overlayd import open_store
from overlayd.errors import HistoryGone, UserError
from overlayd.model import EventKind
from overlayd.testing import StoreContract, StoreSpec
from overlayd.testing.store_contract import NETWORK, attrs_for


def _raw_writer(path: Path):
    """Write a lease row and its event the way the store does, but with any key and value."""

    def write(key: str, value: str) -> None:
        db = sqlite3.connect(path)
        with db:
            [(rev,)] = db.execute(
                "UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision' RETURNING value"
            ).fetchall()
            db.execute(
                "INSERT OR REPLACE INTO leases (key, value, expires, revision, created) VALUES (?, ?, NULL, ?, ?)",
                (key, value, int(rev), int(rev)),
            )
            db.execute(
                "INSERT INTO events (revision, kind, key, value, expires, created) VALUES (?, 'added', ?, ?, NULL, ?)",
                (int(rev), key, value, int(rev)),
            )
        db.close()

    return write


class TestEmbeddedContract(StoreContract):
    @pytest.fixture
    def store_spec(self, tmp_path: Path) -> StoreSpec:
        path = tmp_path / "store.db"
        return StoreSpec("embedded", {"path": str(path)}, write_raw=_raw_writer(path))


def test_unwritable_path_is_a_user_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--embedded-path"):
        open_store("embedded", path=str(blocker / "store.db"))


def test_old_history_forces_a_relist(tmp_path: Path) -> None:
    store = open_store("embedded", path=str(tmp_path / "s.db"), history=10)
    start = store.list_leases().revision
    leases = [store.acquire_lease(NETWORK, attrs_for(f"192.0.2.{i}")) for i in range(1, 70)]
    with pytest.raises(HistoryGone):
        store.wait_for_events(start, 0.1)
    # watch_leases turns lost history into the difference between snapshots
    stop = threading.Event()
    events = store.watch_leases(stop, since_revision=start)
    seen = {next(events).subnet for _ in leases}  # type: ignore[union-attr]
    assert seen == {lease.subnet for lease in leases}
    stop.set()
    store.close()


def test_watch_wakes_within_100ms(tmp_path: Path) -> None:
    path = str(tmp_path / "s.db")
    watcher, writer = open_store("embedded", path=path), open_store("embedded", path=path)
    since = watcher.list_leases().revision
    delays = []
    for i in range(10):
        started = time.monotonic()
        result: list[float] = []

        def wait(since: int = since, result: list[float] = result) -> None:
            watcher.wait_for_events(since, 2.0)
            result.append(time.monotonic())

        thread = threading.Thread(target=wait)
        thread.start()
        time.sleep(0.05)
        started = time.monotonic()
        lease = writer.acquire_lease(NETWORK, attrs_for(f"192.0.2.{i + 1}"))
        thread.join()
        delays.append(result[0] - started)
        since = lease.revision
    delays.sort()
    assert delays[len(delays) // 2] < 0.1, delays
    events = watcher.wait_for_events(0, 0.1).events
    assert {e.kind for e in events} == {EventKind.ADDED}
