"""The library API and the examples/library scripts, against a real etcd (Debian's binary)."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import overlayd
import pytest
from overlayd.testing.etcd import EtcdServer
from overlayd.testing.store_contract import attrs_for

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "library"
_prefixes = itertools.count()

pytestmark = pytest.mark.etcd


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def env(etcd: EtcdServer) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    prefix = f"/overlayd-library-{os.getpid()}-{next(_prefixes)}"
    return {**base, "OVERLAYD_STORE": "etcd", "OVERLAYD_ETCD_ENDPOINTS": etcd.endpoint, "OVERLAYD_ETCD_PREFIX": prefix}


@pytest.fixture
def store(env: dict[str, str]) -> Iterator[overlayd.Store]:
    store = overlayd.open_store_from_environment(environ=env)
    overlayd.write_network_config(store, overlayd.NetworkConfig.from_dict({"Network": "10.244.0.0/16"}))
    yield store
    store.close()


def example(name: str, *args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_open_store_from_environment_reads_env_and_toml(tmp_path: Path, etcd: EtcdServer) -> None:
    config = tmp_path / "overlayd.toml"
    config.write_text(f'store = "etcd"\n[etcd]\nendpoints = "{etcd.endpoint}"\nprefix = "/from-toml"\n')
    store = overlayd.open_store_from_environment(config_file=str(config), environ={})
    assert store.options.prefix == "/from-toml"
    store.close()
    store = overlayd.open_store_from_environment(config_file=str(config), environ={"OVERLAYD_ETCD_PREFIX": "/from-env"})
    assert store.options.prefix == "/from-env"
    store.close()


def test_list_leases_example(store: overlayd.Store, env: dict[str, str]) -> None:
    for i in range(1, 4):
        store.acquire_lease(overlayd.read_network_config(store), attrs_for(f"192.0.2.{i}"))  # type: ignore[arg-type]
    result = example("list_leases.py", env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("network 10.244.0.0/16")
    assert sorted(line.split()[1] for line in lines[2:]) == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]


def test_watch_example_prints_changes(store: overlayd.Store, env: dict[str, str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "watch_leases.py"), "--count", "2", "--timeout", "30"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("snapshot: 0 leases")
        config = overlayd.read_network_config(store)
        assert config is not None
        lease = store.acquire_lease(config, attrs_for("192.0.2.8"))
        store.release_lease(lease)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines() == [
        f"added {lease.subnet} 192.0.2.8 (revision {lease.revision})",
        f"removed {lease.subnet} 192.0.2.8 (revision {lease.revision + 1})",
    ]


def test_dry_run_example_and_api(store: overlayd.Store, env: dict[str, str]) -> None:
    config = overlayd.read_network_config(store)
    assert config is not None
    leases = [store.acquire_lease(config, attrs_for(f"192.0.2.{i}", mac=f"aa:bb:cc:dd:ee:0{i}")) for i in (1, 2, 3)]
    result = overlayd.dry_run(store, "192.0.2.1")
    assert result.own.subnet == leases[0].subnet
    assert {p.subnet for p in result.peers} == {leases[1].subnet, leases[2].subnet}
    assert len(result.desired) == 6  # per peer: neighbour, FDB entry, route
    assert result.plan is None
    out = example("dry_run.py", "192.0.2.1", env=env)
    assert out.returncode == 0, out.stderr
    assert f"holds {leases[0].subnet}; 2 peers" in out.stdout
    missing = example("dry_run.py", "192.0.2.99", env=env)
    assert missing.returncode == 2 and "no lease in the store has PublicIP 192.0.2.99" in missing.stderr


def test_watch_in_background_and_clean_stop(store: overlayd.Store) -> None:
    seen: list[object] = []
    stop = threading.Event()
    thread = overlayd.watch_in_background(store, seen.append, stop)
    config = overlayd.read_network_config(store)
    assert config is not None
    store.acquire_lease(config, attrs_for("192.0.2.4"))
    deadline = time.monotonic() + 10
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(seen[0], overlayd.LeaseList)
    assert isinstance(seen[1], overlayd.LeaseEvent) and seen[1].kind is overlayd.EventKind.ADDED


def test_run_in_process_returns_on_stop(tmp_path: Path) -> None:
    settings = overlayd.DaemonSettings(
        store="embedded",
        store_options={"path": str(tmp_path / "s.db")},
        backend="alloc",
        network=overlayd.NetworkConfig.from_dict({"Network": "10.7.0.0/16"}).network,
        ifaces=("lo",),
        public_ip="192.0.2.1",
        subnet_file=str(tmp_path / "subnet.env"),
    )
    stop = threading.Event()
    thread = threading.Thread(target=overlayd.run, args=(settings, stop))
    thread.start()
    deadline = time.monotonic() + 10
    while not (tmp_path / "subnet.env").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    stop.set()
    thread.join(5)
    assert not thread.is_alive() and (tmp_path / "subnet.env").exists()


def test_cli_imports_nothing_private_from_the_core() -> None:
    source = (ROOT / "core" / "cli.py").read_text()
    private = [line for line in source.splitlines() if line.startswith(("from .", "import ")) and "._" in line]
    assert private == [], private
    assert "from . import _" not in source
