"""The firewall drivers on the real kernel, each test in fresh network namespaces.

libnftables and iptables-restore act on the network namespace of the calling process, so every
``ensure``/``remove`` runs in a child process started with ``ip netns exec`` (a new process each
time, which is also what a daemon restart looks like); the test process itself never touches a
firewall.  What the kernel holds is read back independently with the ``nft`` and
``iptables-save`` commands inside the namespace.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from overlayd.firewall import RuleSet, iptables_tables, nft_objects
from overlayd.firewall.rules import iptables_parse, nft_normalise
from overlayd.testing.netns import Segment, netns, netns_factory, run, veth

__all__ = ["netns", "netns_factory"]

pytestmark = pytest.mark.root
KINDS = ["nftables", "iptables"]

CHILD = """
import json, sys
from overlayd.firewall import RuleSet, open_firewall
req = json.loads(sys.argv[1])
fw = open_firewall(req["kind"])
assert fw.name == req["kind"], fw.name
result = fw.ensure(RuleSet(**req["rs"])) if req["op"] == "ensure" else fw.remove()
print(json.dumps(result))
"""


def fw(ns: str, kind: str, op: str, **rs: Any) -> bool:
    """``open_firewall(kind).ensure(RuleSet(**rs))`` (or ``.remove()``) in a new process inside *ns*."""
    req = json.dumps({"kind": kind, "op": op, "rs": rs})
    proc = run(ns, sys.executable, "-c", CHILD, req)
    return bool(json.loads(proc.stdout))


def base(**over: Any) -> dict[str, Any]:
    rs: dict[str, Any] = {
        "network": "10.244.0.0/16",
        "subnet": "10.244.1.0/24",
        "ip_masq": True,
        "forward": True,
        "overlay_port": 8472,
        "allowed_sources": ["198.51.100.1", "198.51.100.3"],
    }
    rs.update(over)
    return rs


def nft_ruleset(ns: str, *extra: str) -> Any:
    return json.loads(run(ns, "nft", "-j", *extra, "list", "ruleset").stdout)


def ours_nft(ns: str, family: str = "ip") -> list[dict[str, Any]]:
    out = run(ns, "nft", "-j", "list", "table", family, "overlayd", check=False)
    return nft_normalise(json.loads(out.stdout)) if out.returncode == 0 else []


def ours_ipt(ns: str, family: str = "ip") -> dict[str, Any]:
    save = "iptables-save" if family == "ip" else "ip6tables-save"
    return {t: iptables_parse(run(ns, save, "-t", t).stdout) for t in ("nat", "filter")}


def assert_matches(ns: str, kind: str, rs: dict[str, Any]) -> None:
    """The kernel holds exactly the rendering of *rs* (order included), read back independently."""
    want = RuleSet(**rs)
    if kind == "nftables":
        assert ours_nft(ns, want.family) == nft_objects(want)
    else:
        actual, desired = ours_ipt(ns, want.family), iptables_tables(want)
        for table in ("nat", "filter"):
            assert actual[table].chains == desired[table].chains, table
            assert actual[table].jumps == desired[table].jumps, table


def nothing_of_ours(ns: str) -> bool:
    text = run(ns, "nft", "list", "ruleset").stdout
    return "overlayd" not in text and "OVERLAYD" not in text


@pytest.mark.parametrize("kind", KINDS)
def test_ensure_creates_rules_and_a_second_ensure_is_no_transaction(netns: str, kind: str) -> None:
    assert fw(netns, kind, "ensure", **base()) is True
    assert_matches(netns, kind, base())
    before = nft_ruleset(netns, "-a")  # with handles: any transaction would renumber them
    assert fw(netns, kind, "ensure", **base()) is False
    assert nft_ruleset(netns, "-a") == before


@pytest.mark.parametrize("kind", KINDS)
def test_ipv6_rules_live_beside_the_ipv4_ones(netns: str, kind: str) -> None:
    v6 = {
        "network": "fd10:244::/56",
        "subnet": "fd10:244:0:1::/64",
        "ip_masq": True,
        "overlay_port": 8472,
        "allowed_sources": ["2001:db8::1", "2001:db8::3"],
    }
    assert fw(netns, kind, "ensure", **base()) is True
    assert fw(netns, kind, "ensure", **v6) is True
    assert_matches(netns, kind, v6)
    assert_matches(netns, kind, base())
    assert fw(netns, kind, "ensure", **v6) is False
    assert fw(netns, kind, "remove") is True
    assert nothing_of_ours(netns)


@pytest.mark.parametrize("kind", KINDS)
def test_rules_edited_by_hand_converge_back(netns: str, kind: str) -> None:
    fw(netns, kind, "ensure", **base())
    if kind == "nftables":
        listing = nft_ruleset(netns, "-a")
        handle = next(
            o["rule"]["handle"] for o in listing["nftables"] if o.get("rule", {}).get("chain") == "postrouting"
        )
        run(netns, "nft", "delete", "rule", "ip", "overlayd", "postrouting", "handle", str(handle))
        run(netns, "nft", "add", "rule", "ip", "overlayd", "forward", "ip", "saddr", "10.9.0.0/16", "drop")
        run(netns, "nft", "flush", "set", "ip", "overlayd", "overlay_peers")
    else:
        run(netns, "iptables", "-t", "nat", "-D", "OVERLAYD-POSTRTG", "1")
        run(netns, "iptables", "-t", "nat", "-D", "POSTROUTING", "-j", "OVERLAYD-POSTRTG")
        run(netns, "iptables", "-A", "OVERLAYD-FWD", "-s", "10.9.0.0/16", "-j", "DROP")
        run(netns, "iptables", "-A", "FORWARD", "-j", "OVERLAYD-FWD")  # a second jump
    with pytest.raises(AssertionError):
        assert_matches(netns, kind, base())
    assert fw(netns, kind, "ensure", **base()) is True
    assert_matches(netns, kind, base())
    assert fw(netns, kind, "ensure", **base()) is False


@pytest.mark.parametrize("kind", KINDS)
def test_peer_set_and_network_changes_replace_the_old_rules(netns: str, kind: str) -> None:
    fw(netns, kind, "ensure", **base())
    moved = base(allowed_sources=["198.51.100.3", "198.51.100.4"])
    assert fw(netns, kind, "ensure", **moved) is True
    assert_matches(netns, kind, moved)
    other = base(
        network="10.77.0.0/16",
        subnet="10.77.5.0/24",
        overlay_port=4789,
        forward=False,
        allowed_sources=["198.51.100.7"],
    )
    assert fw(netns, kind, "ensure", **other) is True
    assert_matches(netns, kind, other)
    text = run(netns, "nft", "list", "ruleset").stdout
    for gone in ("10.244.", "8472", "198.51.100.3"):
        assert gone not in text


@pytest.mark.parametrize("kind", KINDS)
def test_remove_leaves_nothing_and_other_rules_alone(netns: str, kind: str) -> None:
    # someone else's rules, in the same hooks
    run(netns, "nft", "add", "table", "inet", "theirs")
    run(netns, "nft", "add", "chain", "inet", "theirs", "post", "{ type nat hook postrouting priority 100; }")
    run(netns, "nft", "add", "rule", "inet", "theirs", "post", "ip", "saddr", "10.9.0.0/16", "masquerade")
    run(netns, "iptables", "-A", "FORWARD", "-s", "10.8.0.0/16", "-j", "ACCEPT")
    fw(netns, kind, "ensure", **base())
    assert not nothing_of_ours(netns)
    assert fw(netns, kind, "remove") is True
    assert nothing_of_ours(netns)
    assert fw(netns, kind, "remove") is False
    text = run(netns, "nft", "list", "ruleset").stdout
    assert "ip saddr 10.9.0.0/16 masquerade" in text
    assert "-A FORWARD -s 10.8.0.0/16 -j ACCEPT" in run(netns, "iptables-save", "-t", "filter").stdout


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_rule_set_removes_our_rules(netns: str, kind: str) -> None:
    fw(netns, kind, "ensure", **base())
    assert fw(netns, kind, "ensure", **base(ip_masq=False, forward=False, overlay_port=None)) is True
    assert nothing_of_ours(netns)


AVAILABILITY = """
import logging, sys
logging.basicConfig(format="%(levelname)s %(message)s")
if sys.argv[1] == "no-module":
    sys.modules["nftables"] = None  # what a host without pip-nftables looks like to the import
from overlayd.errors import UserError
from overlayd.firewall import NftablesFirewall, open_firewall
try:
    fw = NftablesFirewall(library="libnftables-absent.so.1") if sys.argv[2] == "lib" else open_firewall(sys.argv[2])
    print(fw.name)
except UserError as exc:
    print("error", exc)
"""


def availability(ns: str, case: str, kind: str, path: str | None = None) -> tuple[str, str]:
    env = ["env", f"PATH={path}"] if path is not None else []
    proc = run(ns, *env, sys.executable, "-c", AVAILABILITY, case, kind)
    return proc.stdout.strip(), proc.stderr.strip()


def test_nftables_falls_back_to_iptables_with_a_warning(netns: str) -> None:
    assert availability(netns, "ok", "nftables") == ("nftables", "")
    out, err = availability(netns, "no-module", "nftables")
    assert out == "iptables"
    assert err == (
        "WARNING --firewall nftables needs the Python module nftables: pip install pip-nftables "
        "(or choose --firewall iptables); falling back to iptables"
    )


def test_a_missing_firewall_is_one_clear_line(netns: str) -> None:
    out, _ = availability(netns, "ok", "lib")
    assert out.startswith("error --firewall nftables needs libnftables (")
    assert out.endswith("apt-get install libnftables1 (or choose --firewall iptables)")
    out, _ = availability(netns, "ok", "iptables", path="/nonexistent")
    assert (
        out == "error --firewall iptables needs iptables-save: apt-get install iptables (or choose --firewall nftables)"
    )
    out, _ = availability(netns, "no-module", "nftables", path="/nonexistent")
    assert out.startswith("error --firewall nftables needs the Python module nftables")
    assert out.endswith(
        "and the iptables fallback failed: --firewall iptables needs iptables-save: "
        "apt-get install iptables (or choose --firewall nftables)"
    )
    out, _ = availability(netns, "ok", "ufw")
    assert out == "error --firewall 'ufw' is not one of nftables, iptables, none"


# -- traffic -------------------------------------------------------------------------------------------


@pytest.fixture
def nat_topology(netns_factory: Callable[..., str]) -> tuple[str, str, str]:
    """container (10.244.1.2) -- host (10.244.1.1 | 198.51.100.1) -- outside (198.51.100.2).

    The outside namespace has no route to 10.244.0.0/16: a reply reaches the container only when
    the host masqueraded the request to its own underlay address.
    """
    ctr, host, out = netns_factory("c"), netns_factory("h"), netns_factory("o")
    veth(ctr, "eth0", host, "cni0", "10.244.1.2/24", "10.244.1.1/24")
    veth(host, "eth0", out, "eth0", "198.51.100.1/24", "198.51.100.2/24")
    run(ctr, "ip", "route", "add", "default", "via", "10.244.1.1")
    run(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    return ctr, host, out


def pings(ns: str, dst: str) -> bool:
    return run(ns, "ping", "-c1", "-W1", dst, check=False).returncode == 0


@pytest.mark.parametrize("kind", KINDS)
def test_masquerade_lets_containers_reach_an_outside_with_no_route_back(
    nat_topology: tuple[str, str, str], kind: str
) -> None:
    ctr, host, _ = nat_topology
    fw(host, kind, "ensure", **base(ip_masq=False))
    assert not pings(ctr, "198.51.100.2")
    fw(host, kind, "ensure", **base(ip_masq=True))
    assert pings(ctr, "198.51.100.2")
    # traffic inside the network is never masqueraded: the container still sees the host's own
    # overlay address as the peer, not a rewritten one
    assert pings(ctr, "10.244.1.1")


@pytest.fixture
def nat6_topology(netns_factory: Callable[..., str]) -> tuple[str, str, str]:
    """The IPv6 twin of :func:`nat_topology`: container (fd00:0:0:1::2) -- host (fd00:0:0:1::1 |
    2001:db8::1) -- outside (2001:db8::2), which has no route to fd00::/48."""
    ctr, host, out = netns_factory("c6"), netns_factory("h6"), netns_factory("o6")
    veth(ctr, "eth0", host, "cni0")
    veth(host, "eth0", out, "eth0")
    for ns, dev, addr in (
        (ctr, "eth0", "fd00:0:0:1::2/64"),
        (host, "cni0", "fd00:0:0:1::1/64"),
        (host, "eth0", "2001:db8::1/64"),
        (out, "eth0", "2001:db8::2/64"),
    ):
        run(ns, "ip", "-6", "addr", "add", addr, "dev", dev, "nodad")
    run(ctr, "ip", "-6", "route", "add", "default", "via", "fd00:0:0:1::1")
    run(host, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    return ctr, host, out


def v6_masq(**over: Any) -> dict[str, Any]:
    rs: dict[str, Any] = {"network": "fd00::/48", "subnet": "fd00:0:0:1::/64", "ip_masq": True, "forward": True}
    rs.update(over)
    return rs


@pytest.mark.parametrize("kind", KINDS)
def test_ipv6_masquerade_lets_containers_reach_an_outside_with_no_route_back(
    nat6_topology: tuple[str, str, str], kind: str
) -> None:
    ctr, host, out = nat6_topology
    fw(host, kind, "ensure", **v6_masq(ip_masq=False))
    assert not run(ctr, "ping", "-6", "-c1", "-W1", "2001:db8::2", check=False).returncode == 0
    fw(host, kind, "ensure", **v6_masq())
    assert_matches(host, kind, v6_masq())
    # a reply came back although the outside has no route to fd00::/48: it saw the host's address
    assert run(ctr, "ping", "-6", "-c1", "-W1", "2001:db8::2", check=False).returncode == 0
    assert "fd00" not in run(out, "ip", "-6", "route", "show").stdout
    # inside the network nothing is rewritten: the container reaches the host's overlay address
    assert run(ctr, "ping", "-6", "-c1", "-W1", "fd00:0:0:1::1", check=False).returncode == 0
    if kind == "nftables":
        text = run(host, "nft", "list", "table", "ip6", "overlayd").stdout
        assert "ip6 saddr fd00::/48 ip6 daddr != ff00::/8 masquerade" in text
    else:
        assert (
            "-A OVERLAYD-POSTRTG -s fd00::/48 ! -d ff00::/8 -j MASQUERADE"
            in run(host, "ip6tables-save", "-t", "nat").stdout
        )


ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
while True:
    data, src = s.recvfrom(2048)
    s.sendto(data, src)
"""

PROBE = """
import os, socket, sys
dst, port, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sent = lost = 0
print("ready", flush=True)
while not os.path.exists(stop):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # a new source port: a new conntrack entry
    s.settimeout(0.5)
    s.sendto(b"x%d" % sent, (dst, port))
    sent += 1
    try:
        s.recvfrom(64)
    except OSError:
        lost += 1
    s.close()
print(sent, lost)
"""


@contextmanager
def background(ns: str, code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A Python snippet running inside *ns* that prints one line once it is ready; killed after."""
    argv = ["ip", "netns", "exec", ns, sys.executable, "-c", code, *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.parametrize("kind", KINDS)
def test_nat_survives_restarts_and_replacements_under_load(
    nat_topology: tuple[str, str, str], kind: str, tmp_path: Path
) -> None:
    """New flows every few milliseconds from the container to the outside while the daemon
    "restarts" (ensure from a new process: a no-op) and the peer set changes (the whole table or
    chain replaced): not one flow may miss its NAT (flannel #2237)."""
    ctr, host, out = nat_topology
    fw(host, kind, "ensure", **base())
    stop = tmp_path / "stop"
    with background(out, ECHO, "9000"), background(ctr, PROBE, "198.51.100.2", "9000", str(stop)) as probe:
        current = base()
        for changes in range(1, 6):
            assert fw(host, kind, "ensure", **current) is False  # a restart with the same rules
            current = base(allowed_sources=["198.51.100.1", f"198.51.100.{10 + changes % 2}"])
            assert fw(host, kind, "ensure", **current) is True  # a replacement
        stop.touch()
        sent, lost = map(int, probe.communicate(timeout=10)[0].split())
    assert sent > 100
    assert lost == 0, f"{lost} of {sent} new flows lost NAT across {changes} replacements"
    print(f"{kind}: {sent} new flows, {changes} replacements, 0 lost")


def test_the_probe_does_see_a_window_without_nat(nat_topology: tuple[str, str, str], tmp_path: Path) -> None:
    """Control for the test above: flushing the NAT chain and refilling it a moment later (what
    flannel's restart does, #2237) loses flows, so "0 lost" above is a measurement, not luck."""
    ctr, host, out = nat_topology
    fw(host, "nftables", "ensure", **base())
    stop = tmp_path / "stop"
    with background(out, ECHO, "9000"), background(ctr, PROBE, "198.51.100.2", "9000", str(stop)) as probe:
        time.sleep(0.2)
        run(host, "nft", "flush", "chain", "ip", "overlayd", "postrouting")
        time.sleep(0.2)
        assert fw(host, "nftables", "ensure", **base()) is True
        time.sleep(0.2)
        stop.touch()
        sent, lost = map(int, probe.communicate(timeout=10)[0].split())
    assert 0 < lost < sent


@pytest.fixture
def segment(netns_factory: Callable[..., str]) -> tuple[str, str, str]:
    """host 198.51.100.1, member 198.51.100.3 and stranger 198.51.100.9 on one L2 segment."""
    seg = Segment(netns_factory("sw"))
    host, member, stranger = netns_factory("h"), netns_factory("m"), netns_factory("x")
    for ns, last in ((host, 1), (member, 3), (stranger, 9)):
        seg.attach(ns, "eth0", f"198.51.100.{last}/24")
    return host, member, stranger


RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    while True:
        data, src = s.recvfrom(2048)
        print(src[0], flush=True)
except TimeoutError:
    pass
"""

SEND_VXLAN = """
import socket, sys
# a VXLAN header (flags I, VNI 1) and an inner Ethernet frame carrying an IPv4 header
frame = bytes.fromhex("08000000" "00000100") + bytes.fromhex("ffffffffffff" "020000000009" "0800") + bytes(40)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(5):
    s.sendto(frame, (sys.argv[1], int(sys.argv[2])))
"""


def drop_count(ns: str, kind: str) -> int:
    if kind == "nftables":
        listing = nft_ruleset(ns)
        rule = next(o["rule"] for o in listing["nftables"] if o.get("rule", {}).get("chain") == "input")
        return int(next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e))
    out = run(ns, "iptables", "-L", "OVERLAYD-OVERLAY-IN", "-v", "-x", "-n").stdout.splitlines()
    return int(next(line.split()[0] for line in out if "DROP" in line))


@pytest.mark.parametrize("kind", KINDS)
def test_overlay_port_takes_frames_only_from_lease_holders(segment: tuple[str, str, str], kind: str) -> None:
    host, member, stranger = segment
    fw(host, kind, "ensure", **base(allowed_sources=["198.51.100.1", "198.51.100.3"]))
    with background(host, RECEIVER, "8472", "2") as receiver:
        run(stranger, sys.executable, "-c", SEND_VXLAN, "198.51.100.1", "8472")
        run(member, sys.executable, "-c", SEND_VXLAN, "198.51.100.1", "8472")
        sources = receiver.communicate(timeout=15)[0].split()
    assert sources == ["198.51.100.3"] * 5
    assert drop_count(host, kind) == 5
    # the stranger becomes a member (its lease appears): its frames pass from then on
    fw(host, kind, "ensure", **base(allowed_sources=["198.51.100.1", "198.51.100.3", "198.51.100.9"]))
    with background(host, RECEIVER, "8472", "2") as receiver:
        run(stranger, sys.executable, "-c", SEND_VXLAN, "198.51.100.1", "8472")
        sources = receiver.communicate(timeout=15)[0].split()
    assert sources == ["198.51.100.9"] * 5
