"""Choosing the underlay interface (--iface, --iface-regex, --iface-can-reach, default route),
in a fresh network namespace with two veth links and a default route."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

import pytest
from overlayd.errors import UserError
from overlayd.hostiface import select_host
from overlayd.testing.netns import in_netns, netns, netns_factory, run, veth

__all__ = ["netns", "netns_factory"]

pytestmark = pytest.mark.root


@pytest.fixture
def host(netns_factory: Callable[..., str]) -> str:
    """eth0 192.0.2.1/24 (default route via .254) and eth1 198.51.100.1/24."""
    ns, far = netns_factory("h"), netns_factory("f")
    veth(ns, "eth0", far, "e0", "192.0.2.1/24", "192.0.2.254/24")
    veth(ns, "eth1", far, "e1", "198.51.100.1/24", "198.51.100.254/24", mtu=1400)
    run(ns, "ip", "route", "add", "default", "via", "192.0.2.254")
    return ns


def choose(ns: str, **kwargs: object) -> tuple[str, IPv4Address | None, int]:
    with in_netns(ns):
        info = select_host(**kwargs)  # type: ignore[arg-type]
    return info.iface, info.public_ip, info.iface_mtu


def test_default_route_interface(host: str) -> None:
    assert choose(host) == ("eth0", IPv4Address("192.0.2.1"), 1500)


def test_iface_by_name_or_ip_first_match_wins(host: str) -> None:
    assert choose(host, ifaces=("eth1",)) == ("eth1", IPv4Address("198.51.100.1"), 1400)
    assert choose(host, ifaces=("nope", "198.51.100.1", "eth0"))[0] == "eth1"
    with pytest.raises(UserError, match="none of --iface nope exists"):
        choose(host, ifaces=("nope",))


def test_iface_regex_matches_names_and_addresses(host: str) -> None:
    assert choose(host, regexes=("eth1",))[0] == "eth1"
    assert choose(host, regexes=(r"198\.51\..*",))[0] == "eth1"
    with pytest.raises(UserError, match="no interface matches"):
        choose(host, regexes=("wlan.*",))
    with pytest.raises(UserError, match="not a valid regular expression"):
        choose(host, regexes=("(",))


def test_iface_can_reach(host: str) -> None:
    assert choose(host, can_reach="198.51.100.77")[0] == "eth1"
    assert choose(host, can_reach="203.0.113.9")[0] == "eth0"  # via the default route
    with pytest.raises(UserError, match="is not an IP address"):
        choose(host, can_reach="far.away")


def test_public_ip_overrides_the_advertised_address(host: str) -> None:
    assert choose(host, ifaces=("eth0",), public_ip="203.0.113.50")[1] == IPv4Address("203.0.113.50")
    with pytest.raises(UserError, match="--public-ip"):
        choose(host, public_ip="not-an-ip")
    for impossible in ("0.0.0.0", "127.0.0.1", "255.255.255.255", "224.0.0.9"):
        with pytest.raises(UserError, match=f"--public-ip {impossible} is .*; peers could not reach"):
            choose(host, public_ip=impossible)


def test_no_default_route_is_a_clear_error(netns: str) -> None:
    with pytest.raises(UserError, match="no interface with a default route; pass --iface"):
        choose(netns)


# -- IPv6 ------------------------------------------------------------------------------------


def test_the_interfaces_global_ipv6_address_is_picked(host: str) -> None:
    run(host, "ip", "-6", "addr", "add", "2001:db8:1::1/64", "dev", "eth1", "nodad")
    with in_netns(host):
        info = select_host(ifaces=("eth1",))
        assert (info.public_ip, info.public_ipv6) == (IPv4Address("198.51.100.1"), IPv6Address("2001:db8:1::1"))
        # eth0 has only its link-local fe80:: address: no public IPv6 (the daemon asks for --public-ipv6)
        assert select_host(ifaces=("eth0",)).public_ipv6 is None
        assert select_host(ifaces=("eth0",), public_ipv6="2001:db8:9::9").public_ipv6 == IPv6Address("2001:db8:9::9")
        assert select_host(ifaces=("2001:db8:1::1",)).iface == "eth1"  # --iface takes an IPv6 address too
        assert select_host(regexes=(r"2001:db8:1::.*",)).iface == "eth1"


def test_an_ipv6_only_interface_is_usable(netns_factory: Callable[..., str]) -> None:
    ns, far = netns_factory("h6"), netns_factory("f6")
    veth(ns, "eth0", far, "e0", "2001:db8:2::1/64", "2001:db8:2::fe/64")
    with in_netns(ns):
        info = select_host(ifaces=("eth0",))
    assert (info.public_ip, info.public_ipv6) == (None, IPv6Address("2001:db8:2::1"))
