"""Peer validation (``overlayd.peers``): impossible PublicIPs and copied VtepMACs are never
programmed (issue 10, items 3 and 4), as regression cases and as Hypothesis properties over the
whole class.  Pure: the vxlan network here is a planning-only one; the kernel-side proof (the FDB
entry of host 1 survives a copycat lease) is in tests/test_backend_vxlan.py."""

from __future__ import annotations

import json
import random
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from overlayd.backends.vxlan import DeviceSpec, Vtep, VxlanNetwork, VxlanSettings
from overlayd.config import NetworkConfig
from overlayd.errors import GarbledLease
from overlayd.kernel import FdbEntry, MacAddress, Neighbour, Route
from overlayd.model import Lease, LeaseAttrs
from overlayd.peers import public_ip_problem, resolve_claims, valid_peers
from overlayd.plugin import HostInfo

CONFIG = NetworkConfig.from_dict({"Network": "10.44.0.0/16"})
OWN_MAC = "0a:00:00:00:00:0a"
MAC_1 = "0a:00:00:00:00:01"


def vxlan(direct_routing: bool = False) -> VxlanNetwork:
    settings = VxlanSettings(vni=1, port=8472, mtu=0, gbp=False, direct_routing=direct_routing)
    host = HostInfo("eth0", 2, 1500, IPv4Address("192.0.2.1"), iface_addr=IPv4Address("192.0.2.1"))
    spec = DeviceSpec("flannel.1", 1, IPv4Address("192.0.2.1"), 2, 8472, False, 1450)
    vtep = Vtep(spec, MacAddress.parse(OWN_MAC))
    return VxlanNetwork(settings, host, [vtep], frozenset({IPv4Network("192.0.2.0/24")}), offline=True)


def lease(subnet: str, public_ip: Any, mac: str = MAC_1, created: int = 0, revision: int = 0) -> Lease:
    ip = public_ip if not isinstance(public_ip, str) else IPv4Address(public_ip)
    attrs_ = LeaseAttrs(ip, "vxlan", {"VNI": 1, "VtepMAC": mac})
    return Lease(IPv4Network(subnet), attrs_, None, revision=revision, created_revision=created)


OWN = lease("10.44.1.0/24", "192.0.2.1", OWN_MAC, created=1)


class Reports:
    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str]] = []

    def __call__(self, key: str, revision: int, reason: str) -> None:
        self.seen.append((key, revision, reason))

    def keys(self) -> list[str]:
        return [key for key, _, _ in self.seen]


def remotes(desired: frozenset[Any]) -> set[Any]:
    """Every underlay address the kernel objects would send traffic to."""
    out: set[Any] = set()
    for obj in desired:
        if isinstance(obj, FdbEntry):
            out.add(obj.dst)
        elif isinstance(obj, Route) and obj.dev == "eth0":
            out.add(obj.gateway)
    return out


# -- item 3: impossible peers -----------------------------------------------------------------------


IMPOSSIBLE = ["0.0.0.0", "127.0.0.1", "127.9.9.9", "255.255.255.255", "224.0.0.1", "239.1.2.3", "240.0.0.1",
              "10.44.7.7", "10.44.0.0"]  # fmt: skip


@pytest.mark.parametrize("ip", IMPOSSIBLE)
def test_impossible_public_ip_is_skipped_and_reported(ip: str) -> None:
    good = lease("10.44.2.0/24", "198.51.100.2", "0a:00:00:00:00:02")
    bad = lease("10.44.3.0/24", ip, "0a:00:00:00:00:03", revision=7)
    reports = Reports()
    net = vxlan(direct_routing=True)
    peers = valid_peers(CONFIG, net, OWN, [good, bad], reports)
    assert peers == [good]
    [(key, revision, reason)] = reports.seen
    assert (key, revision) == (bad.key, 7) and f"PublicIP {ip} is" in reason
    assert IPv4Address(ip) not in remotes(net.desired_state(OWN, peers))


def test_public_ip_problem_names_the_class() -> None:
    assert public_ip_problem(IPv4Address("0.0.0.0")) == "is the unspecified address, which names no host"
    assert "loopback" in (public_ip_problem(IPv4Address("127.0.0.1")) or "")
    assert "broadcast" in (public_ip_problem(IPv4Address("255.255.255.255")) or "")
    assert "multicast" in (public_ip_problem(IPv4Address("224.0.0.5")) or "")
    assert "inside the overlay network 10.44.0.0/16" in (
        public_ip_problem(IPv4Address("10.44.9.1"), CONFIG.network) or ""
    )
    assert "link-local" in (public_ip_problem(IPv6Address("fe80::1")) or "")
    assert public_ip_problem(3232235777) == "is not an IP address"
    for fine in ("198.51.100.7", "192.0.2.9", "10.0.0.1", "169.254.3.4", "100.64.0.1"):
        assert public_ip_problem(IPv4Address(fine), CONFIG.network) is None, fine
    assert public_ip_problem(IPv6Address("2001:db8::7")) is None


def test_public_ip_that_is_a_json_integer_is_garbled() -> None:
    value = {"PublicIP": 3232235777, "BackendType": "vxlan", "BackendData": {"VtepMAC": MAC_1}}
    with pytest.raises(GarbledLease, match="PublicIP 3232235777 is not an IP address"):
        LeaseAttrs.from_json(json.dumps(value))
    with pytest.raises(GarbledLease, match="PublicIPv6 1 is not an IP address"):
        LeaseAttrs.from_json(json.dumps({**value, "PublicIP": "198.51.100.1", "PublicIPv6": 1}))


def test_bad_public_ipv6_is_skipped() -> None:
    base = lease("10.44.3.0/24", "198.51.100.3")
    bad = attrs.evolve(base, attrs=attrs.evolve(base.attrs, public_ipv6=IPv6Address("::1")))
    reports = Reports()
    assert valid_peers(CONFIG, vxlan(), OWN, [bad], reports) == []
    assert "PublicIPv6 ::1 is a loopback" in reports.seen[0][2]


def test_stale_lease_of_this_host_is_skipped_and_reported() -> None:
    stale = lease("10.44.8.0/24", "192.0.2.1", "0a:00:00:00:00:08")
    behind_nat = lease("10.44.9.0/24", "203.0.113.50", "0a:00:00:00:00:09")
    reports = Reports()
    own_nat = attrs.evolve(OWN, attrs=attrs.evolve(OWN.attrs, public_ip=IPv4Address("198.51.100.1")))
    peers = valid_peers(CONFIG, vxlan(), own_nat, [stale, behind_nat], reports, [IPv4Address("192.0.2.1")])
    assert peers == [behind_nat]
    assert reports.keys() == [stale.key] and "stale lease of this host" in reports.seen[0][2]


# Addresses drawn mostly from the interesting ranges, then from anywhere.
SPECIAL = [
    IPv4Network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4", "10.44.0.0/16", "169.254.0.0/16",
              "255.255.255.0/24", "198.51.100.0/24", "203.0.113.0/24")
]  # fmt: skip
addresses = st.one_of(
    st.builds(lambda net, i: net[i % net.num_addresses], st.sampled_from(SPECIAL), st.integers(0, 1 << 24)),
    st.integers(0, (1 << 32) - 1).map(IPv4Address),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(addresses, min_size=1, max_size=12))
def test_property_no_kernel_object_ever_sends_to_an_impossible_address(ips: list[IPv4Address]) -> None:
    leases = [lease(f"10.44.{i + 2}.0/24", ip, f"0a:00:00:00:01:{i:02x}") for i, ip in enumerate(ips)]
    reports = Reports()
    for net in (vxlan(), vxlan(direct_routing=True)):
        peers = valid_peers(CONFIG, net, OWN, leases, reports)
        for remote in remotes(net.desired_state(OWN, peers)):
            assert public_ip_problem(remote, CONFIG.network) is None, remote
        # every lease is either a peer or reported, never silently dropped
        assert {p.key for p in peers} | set(reports.keys()) == {x.key for x in leases}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(json_values | st.sampled_from(["0.0.0.0", "127.0.0.1", "255.255.255.255", "224.1.1.1", "10.44.0.1", "1e3"]))
def test_property_any_json_public_ip_is_garbled_or_a_programmable_peer(raw: Any) -> None:
    value = json.dumps({"PublicIP": raw, "BackendType": "vxlan", "BackendData": {"VNI": 1, "VtepMAC": MAC_1}})
    try:
        parsed = LeaseAttrs.from_json(value)
    except GarbledLease:
        return
    assert raw is None or raw == "" or isinstance(raw, str)
    candidate = Lease(IPv4Network("10.44.2.0/24"), parsed, None)
    peers = valid_peers(CONFIG, vxlan(), OWN, [candidate], Reports())
    assert all(public_ip_problem(p.attrs.public_ip, CONFIG.network) is None for p in peers)


# -- item 4: duplicate VtepMACs ---------------------------------------------------------------------


def test_copycat_vtep_mac_is_skipped_and_the_older_lease_keeps_it() -> None:
    host1 = lease("10.44.2.0/24", "192.0.2.2", MAC_1, created=5)
    copycat = lease("10.44.10.0/24", "198.51.100.9", MAC_1, created=9, revision=9)  # sorts before by key
    reports = Reports()
    net = vxlan()
    peers = valid_peers(CONFIG, net, OWN, [copycat, host1], reports)
    assert peers == [host1]
    [(key, revision, reason)] = reports.seen
    assert (key, revision) == (copycat.key, 9)
    assert f"VtepMAC {MAC_1} is already claimed by the older lease {host1.key}" in reason
    assert [o for o in net.desired_state(OWN, peers) if isinstance(o, FdbEntry)] == [
        FdbEntry(MAC_1, IPv4Address("192.0.2.2"), "flannel.1")
    ]


def test_equal_age_is_broken_by_key_deterministically() -> None:
    a = lease("10.44.2.0/24", "192.0.2.2", MAC_1)
    b = lease("10.44.10.0/24", "198.51.100.9", MAC_1)
    assert valid_peers(CONFIG, vxlan(), OWN, [a, b], Reports()) == [b]  # "10.44.10.0-24" < "10.44.2.0-24"
    assert valid_peers(CONFIG, vxlan(), OWN, [b, a], Reports()) == [b]


def test_a_lease_with_this_hosts_mac_is_never_programmed() -> None:
    thief = lease("10.44.3.0/24", "198.51.100.3", OWN_MAC.upper(), created=0)  # older than us, other case
    reports = Reports()
    net = vxlan()
    assert valid_peers(CONFIG, net, OWN, [thief], reports) == []
    assert "is this host's own" in reports.seen[0][2]
    # even when handed to the backend directly, no entry points our own MAC elsewhere
    assert not any(
        isinstance(o, FdbEntry | Neighbour) and o.lladdr == MacAddress.parse(OWN_MAC)
        for o in net.desired_state(OWN, [thief])
    )


def test_restart_with_another_public_ip_keeps_the_older_lease_until_it_expires() -> None:
    old = lease("10.44.2.0/24", "192.0.2.2", MAC_1, created=3)
    new = lease("10.44.4.0/24", "192.0.2.22", MAC_1, created=40)
    reports = Reports()
    assert valid_peers(CONFIG, vxlan(), OWN, [new, old], reports) == [old]
    assert reports.keys() == [new.key]
    assert valid_peers(CONFIG, vxlan(), OWN, [new], Reports()) == [new]  # once the old one is gone


macs = st.sampled_from([OWN_MAC, MAC_1, "0a:00:00:00:00:02", "0A:00:00:00:00:02", "0a:00:00:00:00:03"])
peer_leases = st.lists(
    st.tuples(st.integers(2, 200), st.integers(0, 5), macs, st.integers(1, 250)),
    max_size=12,
    unique_by=lambda t: t[0],
).map(lambda rows: [lease(f"10.44.{s}.0/24", f"198.51.100.{ip}", mac, created=c) for s, c, mac, ip in rows])


@settings(max_examples=300, deadline=None)
@given(peer_leases, st.randoms(use_true_random=False))
def test_property_each_vtep_mac_has_one_owner_chosen_by_age(leases: list[Lease], rng: random.Random) -> None:
    net = vxlan()
    reports = Reports()
    peers = valid_peers(CONFIG, net, OWN, leases, reports)
    own_mac = MacAddress.parse(OWN_MAC)
    owners = [MacAddress.parse(p.attrs.backend_data["VtepMAC"]) for p in peers]
    assert len(owners) == len(set(owners)) and own_mac not in owners
    for p in peers:  # the winner is the oldest lease with that MAC
        rivals = [x for x in leases if MacAddress.parse(x.attrs.backend_data["VtepMAC"]) == owners[peers.index(p)]]
        assert min(rivals, key=lambda x: (x.created_revision, x.key)) == p
    assert sorted(reports.keys()) == sorted({x.key for x in leases} - {p.key for p in peers})
    shuffled = list(leases)
    rng.shuffle(shuffled)
    assert {p.key for p in valid_peers(CONFIG, net, OWN, shuffled, Reports())} == {p.key for p in peers}
    fdb = [o for o in net.desired_state(OWN, peers) if isinstance(o, FdbEntry)]
    assert sorted(str(e.lladdr) for e in fdb) == sorted(str(m) for m in owners)


def test_resolve_claims_is_generic() -> None:
    a, b, c = (lease(f"10.44.{i}.0/24", "198.51.100.9", created=i) for i in (4, 3, 2))

    def claims(x: Lease) -> frozenset[tuple[str, str]]:
        return frozenset({("Token", "t" if x.key != OWN.key else "mine")})

    winners, losers = resolve_claims(OWN, [a, b, c], claims)
    assert winners == [c] and [x.key for x, _ in losers] == [b.key, a.key]
    assert "Token t is already claimed by the older lease 10.44.2.0-24" in losers[0][1]


# -- the CLI refuses to create such leases ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("reserve", "10.44.7.0/24", "0.0.0.0"), "Invalid value for 'PUBLIC_IP': 0.0.0.0 is the unspecified address"),
        (("reserve", "10.44.7.0/24", "127.0.0.1"), "127.0.0.1 is a loopback address"),
        (("reserve", "10.44.7.0/24", "10.44.9.9"), "PUBLIC_IP 10.44.9.9 is inside the overlay network 10.44.0.0/16"),
        (("--public-ip", "255.255.255.255", "run"), "--public-ip 255.255.255.255 is the broadcast address"),
    ],
)
def test_cli_refuses_impossible_public_ips(tmp_path: Any, args: tuple[str, ...], message: str) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("OVERLAYD_")}
    env["OVERLAYD_EMBEDDED_PATH"] = str(tmp_path / "s.db")
    cli = [sys.executable, "-c", "from overlayd.cli import main; main()"]
    init = subprocess.run([*cli, "network", "init", "--network", "10.44.0.0/16"], env=env, capture_output=True)
    assert init.returncode == 0
    result = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# -- dual stack: per-family leases, PublicIPv6, per-family VtepMAC claims -------------------------------

DUAL = NetworkConfig.from_dict({"Network": "10.44.0.0/16", "EnableIPv6": True, "IPv6Network": "fd00::/48"})
OWN6_MAC = "0a:00:00:00:06:0a"


def vxlan_dual() -> VxlanNetwork:
    settings = VxlanSettings(vni=1, port=8472, mtu=0, gbp=False, direct_routing=False)
    host = HostInfo("eth0", 2, 1500, IPv4Address("192.0.2.1"), IPv6Address("2001:db8::1"), IPv4Address("192.0.2.1"))
    spec4 = DeviceSpec("flannel.1", 1, IPv4Address("192.0.2.1"), 2, 8472, False, 1450)
    spec6 = DeviceSpec("flannel-v6.1", 1, IPv6Address("2001:db8::1"), 2, 8472, False, 1430, family=6)
    vteps = [Vtep(spec4, MacAddress.parse(OWN_MAC)), Vtep(spec6, MacAddress.parse(OWN6_MAC))]
    return VxlanNetwork(settings, host, vteps, frozenset({IPv4Network("192.0.2.0/24")}), offline=True)


def dual_lease(n: int, ip6: Any = None, mac: str = MAC_1, mac6: str = "0a:00:00:00:06:01", created: int = 0) -> Lease:
    """Host *n*'s merged lease (both subnets, one attrs document with both backend data)."""
    ip6 = IPv6Address(ip6 or f"2001:db8::{n}") if not isinstance(ip6, IPv6Address) else ip6
    attrs_ = LeaseAttrs(
        IPv4Address(f"192.0.2.{n}"),
        "vxlan",
        {"VNI": 1, "VtepMAC": mac},
        public_ipv6=ip6,
        backend_v6_data={"VNI": 1, "VtepMAC": mac6},
    )
    v6 = IPv6Network(f"fd00:0:0:{n}::/64")
    return Lease(IPv4Network(f"10.44.{n}.0/24"), attrs_, None, ipv6_subnet=v6, created_revision=created)


OWN_DUAL = dual_lease(1, mac=OWN_MAC, mac6=OWN6_MAC, created=1)


def test_dual_stack_peer_is_two_leases_programmed_per_family() -> None:
    net = vxlan_dual()
    peer = dual_lease(2)
    reports = Reports()
    leases = [OWN_DUAL.only(4), OWN_DUAL.only(6), peer.only(4), peer.only(6)]
    valid = valid_peers(DUAL, net, OWN_DUAL, leases, reports)
    assert reports.seen == [] and [p.families for p in valid] == [(4,), (6,)]
    v6 = net.desired_state(OWN_DUAL, [peer.only(6)])  # depends on that one peer lease only
    assert v6 == {
        Route(IPv6Network("fd00:0:0:2::/64"), "flannel-v6.1", IPv6Address("fd00:0:0:2::"), onlink=True),
        Neighbour(IPv6Address("fd00:0:0:2::"), "0a:00:00:00:06:01", "flannel-v6.1"),
        FdbEntry("0a:00:00:00:06:01", IPv6Address("2001:db8::2"), "flannel-v6.1"),
    }
    assert net.desired_state(OWN_DUAL, valid) == v6 | net.desired_state(OWN_DUAL, [peer.only(4)])
    # a Kubernetes Node with both pod CIDRs is one lease with both families: the same objects
    assert net.desired_state(OWN_DUAL, [peer]) == net.desired_state(OWN_DUAL, valid)
    assert net.desired_state(OWN_DUAL, [OWN_DUAL.only(6)]) == frozenset()


IMPOSSIBLE6 = ["::", "::1", "fe80::1", "ff02::1", "fd00:0:0:9::1"]


@pytest.mark.parametrize("ip6", IMPOSSIBLE6)
def test_impossible_public_ipv6_skips_the_v6_lease_once(ip6: str) -> None:
    net = vxlan_dual()
    bad = dual_lease(3, ip6=ip6)
    reports = Reports()
    valid = valid_peers(DUAL, net, OWN_DUAL, [bad.only(6), dual_lease(2).only(6)], reports)
    assert [p.key for p in valid] == ["fd00:0:0:2::-64"]
    assert len(reports.seen) == 1 and reports.seen[0][2].startswith(f"PublicIPv6 {ip6} is ")


def test_v6_lease_without_public_ipv6_or_outside_the_network_is_skipped() -> None:
    net = vxlan_dual()
    no_ip6 = attrs.evolve(dual_lease(3), attrs=attrs.evolve(dual_lease(3).attrs, public_ipv6=None))
    outside = attrs.evolve(dual_lease(4), ipv6_subnet=IPv6Network("fd01:0:0:4::/64"))
    reports = Reports()
    assert valid_peers(DUAL, net, OWN_DUAL, [no_ip6.only(6), outside.only(6), no_ip6.only(4)], reports) == [
        no_ip6.only(4)
    ]
    reasons = [why for _, _, why in reports.seen]
    assert reasons == ["it has no PublicIPv6", "subnet fd01:0:0:4::/64 is outside network fd00::/48 or not a /64"]
    # a v6 lease in a network that does not enable IPv6
    assert valid_peers(CONFIG, vxlan(), OWN, [dual_lease(2).only(6)], reports) == []
    assert "does not enable" in reports.seen[-1][2]


def test_vtep_macs_are_claimed_per_family() -> None:
    net = vxlan_dual()
    # the same MAC value on the v4 device of one host and the v6 device of another: no conflict
    a = dual_lease(2, mac="0a:00:00:00:00:22", mac6="0a:00:00:00:06:22", created=5)
    b = dual_lease(3, mac="0a:00:00:00:06:22", mac6="0a:00:00:00:06:33", created=6)
    copycat = dual_lease(4, mac="0a:00:00:00:00:44", mac6="0a:00:00:00:06:22", created=7)
    stealer = dual_lease(5, mac="0a:00:00:00:00:55", mac6=OWN6_MAC, created=2)
    reports = Reports()
    leases = [lease_.only(v) for lease_ in (a, b, copycat, stealer) for v in (4, 6)]
    valid = valid_peers(DUAL, net, OWN_DUAL, leases, reports)
    assert sorted(reports.keys()) == ["fd00:0:0:4::-64", "fd00:0:0:5::-64"]
    why = dict((key, reason) for key, _, reason in reports.seen)
    assert why["fd00:0:0:4::-64"].startswith(
        "its v6 VtepMAC 0a:00:00:00:06:22 is already claimed by the older lease fd00:0:0:2::-64"
    )
    assert why["fd00:0:0:5::-64"].startswith(f"its v6 VtepMAC {OWN6_MAC} is this host's own")
    assert len(valid) == 6
    with pytest.raises(GarbledLease, match="BackendV6Data VtepMAC"):
        net.check_peer(dual_lease(6, mac6="01:00:5e:00:00:01").only(6))
    bad_vni = attrs.evolve(a, attrs=attrs.evolve(a.attrs, backend_v6_data={"VNI": 2, "VtepMAC": "0a:00:00:00:06:22"}))
    with pytest.raises(GarbledLease, match="BackendV6Data VNI 2"):
        net.check_peer(bad_vni.only(6))
    net.check_peer(bad_vni.only(4))  # the v4 lease of that host is fine
