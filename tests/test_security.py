"""Security properties that need no kernel: file modes of what overlayd writes, and what the
stores refuse to do to data they do not own (the store contract holds the rest, per store).

The least-privilege run (a non-root daemon with CAP_NET_ADMIN only) is in
``tests/e2e/test_least_privilege.py``; secrets in outputs in ``tests/e2e/test_secrets.py``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from overlayd import open_store
from overlayd.subnetfile import write_subnet_file
from overlayd.testing.store_contract import NETWORK, attrs_for


@pytest.fixture
def loose_umask() -> Iterator[None]:
    """The umask of a careless service manager: files are made world-readable unless the code says no."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_embedded_store_files_are_private(tmp_path: Path, loose_umask: None) -> None:
    path = tmp_path / "state" / "store.db"
    store = open_store("embedded", path=str(path))
    try:
        store.acquire_lease(NETWORK, attrs_for("192.0.2.1"))
        made = [p for p in path.parent.iterdir() if p.name.startswith("store.db")]
        assert {p.name for p in made} >= {"store.db", "store.db-wal", "store.db-shm"}
        assert {p.name: oct(mode(p)) for p in made} == {p.name: oct(0o600) for p in made}
    finally:
        store.close()


def test_subnet_file_is_world_readable_but_not_writable(tmp_path: Path) -> None:
    old = os.umask(0o077)  # a strict umask must not hide it from the container runtime either
    try:
        write_subnet_file(str(tmp_path / "subnet.env"), "FLANNEL_NETWORK=10.244.0.0/16\n")
    finally:
        os.umask(old)
    assert mode(tmp_path / "subnet.env") == 0o644
