"""Property tests of the parsers of outside data that the CLI owns: CIDR and IP flag values and
the subnet file's contents.  Whatever comes in, the answer is a typed value or a one-line
user error, never another exception.  A fixed, small budget keeps them cheap in CI."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

import click
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from overlayd import cli
from overlayd.subnetfile import MAX_BYTES, SubnetFile, parse_env, parse_subnet, read_env

BUDGET = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Text that looks like addresses some of the time: digits, dots, slashes, colons, junk.
address_like = st.one_of(
    st.text(alphabet="0123456789./:abcdefx -\x00\u0660\uff10", max_size=40),
    st.builds(lambda a, b: f"{a}/{b}", st.ip_addresses(v=4).map(str), st.integers(-5, 40)),
    st.ip_addresses().map(str),
    st.text(max_size=40),
)

CTX = click.Context(click.Command("x"))
PARAM = click.Option(["--x"])


def _one_line_or_value(parse: object, value: str, kind: type | tuple[type, ...]) -> None:
    try:
        got = parse(CTX, PARAM, value)  # type: ignore[operator]
    except click.BadParameter as exc:
        assert "\n" not in exc.format_message()
        return
    assert isinstance(got, kind)


@BUDGET
@given(address_like)
def test_cidr_flag(value: str) -> None:
    _one_line_or_value(cli._cidr, value, IPv4Network)


@BUDGET
@given(address_like)
def test_subnet_argument(value: str) -> None:
    _one_line_or_value(cli._subnet_arg, value, (IPv4Network, IPv6Network))


@BUDGET
@given(address_like)
def test_ip_argument(value: str) -> None:
    _one_line_or_value(cli._ip_arg, value, (IPv4Address, IPv6Address))


@BUDGET
@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
def test_subnet_file_contents_never_raise(data: bytes) -> None:
    env = parse_env(data)
    assert all(isinstance(k, str) and isinstance(v, str) and k for k, v in env.items())
    subnet = parse_subnet(env.get("FLANNEL_SUBNET"))
    assert subnet is None or isinstance(subnet, IPv4Network)


@BUDGET
@given(
    st.ip_addresses(v=4).map(lambda a: IPv4Network(f"{a}/24", strict=False)),
    st.integers(68, 65535),
    st.booleans(),
)
def test_subnet_file_round_trip(subnet: IPv4Network, mtu: int, masq: bool) -> None:
    text = SubnetFile(network=subnet.supernet(8), subnet=subnet, mtu=mtu, ip_masq=masq).render()
    env = parse_env(text.encode())
    assert parse_subnet(env["FLANNEL_SUBNET"]) == subnet and env["FLANNEL_MTU"] == str(mtu)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "subnet.env"


@settings(BUDGET, max_examples=100)
@given(data=st.binary(max_size=3 * MAX_BYTES))
def test_subnet_file_on_disk_is_read_bounded(scratch: Path, data: bytes) -> None:
    scratch.write_bytes(data)
    env = read_env(str(scratch))
    if len(data) > MAX_BYTES:
        assert env == {}
