"""The udp backend and its forwarder: packet surgery (unit) and real namespaces (functional, root).

Functional tests build "hosts" as network namespaces on one bridge (``Segment``): each has
``eth0`` on 192.0.2.0/24 and a ``dummy0`` (a port-less bridge) holding ``<subnet>.1``, the stand-in for a container.
The backend runs in-process inside the namespace (``call_in_netns``), so its forwarder child is
born there.  Kernel state is read back with ``ip -j``; traffic is real ``ping``.
"""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from overlayd import plan as planmod
from overlayd import udpfwd
from overlayd.backends.udp import Forward, UdpBackend, UdpNetwork, UdpOptions
from overlayd.config import NetworkConfig
from overlayd.kernel import Route
from overlayd.model import Lease, LeaseAttrs
from overlayd.plugin import HostInfo
from overlayd.testing.netns import Segment, call_in_netns, ip_json, netns_factory, run

__all__ = ["netns_factory"]

CONFIG = NetworkConfig.from_dict({"Network": "10.44.0.0/16", "Backend": {"Type": "udp"}})
PEER_SCRIPT = Path(__file__).with_name("flannel_udp_peer.py")


def lease(subnet: str, public_ip: str) -> Lease:
    return Lease(IPv4Network(subnet), LeaseAttrs(IPv4Address(public_ip), "udp", {}), None)


def host(ip: str) -> HostInfo:
    return HostInfo(iface="eth0", iface_index=0, iface_mtu=1500, public_ip=IPv4Address(ip))


# -- unit: packets ---------------------------------------------------------------------------------


def reference_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@pytest.mark.parametrize("data", [b"", b"\x01", b"\x45\x00\x00\x54", bytes(range(256)) * 7, b"\xff" * 33])
def test_checksum_matches_rfc1071(data: bytes) -> None:
    got = udpfwd.checksum(data)
    want = reference_checksum(data)
    assert got == want or {got, want} == {0, 0xFFFF}


def ip_header(src: str, dst: str, proto: int, payload_len: int, ttl: int = 64, ident: int = 7) -> bytearray:
    header = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, ident, 0x4000, ttl, proto, 0,
                    IPv4Address(src).packed, IPv4Address(dst).packed)
    )  # fmt: skip
    struct.pack_into("!H", header, 10, reference_checksum(bytes(header)))
    return header


def tcp_super_segment(payload: bytes, flags: int = 0x18 | 0x01 | 0x80) -> bytearray:
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, 1000, 55, 8 << 4, flags, 512, 0, 0))
    tcp += b"\x01\x01\x08\x0a" + bytes(8)  # NOP NOP timestamps: a 32-byte header
    return ip_header("10.44.1.2", "10.44.2.2", 6, len(tcp) + len(payload)) + tcp + payload


def verify_tcp(packet: bytes) -> tuple[int, int, bytes]:
    """(seq, flags, payload) of a TCP/IPv4 packet whose checksums and lengths are all right."""
    ihl = (packet[0] & 15) * 4
    assert reference_checksum(packet[:ihl]) in (0, 0xFFFF)
    assert struct.unpack("!H", packet[2:4])[0] == len(packet)
    segment = packet[ihl:]
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(segment))
    assert reference_checksum(pseudo + segment) in (0, 0xFFFF)
    thl = (segment[12] >> 4) * 4
    return struct.unpack("!I", segment[4:8])[0], segment[13], segment[thl:]


@pytest.mark.parametrize("size", [1, 1407, 1408, 1409, 5000, 65000 - 52])
def test_segment_tcp_cuts_like_the_kernel(size: int) -> None:
    payload = os.urandom(size)
    seg_len, pieces = udpfwd.segment_tcp(memoryview(tcp_super_segment(payload)), 1408)
    packets = [bytes(pieces[i]) + bytes(pieces[i + 1]) for i in range(0, len(pieces), 2)]
    assert seg_len == 52 + 1408
    assert all(len(p) == seg_len for p in packets[:-1]) and len(packets[-1]) <= seg_len
    seen = b""
    for index, packet in enumerate(packets):
        seq, flags, data = verify_tcp(packet)
        assert seq == 1000 + len(seen)
        last = index == len(packets) - 1
        assert bool(flags & 0x01) == last and bool(flags & 0x08) == last  # FIN, PSH only on the last
        assert bool(flags & 0x80) == (index == 0)  # CWR only on the first
        assert struct.unpack("!H", packet[4:6])[0] == 7 + index
        seen += data
    assert seen == payload


def test_coalesce_rebuilds_the_super_segment_the_sender_cut() -> None:
    payload = os.urandom(20000)
    _, pieces = udpfwd.segment_tcp(memoryview(tcp_super_segment(payload, flags=0x18)), 1408)
    packets = [memoryview(bytes(pieces[i]) + bytes(pieces[i + 1])) for i in range(0, len(pieces), 2)]
    ack = memoryview(bytes(tcp_super_segment(b"", flags=0x10)))
    writes = udpfwd.coalesce_tcp([ack, *packets, ack])
    assert [len(pieces) for _, pieces in writes] == [1, 1 + len(packets), 1]
    vnet, merged = writes[1]
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = udpfwd.tun.VNET_HDR.unpack(vnet)
    assert (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset) == (1, 1, 52, 1408, 20, 16)
    packet = b"".join(bytes(p) for p in merged)
    assert struct.unpack("!H", packet[2:4])[0] == len(packet) == 52 + len(payload)
    assert reference_checksum(packet[:20]) in (0, 0xFFFF) and packet[52:] == payload
    assert packet[33] == 0x18  # the last segment's PSH
    # a partial checksum: the pseudo header's sum, which the kernel completes over the segment
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(packet) - 20)
    assert struct.unpack("!H", packet[36:38])[0] == (~reference_checksum(pseudo)) & 0xFFFF
    # a gap in sequence numbers ends the run
    writes = udpfwd.coalesce_tcp([packets[0], packets[2], packets[3]])
    assert [len(pieces) for _, pieces in writes] == [1, 3]


def test_ttl_decrement_keeps_the_header_checksum_right() -> None:
    packet = ip_header("10.44.1.2", "10.44.2.2", 17, 0, ttl=9)
    assert udpfwd.decrement_ttl(packet)
    assert packet[8] == 8 and reference_checksum(bytes(packet)) in (0, 0xFFFF)
    expiring = ip_header("10.44.1.2", "10.44.2.2", 17, 0, ttl=1)
    assert not udpfwd.decrement_ttl(expiring)


def test_icmp_error_quotes_the_packet_and_is_never_sent_about_an_error() -> None:
    packet = bytes(ip_header("10.44.1.2", "10.44.9.9", 17, 8)) + bytes(8)
    reply = udpfwd.icmp_error(packet, 3, 0, IPv4Address("10.44.1.0").packed)
    assert reply is not None
    assert reply[12:16] == IPv4Address("10.44.1.0").packed and reply[16:20] == IPv4Address("10.44.1.2").packed
    assert reply[20:22] == b"\x03\x00" and reply[28:] == packet[:28]
    assert reference_checksum(reply[:20]) in (0, 0xFFFF) and reference_checksum(reply[20:]) in (0, 0xFFFF)
    assert udpfwd.icmp_error(reply, 3, 0, IPv4Address("10.44.2.0").packed) is None


def test_table_lookup_and_sources() -> None:
    table = udpfwd.Table([(IPv4Network("10.44.2.0/24"), IPv4Address("192.0.2.2")),
                          (IPv4Network("10.44.3.0/25"), IPv4Address("192.0.2.3"))])  # fmt: skip
    assert table.lookup(int(IPv4Address("10.44.2.77"))) == "192.0.2.2"
    assert table.lookup(int(IPv4Address("10.44.3.127"))) == "192.0.2.3"
    assert table.lookup(int(IPv4Address("10.44.3.128"))) is None
    assert table.subnets_of("192.0.2.9") is None
    assert udpfwd.Table.decode(__import__("json").loads(table.encode())) == table


# -- unit: planning --------------------------------------------------------------------------------


def test_desired_state_is_the_network_route_and_one_entry_per_peer() -> None:
    network = UdpBackend(UdpOptions()).offline(CONFIG, host("192.0.2.1"), lease("10.44.1.0/24", "192.0.2.1"))
    own = lease("10.44.1.0/24", "192.0.2.1")
    peers = [own, lease("10.44.2.0/24", "192.0.2.2"), lease("10.44.3.0/24", "192.0.2.1")]  # the last: stale, ours
    assert network.desired_state(own, peers) == {
        Route(dst=IPv4Network("10.44.0.0/16"), dev="flannel0"),
        Forward(IPv4Network("10.44.2.0/24"), IPv4Address("192.0.2.2")),
    }
    assert network.mtu == 1472
    assert isinstance(network, UdpNetwork) and network.overlay_port == 8285


def test_config_port_beats_the_option() -> None:
    config = NetworkConfig.from_dict({"Network": "10.44.0.0/16", "Backend": {"Type": "udp", "Port": 9000}})
    network = UdpBackend(UdpOptions(port=8285)).offline(config, host("192.0.2.1"), lease("10.44.1.0/24", "192.0.2.1"))
    assert isinstance(network, UdpNetwork) and network.overlay_port == 9000


# -- functional: real namespaces -------------------------------------------------------------------

pytestmark_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces)")


class Lab:
    """Hosts on one segment; ``up(i, subnet)`` starts the backend on host *i* for *subnet*."""

    def __init__(self, make: Callable[[str], str], count: int, offload: bool = True) -> None:
        self.segment = Segment(make("sw"))
        self.hosts = [make(f"h{i}") for i in range(count)]
        self.offload = offload
        self.networks: dict[int, UdpNetwork] = {}
        self.leases: dict[int, Lease] = {}
        for i, ns in enumerate(self.hosts):
            self.segment.attach(ns, "eth0", f"192.0.2.{i + 1}/24", mtu=1500)
            run(ns, "ip", "link", "add", "dummy0", "type", "bridge")
            run(ns, "ip", "link", "set", "dummy0", "up")

    def ip(self, i: int) -> str:
        return f"192.0.2.{i + 1}"

    def up(self, i: int, subnet: str) -> UdpNetwork:
        ns = self.hosts[i]
        run(ns, "ip", "addr", "flush", "dev", "dummy0")
        run(ns, "ip", "addr", "add", f"{IPv4Network(subnet)[1]}/24", "dev", "dummy0")
        backend = UdpBackend(UdpOptions(offload=self.offload))
        network = call_in_netns(ns, backend.prepare, CONFIG, host(self.ip(i)))
        assert isinstance(network, UdpNetwork)
        own = lease(subnet, self.ip(i))
        call_in_netns(ns, network.activate, own)
        self.networks[i], self.leases[i] = network, own
        return network

    def reconcile(self, i: int, peers: list[Lease] | None = None) -> planmod.Plan[object]:
        network = self.networks[i]
        peers = list(self.leases.values()) if peers is None else peers
        desired = network.desired_state(self.leases[i], peers)
        change = planmod.diff(desired, call_in_netns(self.hosts[i], network.actual_state))
        call_in_netns(self.hosts[i], network.apply, change)
        return change

    def ping(self, i: int, dst: str, count: int = 2) -> bool:
        src = str(IPv4Network(str(self.leases[i].subnet))[1])
        out = run(self.hosts[i], "ping", "-c", str(count), "-i", "0.2", "-W", "1", "-I", src, dst, check=False)
        return out.returncode == 0

    def close(self) -> None:
        for network in self.networks.values():
            if network.forwarder is not None:
                network.forwarder.stop()


@pytest.fixture
def lab(netns_factory: Callable[[str], str]) -> Iterator[Callable[..., Lab]]:
    made: list[Lab] = []

    def make(count: int, offload: bool = True) -> Lab:
        made.append(Lab(netns_factory, count, offload))
        return made[-1]

    try:
        yield make
    finally:
        for item in made:
            item.close()


def wait(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytestmark_root
@pytest.mark.parametrize("offload", [True, False], ids=["offload", "plain"])
def test_two_hosts_reach_each_other_and_the_kernel_holds_what_we_said(lab, offload: bool) -> None:
    lab = lab(2, offload)
    a, b = lab.up(0, "10.44.1.0/24"), lab.up(1, "10.44.2.0/24")
    lab.reconcile(0)
    lab.reconcile(1)
    assert lab.reconcile(0).empty, "a second pass must change nothing"
    link = ip_json(lab.hosts[0], "-d", "link", "show", "flannel0")[0]
    assert link["mtu"] == 1472 and link["linkinfo"]["info_kind"] == "tun"
    addrs = ip_json(lab.hosts[0], "addr", "show", "flannel0")[0]["addr_info"]
    assert [(x["local"], x["prefixlen"]) for x in addrs if x["family"] == "inet"] == [("10.44.1.0", 32)]
    routes = ip_json(lab.hosts[0], "route", "show", "proto", "79")
    assert [(r["dst"], r["dev"]) for r in routes] == [("10.44.0.0/16", "flannel0")]
    assert lab.ping(0, "10.44.2.1") and lab.ping(1, "10.44.1.1")
    # bulk TCP-sized traffic through both paths: large pings are fragmented/reassembled fine
    big = run(lab.hosts[0], "ping", "-c", "3", "-s", "4000", "-I", "10.44.1.1", "10.44.2.1", check=False)
    assert big.returncode == 0, big.stdout
    counters = call_in_netns(lab.hosts[0], a.counters)
    assert counters["tx_packets"] >= 5 and counters["rx_packets"] >= 5 and counters["tx_bytes"] > 0
    assert call_in_netns(lab.hosts[1], b.counters)["rx_spoofed"] == 0


@pytestmark_root
def test_unknown_destination_gets_net_unreachable(lab) -> None:
    lab = lab(2)
    lab.up(0, "10.44.1.0/24")
    lab.up(1, "10.44.2.0/24")
    lab.reconcile(0)
    out = run(lab.hosts[0], "ping", "-c", "1", "-W", "1", "-I", "10.44.1.1", "10.44.77.1", check=False)
    assert "From 10.44.77.1" in out.stdout and "Destination Net Unreachable" in out.stdout, out.stdout


def send_datagram(ns: str, bind: str, dst: str, packet: bytes) -> None:
    script = (
        "import socket,sys;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);"
        f"s.bind(({bind!r},0));s.sendto(bytes.fromhex(sys.argv[1]),({dst!r},8285))"
    )
    subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", script, packet.hex()], check=True)


def echo_request(src: str, dst: str) -> bytes:
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 1, 1)) + b"spoof"
    struct.pack_into("!H", icmp, 2, reference_checksum(bytes(icmp)))
    return bytes(ip_header(src, dst, 1, len(icmp))) + bytes(icmp)


@pytestmark_root
def test_spoofed_datagrams_are_dropped_and_counted(lab) -> None:
    lab = lab(3)
    a = lab.up(0, "10.44.1.0/24")
    lab.up(1, "10.44.2.0/24")
    lab.reconcile(0, [lab.leases[0], lab.leases[1]])  # host 2 is no peer of host 0
    run(lab.hosts[0], "sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=0")
    before = call_in_netns(lab.hosts[0], a.counters)
    send_datagram(lab.hosts[2], lab.ip(2), lab.ip(0), echo_request("10.44.3.1", "10.44.1.1"))  # a non-peer
    send_datagram(lab.hosts[1], lab.ip(1), lab.ip(0), echo_request("10.44.9.9", "10.44.1.1"))  # outside b's lease
    assert wait(lambda: call_in_netns(lab.hosts[0], a.counters)["rx_spoofed"] == before["rx_spoofed"] + 2)
    after = call_in_netns(lab.hosts[0], a.counters)
    assert after["rx_packets"] == before["rx_packets"] and after["rx_drops"] == before["rx_drops"] + 2
    # the same packet from inside the sender's lease is delivered
    send_datagram(lab.hosts[1], lab.ip(1), lab.ip(0), echo_request("10.44.2.1", "10.44.1.1"))
    assert wait(lambda: call_in_netns(lab.hosts[0], a.counters)["rx_packets"] == before["rx_packets"] + 1)


@pytestmark_root
def test_lease_change_reroutes_without_restarting_the_forwarder(lab) -> None:
    lab = lab(3)
    a = lab.up(0, "10.44.1.0/24")
    lab.up(1, "10.44.2.0/24")
    lab.reconcile(0)
    lab.reconcile(1)
    assert lab.ping(0, "10.44.2.1")
    assert a.forwarder is not None
    pid = a.forwarder.pid
    # host 1 goes away; host 2 takes over 10.44.2.0/24 (a lease's PublicIP changes)
    lab.networks[1].forwarder.stop()  # type: ignore[union-attr]
    run(lab.hosts[1], "ip", "link", "set", "eth0", "down")
    del lab.networks[1], lab.leases[1]
    lab.up(2, "10.44.2.0/24")
    lab.reconcile(2)
    change = lab.reconcile(0)
    assert Forward(IPv4Network("10.44.2.0/24"), IPv4Address(lab.ip(2))) in change.add
    assert lab.ping(0, "10.44.2.1")
    assert a.forwarder.pid == pid


@pytestmark_root
def test_a_killed_forwarder_is_restarted_by_the_next_pass(lab) -> None:
    lab = lab(2)
    a = lab.up(0, "10.44.1.0/24")
    lab.up(1, "10.44.2.0/24")
    lab.reconcile(0)
    lab.reconcile(1)
    assert a.forwarder is not None and lab.ping(0, "10.44.2.1")
    before = call_in_netns(lab.hosts[0], a.counters)
    old = a.forwarder.pid
    assert old is not None
    os.kill(old, signal.SIGKILL)
    assert wait(lambda: not a.forwarder.alive)  # type: ignore[union-attr]
    assert not lab.ping(0, "10.44.2.1", count=1)
    change = lab.reconcile(0)
    assert Forward(IPv4Network("10.44.2.0/24"), IPv4Address(lab.ip(1))) in change.add
    assert a.forwarder.pid not in (None, old)
    assert lab.ping(0, "10.44.2.1")
    after = call_in_netns(lab.hosts[0], a.counters)
    assert after["restarts"] == 1 and after["tx_packets"] > before["tx_packets"]


@pytestmark_root
def test_interop_with_a_plain_flannel_style_forwarder(lab) -> None:
    """Host 1 runs a minimal flannel-style forwarder (one packet per datagram, no offloads); bulk
    TCP from our offloading side arrives as ordinary checksummed IP packets."""
    lab = lab(2)
    lab.up(0, "10.44.1.0/24")
    ns = lab.hosts[1]
    run(ns, "ip", "addr", "add", "10.44.2.1/24", "dev", "dummy0")
    peer = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, str(PEER_SCRIPT), "flannel0", lab.ip(1),
         f"10.44.0.0/16={lab.ip(0)}"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
        run(ns, "ip", "addr", "add", "10.44.2.0/32", "dev", "flannel0")
        run(ns, "ip", "link", "set", "flannel0", "mtu", "1472", "up")
        run(ns, "ip", "route", "add", "10.44.0.0/16", "dev", "flannel0")
        lab.leases[1] = lease("10.44.2.0/24", lab.ip(1))
        lab.reconcile(0)
        assert lab.ping(0, "10.44.2.1")
        server = subprocess.Popen(["ip", "netns", "exec", ns, "iperf3", "-s", "-1", "-B", "10.44.2.1", "-p", "5301"],
                                  stdout=subprocess.DEVNULL)  # fmt: skip
        try:
            time.sleep(0.5)
            out = run(lab.hosts[0], "iperf3", "-c", "10.44.2.1", "-B", "10.44.1.1", "-p", "5301", "-t", "2", "-J",
                      check=False, timeout=60)  # fmt: skip
            assert out.returncode == 0, out.stdout[-500:]
            stats = __import__("json").loads(out.stdout)["end"]
            assert stats["sum_received"]["bytes"] > 1_000_000
        finally:
            server.wait(10)
        # and the flannel peer reading our datagrams saw only whole, MTU-sized IP packets: the kernel
        # on its side would have dropped a bad checksum (TcpInCsumErrors stays 0)
        snmp = run(ns, "nstat", "-az", "TcpInCsumErrors").stdout
        assert " 0 " in snmp.split("TcpInCsumErrors", 1)[1][:40], snmp
    finally:
        peer.kill()
        peer.wait()


@pytest.mark.parametrize("size", [0, 1, 2, 3, 31, 32, 33, 1420, 1421, 65000])
def test_payload_sum_is_the_byte_swapped_rfc1071_sum(size: int) -> None:
    data = os.urandom(size)
    want = (~reference_checksum(data)) & 0xFFFF  # the folded big-endian sum
    got = (udpfwd.payload_sum(data) << 8) % 0xFFFF
    assert got == want % 0xFFFF
