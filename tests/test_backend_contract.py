"""The backend contract against every backend installed here: alloc, vxlan, host-gw and udp (in a fresh
network namespace on the real kernel) and the example third-party routes-file backend."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from overlayd.plugin import HostInfo
from overlayd.testing import BackendContract, BackendEnv
from overlayd.testing.netns import in_netns, ip_json, netns, netns_factory, veth

__all__ = ["netns", "netns_factory"]

LOOPBACK_HOST = HostInfo("lo", 1, 65536, IPv4Address("192.0.2.1"))


class TestAllocContract(BackendContract):
    @pytest.fixture
    def backend_env(self) -> BackendEnv:
        return BackendEnv("alloc", {}, LOOPBACK_HOST, contextlib.nullcontext)


class TestRoutesFileContract(BackendContract):
    @pytest.fixture
    def backend_env(self, tmp_path: Path) -> BackendEnv:
        return BackendEnv("routes-file", {"path": str(tmp_path / "routes.json")}, LOOPBACK_HOST, contextlib.nullcontext)


@pytest.mark.root
class TestVxlanContract(BackendContract):
    @pytest.fixture
    def backend_env(self, netns_factory: Callable[..., str]) -> BackendEnv:
        ns, far = netns_factory("c"), netns_factory("cf")
        veth(ns, "eth0", far, "eth0", "192.0.2.1/24", "192.0.2.2/24")
        index = ip_json(ns, "link", "show", "eth0")[0]["ifindex"]
        host = HostInfo("eth0", index, 1500, IPv4Address("192.0.2.1"), iface_addr=IPv4Address("192.0.2.1"))
        return BackendEnv("vxlan", {}, host, lambda: in_netns(ns))


@pytest.mark.root
class TestHostGwContract(BackendContract):
    @pytest.fixture
    def backend_env(self, netns_factory: Callable[..., str]) -> BackendEnv:
        ns, far = netns_factory("g"), netns_factory("gf")
        veth(ns, "eth0", far, "eth0", "192.0.2.1/24", "192.0.2.2/24")
        index = ip_json(ns, "link", "show", "eth0")[0]["ifindex"]
        host = HostInfo("eth0", index, 1500, IPv4Address("192.0.2.1"), iface_addr=IPv4Address("192.0.2.1"))
        return BackendEnv("host-gw", {}, host, lambda: in_netns(ns))


@pytest.mark.root
class TestUdpContract(BackendContract):
    @pytest.fixture
    def backend_env(self, netns_factory: Callable[..., str]) -> BackendEnv:
        ns, far = netns_factory("u"), netns_factory("uf")
        veth(ns, "eth0", far, "eth0", "192.0.2.1/24", "192.0.2.2/24")
        index = ip_json(ns, "link", "show", "eth0")[0]["ifindex"]
        host = HostInfo("eth0", index, 1500, IPv4Address("192.0.2.1"), iface_addr=IPv4Address("192.0.2.1"))
        return BackendEnv("udp", {}, host, lambda: in_netns(ns))
