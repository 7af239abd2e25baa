"""The route backend base (``overlayd.routenet.RouteNetwork``), proven with a host-gw in miniature
written here on top of it, on the real kernel in a fresh namespace; and the option machinery a
backend declares with (``option(config_key=...)``, ``apply_config_keys``, ``to_bool``, secrets).

The test backend below is the whole backend: it is what host-gw will look like.  Kernel state is
read back with ``ip -j``, not through ``overlayd.netlink``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from typing import Any

import attrs
import pytest
from overlayd.config import NetworkConfig
from overlayd.errors import ConfigError, GarbledLease
from overlayd.kernel import Route
from overlayd.model import Lease, LeaseAttrs
from overlayd.peers import valid_peers
from overlayd.plan import diff
from overlayd.plugin import Backend, HostInfo, Network, apply_config_keys, option, to_bool
from overlayd.routenet import RouteNetwork
from overlayd.testing import BackendContract, BackendEnv
from overlayd.testing.netns import in_netns, ip_json, netns, netns_factory, run, veth

__all__ = ["netns", "netns_factory"]

# -- the test backend: a host-gw in miniature, built only on the base ------------------------------------


@attrs.frozen
class TinyOptions:
    metric: int = option(0, "route metric", converter=int, config_key="Metric")


class TinyRouteNetwork(RouteNetwork):
    metric = 0

    @property
    def mtu(self) -> int:
        return self.host.iface_mtu

    @property
    def backend_data(self) -> dict[str, Any]:
        return {}

    def check_peer(self, lease: Lease) -> None:
        ip = lease.attrs.public_ip
        if ip is None or not self.on_link(ip):
            raise GarbledLease(f"lease {lease.key}: PublicIP {ip} is not on-link on {self.host.iface}")

    def route_for(self, lease: Lease, family: int) -> Route | None:
        subnet = lease.subnet_of(family)
        assert subnet is not None
        return Route(dst=subnet, gateway=lease.attrs.public_ip_of(family), dev=self.host.iface, metric=self.metric)


class TinyRouteBackend(Backend):
    """Route each peer's subnet via its PublicIP on the underlay (host-gw in miniature)."""

    name = "tiny-routes"
    Options = TinyOptions

    def prepare(self, config: NetworkConfig, host: HostInfo) -> Network:
        network = TinyRouteNetwork(host)
        network.metric = self.effective_options(config).metric
        network.refresh_connected()
        return network


# -- the backend contract against it -----------------------------------------------------------------------

UNDERLAY = "198.51.100.1/24"


def underlay_host(netns_factory: Callable[..., str], tag: str) -> tuple[str, HostInfo]:
    ns, far = netns_factory(tag), netns_factory(tag + "f")
    veth(ns, "eth0", far, "eth0", UNDERLAY, "198.51.100.254/24")
    index = ip_json(ns, "link", "show", "eth0")[0]["ifindex"]
    ip = IPv4Address("198.51.100.1")
    return ns, HostInfo("eth0", index, 1500, ip, iface_addr=ip)


@pytest.mark.root
class TestTinyRouteContract(BackendContract):
    @pytest.fixture
    def backend_env(self, netns_factory: Callable[..., str]) -> BackendEnv:
        ns, host = underlay_host(netns_factory, "r")
        return BackendEnv("tiny-routes", {}, host, lambda: in_netns(ns))

    @pytest.fixture
    def backend(self, backend_env: BackendEnv) -> Backend:
        return TinyRouteBackend(TinyOptions(**backend_env.options))


# -- functional -------------------------------------------------------------------------------------------

CONFIG = NetworkConfig.from_dict({"Network": "10.55.0.0/16", "Backend": {"Type": "tiny-routes"}})


def peer(third: int, public_ip: str | None) -> Lease:
    ip = IPv4Address(public_ip) if public_ip else None
    return Lease(IPv4Network(f"10.55.{third}.0/24"), LeaseAttrs(ip, "tiny-routes", {}), None)


OWN = peer(1, "198.51.100.1")


@pytest.fixture
def routed(netns_factory: Callable[..., str]) -> Iterator[tuple[str, TinyRouteNetwork]]:
    ns, host = underlay_host(netns_factory, "t")
    with in_netns(ns):
        net = TinyRouteBackend(TinyOptions()).prepare(CONFIG, host)
        assert isinstance(net, TinyRouteNetwork)
        net.activate(OWN)
    yield ns, net


def reconcile(ns: str, net: TinyRouteNetwork, leases: list[Lease]) -> tuple[int, list[str]]:
    reports: list[str] = []
    with in_netns(ns):
        peers = valid_peers(CONFIG, net, OWN, leases, lambda key, rev, why: reports.append(f"{key}: {why}"))
        plan = diff(net.desired_state(OWN, peers), net.actual_state())
        net.apply(plan)
    return len(plan), reports


def kernel_routes(ns: str) -> dict[str, tuple[str | None, str, str]]:
    return {r["dst"]: (r.get("gateway"), r["dev"], r.get("protocol", "")) for r in ip_json(ns, "route", "show")}


@pytest.mark.root
def test_routes_follow_the_leases_and_drift_is_repaired(routed: tuple[str, TinyRouteNetwork]) -> None:
    ns, net = routed
    b, c = peer(2, "198.51.100.2"), peer(3, "198.51.100.3")
    stale_own = peer(9, "198.51.100.1")
    far = peer(4, "203.0.113.4")  # not on the segment: a host-gw cannot reach it
    count, reports = reconcile(ns, net, [OWN, b, c, stale_own, far])
    assert count == 2
    routes = kernel_routes(ns)
    assert routes["10.55.2.0/24"] == ("198.51.100.2", "eth0", "79")
    assert routes["10.55.3.0/24"] == ("198.51.100.3", "eth0", "79")
    assert "10.55.9.0/24" not in routes and "10.55.4.0/24" not in routes and "10.55.1.0/24" not in routes
    assert sorted(r.split(":")[0] for r in reports) == [far.key, stale_own.key]
    assert "not on-link on eth0" in " ".join(reports) and "stale lease of this host" in " ".join(reports)
    assert reconcile(ns, net, [OWN, b, c])[0] == 0
    # drift: one route deleted, one changed by hand; a foreign route is left alone
    run(ns, "ip", "route", "del", "10.55.2.0/24")
    run(ns, "ip", "route", "replace", "10.55.3.0/24", "via", "198.51.100.254", "proto", "79")
    run(ns, "ip", "route", "add", "10.99.0.0/24", "via", "198.51.100.254")
    assert reconcile(ns, net, [OWN, b, c])[0] == 3  # two routes replaced, the changed one also in remove
    assert kernel_routes(ns)["10.55.2.0/24"][0] == "198.51.100.2"
    assert kernel_routes(ns)["10.55.3.0/24"][0] == "198.51.100.3"
    # a departed peer is unrouted; teardown removes ours and nothing else
    reconcile(ns, net, [OWN, c])
    assert "10.55.2.0/24" not in kernel_routes(ns)
    with in_netns(ns):
        net.teardown()
    routes = kernel_routes(ns)
    assert "10.55.3.0/24" not in routes and "10.99.0.0/24" in routes


@pytest.mark.root
def test_config_key_reaches_the_kernel(netns_factory: Callable[..., str], caplog: pytest.LogCaptureFixture) -> None:
    ns, host = underlay_host(netns_factory, "m")
    config = NetworkConfig.from_dict({"Network": "10.55.0.0/16", "Backend": {"Type": "tiny-routes", "metric": 7}})
    with caplog.at_level(logging.WARNING), in_netns(ns):
        net = TinyRouteBackend(TinyOptions(metric=3)).prepare(config, host)
        assert isinstance(net, TinyRouteNetwork)
        net.apply(diff(net.desired_state(OWN, [peer(2, "198.51.100.2")]), net.actual_state()))
    assert "tiny-routes: the network config's Backend sets Metric=7; ignoring --tiny-routes-metric 3" in caplog.text
    [route] = [r for r in ip_json(ns, "route", "show") if r["dst"] == "10.55.2.0/24"]
    assert route["metric"] == 7


# -- options: config keys, converters, secrets (pure) -------------------------------------------------------


@attrs.frozen
class Knobs:
    port: int = option(8472, "a port", converter=int, config_key="Port")
    fast: bool = option(False, "a switch", converter=to_bool, config_key="Fast")
    name: str = option("x", "a name", config_key="Name")
    local: int = option(1, "not a config key", converter=int)
    token: str = option("", "a secret", secret=True)


def test_config_keys_beat_options_case_insensitively(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        got = apply_config_keys(Knobs(port=4789, local=5), {"Type": "t", "PORT": 9000, "fast": True, "Local": 2}, "t")
    assert (got.port, got.fast, got.name, got.local) == (9000, True, "x", 5)
    assert "the network config's Backend sets Port=9000; ignoring --t-port 4789" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert apply_config_keys(Knobs(), {"Port": 9000}, "t").port == 9000
        assert apply_config_keys(Knobs(port=9000), {"Port": 9000}, "t").port == 9000
    assert caplog.text == ""  # an option left at its default, or agreeing, is no news
    assert apply_config_keys(Knobs(), {}, "t") == Knobs()


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ({"Port": "8472"}, "Backend Port must be a whole number, not '8472'"),
        ({"Port": True}, "Backend Port must be a whole number"),
        ({"fast": "yes"}, "Backend Fast must be true or false, not 'yes'"),
        ({"name": 3}, "Backend Name must be a string, not 3"),
    ],
)
def test_config_key_of_the_wrong_json_type_is_a_config_error(backend: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_config_keys(Knobs(), backend, "t")


def test_to_bool_and_secret_options() -> None:
    assert [to_bool(v) for v in ("Yes", "on", "1", True, "false", "OFF", "0", "", False)] == [True] * 4 + [False] * 5
    with pytest.raises(ValueError, match="not true or false"):
        to_bool("maybe")
    assert "hunter2" not in repr(Knobs(token="hunter2"))
    assert attrs.fields(Knobs).token.metadata["secret"] is True
