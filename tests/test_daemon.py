"""The reconcile loop end to end without root: embedded store + the example routes-file backend.

The routes-file backend (a third-party package from examples/) keeps a JSON file equal to the
routes this host needs, so the whole loop — lease, watch, desired vs actual, apply, repair — is
exercised and read back from an independent artefact (the file).  Kernel backends are covered
by their functional and end-to-end tests, which need root.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from overlayd import open_store
from overlayd.daemon import Daemon, DaemonSettings
from overlayd.errors import UserError
from overlayd.subnetfile import read_env


class Host:
    def __init__(self, tmp: Path, name: str, ip: str, db: Path, **extra: object) -> None:
        self.routes = tmp / f"{name}-routes.json"
        self.subnet_file = tmp / f"{name}-subnet.env"
        self.settings = DaemonSettings(
            store="embedded",
            store_options={"path": str(db), **extra.pop("store_options", {})},  # type: ignore[dict-item]
            backend="routes-file",
            backend_options={"path": str(self.routes)},
            network=IPv4Network("10.30.0.0/16"),
            ifaces=("lo",),
            public_ip=ip,
            subnet_file=str(self.subnet_file),
            resync_period=0.5,
            **extra,  # type: ignore[arg-type]
        )
        self.stop = threading.Event()
        self.daemon = Daemon(self.settings)
        self.thread = threading.Thread(target=self.daemon.run, args=(self.stop,), daemon=True)

    def start(self) -> Host:
        self.thread.start()
        wait_for(lambda: self.subnet_file.exists(), what="subnet file")
        return self

    def halt(self) -> None:
        self.stop.set()
        self.thread.join(10)
        assert not self.thread.is_alive()

    def routes_now(self) -> dict[str, str]:
        try:
            return {row["dst"]: row["via"] for row in json.loads(self.routes.read_text())}
        except FileNotFoundError:
            return {}

    @property
    def subnet(self) -> str:
        return str(IPv4Network(read_env(str(self.subnet_file))["FLANNEL_SUBNET"], strict=False))


def wait_for(check: Callable[[], object], timeout: float = 10.0, what: str = "condition") -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Host]]:
    hosts: list[Host] = []
    db = tmp_path / "store.db"

    def make(name: str, ip: str, **extra: object) -> Host:
        host = Host(tmp_path, name, ip, db, **extra)
        hosts.append(host)
        return host.start()

    yield make
    for host in hosts:
        if host.thread.is_alive():
            host.halt()


def test_three_hosts_program_each_other(cluster: Callable[..., Host]) -> None:
    a, b, c = cluster("a", "192.0.2.1"), cluster("b", "192.0.2.2"), cluster("c", "192.0.2.3")
    assert len({a.subnet, b.subnet, c.subnet}) == 3
    wait_for(lambda: a.routes_now() == {b.subnet: "192.0.2.2", c.subnet: "192.0.2.3"}, what="a's routes")
    wait_for(lambda: c.routes_now() == {a.subnet: "192.0.2.1", b.subnet: "192.0.2.2"}, what="c's routes")
    env = read_env(str(a.subnet_file))
    assert env["FLANNEL_NETWORK"] == "10.30.0.0/16" and env["FLANNEL_IPMASQ"] == "false"
    assert env["FLANNEL_SUBNET"].endswith(".1/24")


def test_drift_is_repaired_and_removed_peers_disappear(cluster: Callable[..., Host], tmp_path: Path) -> None:
    a, b = cluster("a", "192.0.2.1"), cluster("b", "192.0.2.2")
    wait_for(lambda: a.routes_now() == {b.subnet: "192.0.2.2"}, what="route to b")
    a.routes.write_text("[]")  # drift behind the daemon's back
    repaired = wait_for(lambda: a.routes_now() == {b.subnet: "192.0.2.2"}, what="repair")
    assert repaired < 2.0
    b.halt()
    store = open_store("embedded", path=str(tmp_path / "store.db"))
    [lease_b] = [x for x in store.list_leases().leases if str(x.subnet) == b.subnet]
    store.delete_lease(lease_b)
    store.close()
    removed = wait_for(lambda: a.routes_now() == {}, what="route removal")
    assert removed < 5.0


def test_lease_deleted_from_the_store_is_reacquired_same_subnet(cluster: Callable[..., Host], tmp_path: Path) -> None:
    a = cluster("a", "192.0.2.1")
    store = open_store("embedded", path=str(tmp_path / "store.db"))
    [lease] = store.list_leases().leases
    store.delete_lease(lease)
    wait_for(lambda: len(store.list_leases().leases) == 1, what="re-acquired lease")
    assert str(store.list_leases().leases[0].subnet) == a.subnet
    store.close()


def test_restart_keeps_the_subnet(cluster: Callable[..., Host], tmp_path: Path) -> None:
    a = cluster("a", "192.0.2.1")
    first = a.subnet
    a.halt()
    again = cluster("a", "192.0.2.1")
    assert again.subnet == first


def test_short_ttl_is_renewed_not_lost(cluster: Callable[..., Host], tmp_path: Path) -> None:
    a = cluster("a", "192.0.2.1", store_options={"ttl": 2, "renew_margin": 1.5})
    store = open_store("embedded", path=str(tmp_path / "store.db"))
    first = store.list_leases().leases[0]
    time.sleep(3)
    [now] = store.list_leases().leases
    assert now.subnet == first.subnet and now.revision > first.revision and str(now.subnet) == a.subnet
    store.close()


def test_garbled_and_foreign_leases_are_skipped_and_logged_once(
    cluster: Callable[..., Host], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import sqlite3

    a = cluster("a", "192.0.2.1")
    db = sqlite3.connect(tmp_path / "store.db")
    with db:
        rows = [
            ("10.99.1.0-24", '{"PublicIP":"192.0.2.9","BackendType":"routes-file"}'),  # outside the network
            ("10.30.50.0-24", '{"PublicIP":"192.0.2.9","BackendType":"vxlan"}'),  # foreign backend
            ("10.30.51.0-24", '{"PublicIP":null,"BackendType":"routes-file"}'),  # no public IP
            ("10.30.52.0-24", "{garbage"),
        ]
        for key, value in rows:
            db.execute("INSERT INTO leases (key, value, expires, revision) VALUES (?, ?, NULL, 1)", (key, value))
        db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'revision'")
    db.close()
    with caplog.at_level(logging.WARNING):
        time.sleep(1.5)  # three resync periods
    assert a.routes_now() == {}
    skipped = [r.getMessage() for r in caplog.records if "skipping lease" in r.getMessage()]
    assert len(skipped) == 3, skipped  # once each, the garbage one is dropped by the store
    assert a.thread.is_alive()


def test_contradicting_backend_flag_is_refused(tmp_path: Path) -> None:
    store = open_store("embedded", path=str(tmp_path / "s.db"))
    store.put_config('{"Network": "10.30.0.0/16", "Backend": {"Type": "alloc"}}')
    store.close()
    host = Host(tmp_path, "x", "192.0.2.1", tmp_path / "s.db")
    with pytest.raises(UserError, match="contradicts the stored network config"):
        host.daemon.run(threading.Event())
    assert not host.subnet_file.exists()


def test_health_endpoints_and_status_command(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys
    import urllib.error
    import urllib.request

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    host = Host(tmp_path, "h", "192.0.2.1", tmp_path / "s.db", healthz_port=port)

    def get(path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status, response.read().decode().strip()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode().strip()

    host.start()
    wait_for(lambda: get("/readyz") == (200, "ready"), what="ready")
    assert get("/healthz") == (200, "ok")
    assert get("/nope")[0] == 404
    status = subprocess.run(
        [
            sys.executable,
            "-c",
            "from overlayd.cli import main; main()",
            "--healthz-port",
            str(port),
            "status",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    doc = json.loads(status.stdout)
    assert doc["lease_subnet"] == host.subnet and doc["ready"] == "ready" and doc["store_healthy"] is True
    host.halt()
    down = subprocess.run(
        [sys.executable, "-c", "from overlayd.cli import main; main()", "--healthz-port", str(port), "status"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert down.returncode == 1 and "no overlayd daemon answers" in down.stderr


def test_not_ready_until_a_lease_is_held() -> None:
    from overlayd.health import DaemonStatus

    status = DaemonStatus()
    assert status.ready() == (False, "no lease held")
    status.lease_subnet = "10.30.1.0/24"
    assert status.ready() == (False, "subnet file not written")
    status.subnet_file_written = True
    assert status.ready() == (False, "first reconcile not done")
    status.first_reconcile_done = True
    status.last_reconcile = time.monotonic() - 100
    assert status.ready() == (True, "ready")
    assert status.alive() == (False, "last reconcile 100s ago")


def test_subnet_file_is_restored_when_deleted_or_edited(
    cluster: Callable[..., Host], caplog: pytest.LogCaptureFixture
) -> None:
    """The subnet file is desired state: it stayed gone or wrong while /readyz said 200."""
    a = cluster("a", "192.0.2.1")
    good = a.subnet_file.read_bytes()
    with caplog.at_level(logging.WARNING, logger="overlayd.daemon"):
        a.subnet_file.unlink()
        wait_for(a.subnet_file.exists, timeout=5, what="subnet file restored after deletion")
        assert a.subnet_file.read_bytes() == good
        a.subnet_file.write_text("FLANNEL_SUBNET=10.30.99.1/24\n")
        wait_for(lambda: a.subnet_file.read_bytes() == good, timeout=5, what="subnet file restored after an edit")
        time.sleep(1.2)  # more passes: no more repairs, no more warnings
    repairs = [r.getMessage() for r in caplog.records if "rewriting it" in r.getMessage()]
    assert len(repairs) == 2 and "removed" in repairs[0] and "changed" in repairs[1], repairs
    assert a.daemon.status.subnet_file_written


def test_subnet_file_reads_are_bounded_and_regular_files_only(tmp_path: Path) -> None:
    """`--subnet-file /dev/full` read until the OOM killer came; now only regular files, 4 KiB."""
    from overlayd.subnetfile import MAX_BYTES, previous_subnet, read_bounded

    started = time.monotonic()
    assert read_bounded("/dev/full") is None and read_bounded("/dev/zero") is None
    assert previous_subnet("/dev/zero") is None
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert previous_subnet(str(fifo)) is None  # no writer: must not block
    huge = tmp_path / "huge.env"
    huge.write_bytes(b"FLANNEL_SUBNET=10.30.7.1/24\n" + b"#" * (10 * MAX_BYTES))
    assert previous_subnet(str(huge)) is None
    assert len(read_bounded(str(huge)) or b"") == MAX_BYTES + 1
    assert time.monotonic() - started < 2
    normal = tmp_path / "subnet.env"
    normal.write_text("FLANNEL_NETWORK=10.30.0.0/16\nFLANNEL_SUBNET=10.30.7.1/24\n")
    assert str(previous_subnet(str(normal))) == "10.30.7.0/24"


def test_ipmasq_is_true_in_the_subnet_file_only_when_the_daemon_masquerades(cluster: Callable[..., Host]) -> None:
    """The flannel CNI convention reads FLANNEL_IPMASQ=true as "the daemon does NAT" and turns the
    bridge plugin's own masquerade off: with --firewall none nobody would masquerade."""
    host = cluster("a", "192.0.2.1", ip_masq=True, firewall="none")
    assert read_env(str(host.subnet_file))["FLANNEL_IPMASQ"] == "false"
    assert host.daemon.masquerades is False and host.daemon.status.rules_installed
