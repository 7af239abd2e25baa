"""A wiped store under the un-cached loop (backends without a kernel cache), on a real etcd.

The daemon runs in-process with the example third-party ``routes-file`` backend, which programs
no kernel state (it writes its routes to a JSON file), so nothing of this host is touched; the
file is read back independently.  The etcd is wiped (killed, data dir deleted, started fresh):
the routes stay, no lease is written while the store has no config, and once the config is put
back the daemon re-creates its lease with the same subnet while the peer it knew stays held
until that peer's lease returns.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from overlayd import open_store
from overlayd.config import NetworkConfig
from overlayd.daemon import Daemon, DaemonSettings
from overlayd.model import LeaseAttrs
from overlayd.testing.etcd import EtcdServer

pytestmark = [pytest.mark.etcd, pytest.mark.timeout(120)]

CONFIG = NetworkConfig.from_dict({"Network": "10.97.0.0/16", "Backend": {"Type": "routes-file"}})


def wait_for(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_wiped_store_keeps_the_routes_and_the_lease_comes_back(tmp_path: Path) -> None:
    if not os.path.exists("/usr/bin/etcd"):
        pytest.skip("needs Debian's etcd-server")
    routes = tmp_path / "routes.json"
    with EtcdServer() as server:
        writer = open_store("etcd", **server.store_options())
        writer.put_config(CONFIG.to_json())
        peer_attrs = LeaseAttrs(public_ip=IPv4Address("198.51.100.2"), backend_type="routes-file")
        peer = writer.acquire_lease(CONFIG, peer_attrs)
        settings = DaemonSettings(
            store="etcd",
            store_options=server.store_options(),
            backend_options={"path": str(routes)},
            public_ip="198.51.100.1",
            subnet_file=str(tmp_path / "subnet.env"),
            resync_period=30.0,
        )
        daemon = Daemon(settings)
        stop = threading.Event()
        thread = threading.Thread(target=daemon.run, args=(stop,), daemon=True)
        thread.start()
        try:

            def dsts() -> set[str]:
                try:
                    return {row["dst"] for row in json.loads(routes.read_text())}
                except (FileNotFoundError, json.JSONDecodeError):
                    return set()

            wait_for(lambda: dsts() == {str(peer.subnet)}, 20, "the peer's route")
            assert daemon.lease is not None
            ours = daemon.lease.subnet
            server.wipe()
            wait_for(lambda: not daemon.status.store_healthy, 10, "the empty store noticed")
            time.sleep(2)  # a few retries against the store without config
            assert dsts() == {str(peer.subnet)}, "the route to the peer was removed on an empty store"
            assert writer.list_leases().leases == (), "a lease was written into a store without config"

            writer.put_config(CONFIG.to_json())
            wait_for(lambda: [x.subnet for x in writer.list_leases().leases] == [ours], 10, "our lease re-created")
            time.sleep(1.5)  # a pass or two after ours came back
            assert dsts() == {str(peer.subnet)}, "the held peer was dropped before its lease came back"
            assert daemon.lease.subnet == ours
        finally:
            stop.set()
            thread.join(15)
            writer.close()
        assert not thread.is_alive()
