"""flannel's network config rules."""

from __future__ import annotations

import json
import logging
from ipaddress import IPv4Address, IPv4Network, IPv6Network

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from overlayd.config import NetworkConfig
from overlayd.errors import ConfigError


def parse(doc: dict[str, object]) -> NetworkConfig:
    return NetworkConfig.from_json(json.dumps(doc))


def test_defaults_for_a_16() -> None:
    config = parse({"Network": "10.244.0.0/16"})
    assert config.subnet_len == 24
    assert config.subnet_min == IPv4Address("10.244.1.0")
    assert config.subnet_max == IPv4Address("10.244.255.0")
    assert config.backend_type == "vxlan"  # not flannel's udp
    assert config.subnet_count() == 255


@pytest.mark.parametrize(("network", "subnet_len"), [("10.0.0.0/22", 24), ("10.0.0.0/23", 25), ("10.0.0.0/28", 30)])
def test_small_networks_default_to_prefix_plus_two(network: str, subnet_len: int) -> None:
    assert parse({"Network": network}).subnet_len == subnet_len


def test_keys_match_case_insensitively_and_unknown_keys_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        config = parse({"network": "10.1.0.0/16", "subnetlen": 26, "backend": {"type": "host-gw"}, "Extra": 1})
    assert config.network == IPv4Network("10.1.0.0/16")
    assert config.subnet_len == 26 and config.backend_type == "host-gw"
    assert "Extra" in caplog.text


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({}, '"Network" is required'),
        ({"Network": "10.0.0.0/29"}, "too small"),
        ({"Network": "banana"}, "not a CIDR"),
        ({"Network": "fd00::/64"}, "must be an IPv4 CIDR"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 31}, "too long"),
        ({"Network": "10.0.0.0/16", "SubnetLen": 17}, "fewer than four subnets"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "10.1.0.0"}, "outside"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "10.0.1.5"}, "boundary"),
        ({"Network": "10.0.0.0/16", "SubnetMin": "10.0.9.0", "SubnetMax": "10.0.3.0"}, "above"),
        ({"Network": "10.0.0.0/16", "SubnetLen": "24"}, "whole number"),
        ({"Network": "10.0.0.0/16", "EnableIPv4": "yes"}, "true or false"),
        ({"Network": "10.0.0.0/16", "Backend": "vxlan"}, "must be an object"),
        ({"EnableIPv4": False}, "both false"),
        ({"EnableIPv6": True, "Network": "10.0.0.0/16"}, "IPv6Network"),
    ],
)
def test_invalid_configs_name_the_problem(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse(doc)


def test_not_json_and_not_an_object() -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        NetworkConfig.from_json("{")
    with pytest.raises(ConfigError, match="JSON object"):
        NetworkConfig.from_json("[1]")


def test_ipv6_defaults() -> None:
    config = parse({"Network": "10.0.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00:10::/48"})
    assert config.ipv6_subnet_len == 64
    assert config.contains_ipv6_subnet(IPv6Network("fd00:10:0:1::/64"))
    assert not config.contains_ipv6_subnet(IPv6Network("fd00:10::/64"))  # the first subnet is not leasable


def test_round_trip_through_flannel_json() -> None:
    config = parse({"Network": "10.5.0.0/16", "SubnetLen": 26, "Backend": {"Type": "vxlan", "VNI": 4}})
    again = NetworkConfig.from_json(config.to_json())
    assert again == config
    assert json.loads(config.to_json())["Backend"] == {"Type": "vxlan", "VNI": 4}


def test_contains_subnet() -> None:
    config = parse({"Network": "10.244.0.0/16"})
    assert config.contains_subnet(IPv4Network("10.244.3.0/24"))
    assert not config.contains_subnet(IPv4Network("10.244.0.0/24"))  # below SubnetMin
    assert not config.contains_subnet(IPv4Network("10.245.3.0/24"))
    assert not config.contains_subnet(IPv4Network("10.244.3.0/25"))


# -- bounded decoding (issue 10, item 1) --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"Network": "10.0.0.0/16", "Backend": ' + "[" * 1100 + "]" * 1100 + "}", "nested more than 32 levels"),
        ("[" * 1100 + "]" * 1100, "nested more than 32 levels"),
        ('{"Network": "10.0.0.0/16", "x": "' + "a" * 2_000_000 + '"}', "more than the 1048576 allowed"),
        (b'{"Network": "10.0.0.0/16\xff"}', "not UTF-8"),
    ],
)
def test_unusable_config_is_one_config_error(text: str | bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        NetworkConfig.from_json(text)
    assert "\n" not in str(info.value)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=30,
)
_config_like = st.dictionaries(
    st.sampled_from(["Network", "SubnetLen", "SubnetMin", "SubnetMax", "EnableIPv6", "IPv6Network", "Backend", "x"]),
    _json | st.sampled_from(["10.244.0.0/16", "10.244.1.0", "fd00::/56", 24, True]),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=200), _json.map(json.dumps), _config_like.map(json.dumps)))
def test_config_parses_or_is_one_config_error(raw: str | bytes) -> None:
    try:
        config = NetworkConfig.from_json(raw)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert NetworkConfig.from_json(config.to_json()) == config
