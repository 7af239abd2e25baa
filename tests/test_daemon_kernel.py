"""The daemon as a process in a network namespace, with the vxlan backend: start-up failures
leave no kernel state behind, and --release-on-exit removes everything overlayd made."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from overlayd import open_store
from overlayd.testing.netns import ip_json, netns, netns_factory, veth

__all__ = ["netns", "netns_factory"]

pytestmark = pytest.mark.root
OVERLAYD = str(Path(sys.executable).with_name("overlayd"))


@pytest.fixture
def host(netns_factory: Callable[..., str]) -> str:
    ns, far = netns_factory("d"), netns_factory("u")
    veth(ns, "eth0", far, "eth0", "192.0.2.1/24", "192.0.2.2/24")
    return ns


def overlayd(ns: str, tmp: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    argv = ["ip", "netns", "exec", ns, OVERLAYD, "--embedded-path", str(tmp / "s.db"), "--iface", "eth0",
            "--subnet-file", str(tmp / "subnet.env"), *args]  # fmt: skip
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def links(ns: str) -> set[str]:
    return {link["ifname"] for link in ip_json(ns, "link", "show")}


def test_failed_start_leaves_no_kernel_state(host: str, tmp_path: Path) -> None:
    from ipaddress import IPv4Address, IPv4Network

    store = open_store("embedded", path=str(tmp_path / "s.db"))
    store.put_config('{"Network": "10.77.0.0/28", "Backend": {"Type": "vxlan"}}')
    for i, subnet in enumerate(("10.77.0.4/30", "10.77.0.8/30", "10.77.0.12/30")):
        store.reserve(IPv4Network(subnet), IPv4Address(f"198.51.100.{i + 1}"))
    store.close()
    proc = overlayd(host, tmp_path, "run")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "overlayd: network 10.77.0.0/28 is exhausted: all 3 /30 subnets" in err
    assert "Traceback" not in err
    assert "flannel.1" not in links(host)
    assert not (tmp_path / "subnet.env").exists()


def test_release_on_exit_removes_lease_device_and_routes(host: str, tmp_path: Path) -> None:
    store = open_store("embedded", path=str(tmp_path / "s.db"))
    proc = overlayd(host, tmp_path, "--network", "10.78.0.0/16", "--release-on-exit", "run")
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "subnet.env").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "flannel.1" in links(host)
        assert len(store.list_leases().leases) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "flannel.1" not in links(host)
    assert store.list_leases().leases == ()
    assert not (tmp_path / "subnet.env").exists()
    store.close()


def test_unknown_backend_in_the_stored_config_is_a_user_error(host: str, tmp_path: Path) -> None:
    store = open_store("embedded", path=str(tmp_path / "s.db"))
    store.put_config('{"Network": "10.79.0.0/16", "Backend": {"Type": "warp-drive"}}')
    store.close()
    proc = overlayd(host, tmp_path, "run")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    [line] = err.strip().splitlines()
    assert line.startswith("overlayd: error: unknown backend 'warp-drive'; installed backends: alloc, ")
    assert links(host) == {"lo", "eth0"}


def test_vxlan_options_apply_when_the_backend_type_comes_from_the_stored_config(host: str, tmp_path: Path) -> None:
    """`network init --backend vxlan` once, then plain `overlayd --vxlan-port X`: the port used to
    be dropped (only --backend made the daemon read backend options).  Read back from the kernel."""
    store = open_store("embedded", path=str(tmp_path / "s.db"))
    store.put_config('{"Network": "10.80.0.0/16", "Backend": {"Type": "vxlan"}}')
    store.close()
    proc = overlayd(host, tmp_path, "--vxlan-port", "4799", "--vxlan-vni", "7", "run")
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "subnet.env").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.05)
        [link] = ip_json(host, "-d", "link", "show", "flannel.7")
        vxlan = link["linkinfo"]["info_data"]
        assert vxlan["id"] == 7 and vxlan["port"] == 4799
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
