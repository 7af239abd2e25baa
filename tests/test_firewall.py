"""The firewall rule model and its renderings (pure: no kernel)."""

from __future__ import annotations

from datetime import UTC, datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest
from overlayd.firewall import RuleSet, desired_ruleset, iptables_tables, nft_objects
from overlayd.firewall.rules import (
    IptablesTable,
    iptables_parse,
    iptables_restore_text,
    nft_normalise,
    nft_replace_batch,
)
from overlayd.model import Lease, LeaseAttrs

NET, SUB = IPv4Network("10.244.0.0/16"), IPv4Network("10.244.1.0/24")


def lease(subnet: str, ip: str | None, ip6: str | None = None) -> Lease:
    attrs = LeaseAttrs(
        public_ip=IPv4Address(ip) if ip else None,
        backend_type="vxlan",
        public_ipv6=IPv6Address(ip6) if ip6 else None,
    )
    return Lease(subnet=IPv4Network(subnet), attrs=attrs, expiration=datetime(2030, 1, 1, tzinfo=UTC))


def full() -> RuleSet:
    return RuleSet(NET, SUB, ip_masq=True, forward=True, overlay_port=8472, allowed_sources={"198.51.100.2"})


def test_desired_ruleset_takes_peer_public_ips_and_our_own() -> None:
    peers = [lease("10.244.2.0/24", "198.51.100.2"), lease("10.244.3.0/24", "198.51.100.3", "2001:db8::3")]
    rs = desired_ruleset(
        NET, SUB, ip_masq=True, forward=True, overlay_port=8472, leases=peers, own_public_ip=IPv4Address("198.51.100.1")
    )
    assert rs.allowed_sources == {IPv4Address(f"198.51.100.{i}") for i in (1, 2, 3)}
    assert rs.family == "ip"
    v6 = desired_ruleset(
        IPv6Network("fd00:10::/56"), None, ip_masq=False, forward=False, overlay_port=8472, leases=peers
    )
    assert v6.family == "ip6" and v6.allowed_sources == {IPv6Address("2001:db8::3")}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subnet": "10.245.1.0/24"}, "subnet 10.245.1.0/24 is not inside network 10.244.0.0/16"),
        ({"overlay_port": 70000}, "overlay port 70000 is not a UDP port"),
        ({"allowed_sources": {"2001:db8::1"}}, "allowed sources 2001:db8::1 are not IPv4 addresses"),
    ],
)
def test_rule_set_rejects_inconsistent_values(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RuleSet(NET, **kwargs)  # type: ignore[arg-type]


def test_nothing_enabled_renders_nothing() -> None:
    rs = RuleSet(NET, SUB, ip_masq=False, forward=False, overlay_port=None)
    assert rs.is_empty
    assert nft_objects(rs) == []
    assert all(t.same_as(IptablesTable()) for t in iptables_tables(rs).values())
    # the batch for an empty set only deletes the table
    assert [next(iter(c)) for c in nft_replace_batch(rs)["nftables"]] == ["add", "delete"]


def test_nft_rendering_has_flannels_masquerade_order_and_the_peer_set() -> None:
    objects = nft_objects(full())
    kinds = [next(iter(o)) for o in objects]
    assert kinds == ["table", "set", "chain", "chain", "chain"] + ["rule"] * 9
    peer_set = objects[1]["set"]
    assert peer_set["elem"] == ["198.51.100.2"] and peer_set["type"] == "ipv4_addr"
    masq = [o["rule"]["expr"] for o in objects if o.get("rule", {}).get("chain") == "postrouting"]
    assert masq[0][0]["match"]["left"] == {"&": [{"meta": {"key": "mark"}}, 0x4000]}
    assert [list(e[-1]) for e in masq] == [["return"]] * 4 + [["masquerade"]] * 2
    assert masq[4][-1] == {"masquerade": {"flags": "fully-random"}}
    # the batch is one transaction: make sure the table exists, delete it, then build it anew
    batch = nft_replace_batch(full())["nftables"]
    assert batch[:3] == [
        {"add": {"table": {"family": "ip", "name": "overlayd"}}},
        {"delete": {"table": {"family": "ip", "name": "overlayd"}}},
        {"add": {"table": {"family": "ip", "name": "overlayd"}}},
    ]


def test_nft_normalise_ignores_handles_counters_and_element_order() -> None:
    listing = {"nftables": [{"metainfo": {"version": "1.0.6"}}]}
    for obj in nft_objects(full()):
        ((kind, body),) = obj.items()
        body = {**body, "handle": 7}
        if kind == "rule" and "counter" in body["expr"][-2]:
            body["expr"] = [*body["expr"][:-2], {"counter": {"packets": 9, "bytes": 900}}, body["expr"][-1]]
        listing["nftables"].append({kind: body})
    assert nft_normalise(listing) == nft_objects(full())


def test_iptables_rendering_is_iptables_save_form() -> None:
    tables = iptables_tables(full())
    assert tables["nat"].chains["OVERLAYD-POSTRTG"] == (
        "-m mark --mark 0x4000/0x4000 -j RETURN",
        "-s 10.244.1.0/24 -d 10.244.0.0/16 -j RETURN",
        "-s 10.244.0.0/16 -d 10.244.1.0/24 -j RETURN",
        "! -s 10.244.0.0/16 -d 10.244.1.0/24 -j RETURN",
        "-s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully",
        "! -s 10.244.0.0/16 -d 10.244.0.0/16 -j MASQUERADE --random-fully",
    )
    assert tables["filter"].chains["OVERLAYD-OVERLAY-IN"] == ("-s 198.51.100.2/32 -j RETURN", "-j DROP")
    assert tables["filter"].jumps == {
        ("FORWARD", "-j OVERLAYD-FWD"),
        ("INPUT", "-p udp -m udp --dport 8472 -j OVERLAYD-OVERLAY-IN"),
    }


SAVE = """# Generated by iptables-save
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OVERLAYD-FWD - [0:0]
:OVERLAYD-OLD - [0:0]
:DOCKER - [0:0]
-A INPUT -p udp -m udp --dport 4789 -j OVERLAYD-OVERLAY-IN
-A FORWARD -j DOCKER
-A FORWARD -j OVERLAYD-FWD
-A OVERLAYD-FWD -s 10.244.0.0/16 -j ACCEPT
-A DOCKER -j RETURN
COMMIT
"""


def test_iptables_parse_keeps_only_our_chains_and_jumps() -> None:
    actual = iptables_parse(SAVE)
    assert actual.chains == {"OVERLAYD-FWD": ("-s 10.244.0.0/16 -j ACCEPT",), "OVERLAYD-OLD": ()}
    assert actual.jumps == {
        ("INPUT", "-p udp -m udp --dport 4789 -j OVERLAYD-OVERLAY-IN"),
        ("FORWARD", "-j OVERLAYD-FWD"),
    }


def test_iptables_restore_text_swaps_jumps_and_drops_stale_chains_in_one_commit() -> None:
    text = iptables_restore_text("filter", iptables_tables(full())["filter"], iptables_parse(SAVE))
    lines = text.splitlines()
    assert lines[0] == "*filter" and lines[-1] == "COMMIT" and lines.count("COMMIT") == 1
    assert ":OVERLAYD-OLD - [0:0]" in lines and lines[-2] == "-X OVERLAYD-OLD"
    assert "-D INPUT -p udp -m udp --dport 4789 -j OVERLAYD-OVERLAY-IN" in lines
    assert "-I INPUT 1 -p udp -m udp --dport 8472 -j OVERLAYD-OVERLAY-IN" in lines
    # our jumps are deleted before they are inserted again, and chains are declared before use
    assert lines.index("-D FORWARD -j OVERLAYD-FWD") < lines.index("-I FORWARD 1 -j OVERLAYD-FWD")
    assert lines.index(":OVERLAYD-OVERLAY-IN - [0:0]") < lines.index("-A OVERLAYD-OVERLAY-IN -j DROP")
    assert not any("DOCKER" in line for line in lines)
