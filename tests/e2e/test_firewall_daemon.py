"""The firewall rules kept by the real ``overlayd`` daemon, with each driver (nftables, iptables).

Two vxlan hosts on the switch, plus two plain namespaces on the same switch: an "outside"
machine (192.0.2.200) with no route to the container network, so its replies reach a container
only when the container's traffic was masqueraded, and a stranger (192.0.2.201) that holds no
lease.  Everything is read back in the host namespaces with ``nft`` / ``iptables-save``, ``ip``
and ping; the crafted VXLAN frames are counted by the receiving VXLAN device itself.
"""

from __future__ import annotations

import json
import re
import sys
import time
from ipaddress import IPv4Interface

import pytest
from overlayd import _topology as topo

from ._mesh import NETWORK, assert_full_mesh, background_ping, ping_counts, subnets, wait_full_mesh_routes

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

#: The audit period these daemons run with: the firewall's hand edits are put back by the audit.
RESYNC = 2.0

OUTSIDE = IPv4Interface("192.0.2.200/24")
STRANGER = IPv4Interface("192.0.2.201/24")

# A VXLAN frame (VNI 1) carrying an ICMP echo request for the container behind the target host:
# what anyone who can reach UDP 8472 could inject into the overlay without the allow-list.
CRAFT = """
import socket, struct, sys
def csum(b):
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b)); s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
host, mac, dst, count = sys.argv[1], bytes.fromhex(sys.argv[2].replace(":", "")), sys.argv[3], int(sys.argv[4])
icmp = struct.pack("!BBHHH", 8, 0, 0, 7, 1) + bytes(32)
icmp = icmp[:2] + struct.pack("!H", csum(icmp)) + icmp[4:]
ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0,
                 socket.inet_aton("10.244.250.9"), socket.inet_aton(dst))
ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
frame = bytes.fromhex("0800000000000100") + mac + bytes.fromhex("020000000099") + b"\\x08\\x00" + ip + icmp
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(frame, (host, 8472))
"""


def args(cluster: topo.Cluster, kind: str, *extra: str) -> list[str]:
    return [
        "--embedded-path", str(cluster.workdir / "store.db"),
        "--network", NETWORK,
        "--backend", "vxlan",
        "--firewall", kind,
        "--healthz-port", "0",
        "--resync-period", str(RESYNC),
        "--log-level", "debug",
        *extra,
    ]  # fmt: skip


def rules(host: topo.Host, kind: str) -> str:
    """Our rules as the kernel prints them (counter values blanked)."""
    if kind == "nftables":
        proc = host.exec(["nft", "list", "table", "ip", "overlayd"], check=False)
        return re.sub(r"counter packets \d+ bytes \d+", "counter", proc.stdout) if proc.returncode == 0 else ""
    saved = host.exec(["iptables-save"]).stdout
    return "\n".join(line for line in saved.splitlines() if "OVERLAYD" in line)


def hand_edit(host: topo.Host, kind: str) -> None:
    """Someone empties our masquerade chain."""
    if kind == "nftables":
        host.exec(["nft", "flush", "chain", "ip", "overlayd", "postrouting"])
    else:
        host.exec(["iptables", "-t", "nat", "-F", "OVERLAYD-POSTRTG"])


def vxlan_rx(host: topo.Host) -> int:
    out = host.ip("-s", "-j", "link", "show", "flannel.1").stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def restart(host: topo.Host, argv: list[str]) -> None:
    host.start_daemon(argv)  # stops the running daemon (SIGTERM: state kept), starts with *argv*
    host.wait_ready(30)


@pytest.mark.parametrize("kind", ["nftables", "iptables"])
def test_the_daemon_keeps_nat_forward_and_the_overlay_port_allow_list(make_cluster, figures, kind):
    cluster = make_cluster(2)
    cluster.add_plain("out", OUTSIDE)
    stranger = cluster.add_plain("xs", STRANGER)
    h0, h1 = cluster.hosts

    # Control: no --ip-masq.  The subnet file says so, and the outside cannot answer a container.
    for host in cluster.hosts:
        host.start_daemon(args(cluster, kind, "--no-ip-masq"))
    for host in cluster.hosts:
        host.attach_container(host.wait_ready(30))
    wait_full_mesh_routes(cluster)
    assert h0.subnet_env().ipmasq is False
    c0, c1 = h0.container, h1.container
    assert not c0.ping(OUTSIDE.ip, count=2).ok

    # --ip-masq: the rules follow the changed setting; FLANNEL_IPMASQ=true only now.
    for host in cluster.hosts:
        restart(host, args(cluster, kind, "--ip-masq"))
    assert h0.subnet_env().ipmasq is True
    masq = "masquerade" if kind == "nftables" else "MASQUERADE"
    for host in cluster.hosts:  # the subnet file comes first; the rules on the first pass right after
        topo.wait_until(lambda host=host: masq in rules(host, kind), 3 * RESYNC + 5, what=f"rules on {host.name}")
    assert c0.ping(OUTSIDE.ip).ok and c1.ping(OUTSIDE.ip).ok
    assert_full_mesh(cluster)
    nets = subnets(cluster)
    want = rules(h0, kind)
    assert str(nets[h0.index]) in want and str(h1.underlay.ip) in want
    figures.add(f"{kind} rules of host0:\n{want}")
    if kind == "iptables":
        assert rules(h0, "nftables") == ""  # the iptables driver made no nftables table of ours

    # Edited by hand: put back on the next pass (an audit once per resync period).
    hand_edit(h0, kind)
    assert rules(h0, kind) != want
    start = time.monotonic()
    topo.wait_until(lambda: rules(h0, kind) == want, 3 * RESYNC + 5, what="rules put back")
    figures.add(f"{kind}: hand-edited masquerade chain put back in {time.monotonic() - start:.2f} s")
    assert "changed by hand; put back" in h0.daemon.log_path.read_text()
    assert c0.ping(OUTSIDE.ip).ok

    # A restart keeps NAT: a continuous ping to the outside (every 50 ms) loses nothing.
    pinger = background_ping(c0.ns, OUTSIDE.ip, 8)
    time.sleep(1)
    h0.restart_daemon(fresh=False)
    time.sleep(2 * RESYNC)
    output, sent, received = ping_counts(pinger)
    assert sent > 100 and received == sent, output
    figures.add(f"{kind}: daemon restart under a ping to the outside: {sent} sent, {sent - received} lost")
    assert rules(h0, kind) == want

    # A stranger's crafted VXLAN frames are dropped; the same frames from a member arrive.
    mac = json.loads(h1.ip("-j", "link", "show", "flannel.1").stdout)[0]["address"]
    target = [str(h1.underlay.ip), mac, str(c1.address.ip), "20"]
    before = vxlan_rx(h1)
    topo.run(topo.ns_exec(stranger, [sys.executable, "-c", CRAFT, *target]))
    time.sleep(0.5)
    assert vxlan_rx(h1) == before, "a stranger's frames reached the VXLAN device"
    topo.run(topo.ns_exec(h0.ns, [sys.executable, "-c", CRAFT, *target]))
    topo.wait_until(lambda: vxlan_rx(h1) >= before + 20, 5, what="a member's frames decapsulated")
    assert_full_mesh(cluster, count=1)

    # --release-on-exit: nothing of ours is left.
    restart(h1, args(cluster, kind, "--ip-masq", "--release-on-exit"))
    assert str(nets[h1.index]) in rules(h1, kind)
    assert h1.daemon.stop() == 0
    assert rules(h1, "nftables") == "" and rules(h1, "iptables") == ""
    assert "flannel.1" not in h1.ip("link", "show").stdout
    assert not [r for r in h1.routes() if str(r.get("protocol")) == "79"]
    assert not h1.subnet_file.exists()
