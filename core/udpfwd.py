"""The udp backend's datapath: a userspace forwarder between a TUN device and a UDP socket.

Wire format (flannel's ``backend/udp``): one whole IPv4 packet per UDP datagram, sent to the
peer's PublicIP on the backend port (8285), no header of our own.  A flannel-style peer (a C
poll loop reading one packet per ``read`` and sending it with one ``sendto``) interoperates with
this one in both directions; every datagram we send is an ordinary, checksummed IP packet.

Why it looks the way it does (figures in docs/backends/udp.md):

* **Syscalls per byte are the wall**, not Python: a plain loop (one ``read`` + one ``sendto``
  per packet) tops out near a C forwarder written the same way.  So the fast path asks the
  kernel for fewer, bigger units: the TUN queue is opened with ``IFF_VNET_HDR`` and TSO
  (:mod:`overlayd.tun`), so one ``read`` returns a whole TCP segment of up to 64 KB; it is cut
  here into MTU-sized TCP/IP packets (headers rewritten, checksums computed with one big-integer
  modulo each, RFC 1071's sum being the number modulo 0xFFFF) and handed to the socket in one
  ``sendmsg`` with ``UDP_SEGMENT`` (UDP GSO), which the kernel splits into one datagram per
  packet.  On receive, ``UDP_GRO`` returns a train of datagrams from one sender in one
  ``recvmsg``.  Each step falls back to the per-packet path when the kernel refuses it.
* **A child process, not a thread.**  The forwarder holds the GIL almost all the time, the
  daemon needs it for etcd and netlink: in one process each would slow the other, and a
  crash could not be told from a hang.  The child is ``python -m overlayd.udpfwd``; the daemon
  keeps a ``SOCK_SEQPACKET`` socketpair to it.  EOF on that socket (the daemon died) ends the
  child, so a forwarder never outlives its daemon and holds the port against the next one.
* **The table is swapped, never edited.**  A table message carries the whole peer list; the
  child builds an immutable :class:`Table` and replaces its reference between two packets, so
  a lease change re-routes without stopping the datapath or restarting the process.
* **Spoofing guard**: a datagram is written to the TUN only when its inner source address lies
  in a subnet leased by the datagram's sender (the table maps sender IP to its subnets);
  anything else is dropped and counted.  An unknown destination gets ICMP net-unreachable back
  through the TUN and TTL expiry gets ICMP time-exceeded (flannel drops the latter silently).
  Their source is the unreachable destination itself: an error from the TUN's own address
  would arrive with a local source and be dropped as a martian by this very host.

Link: https://github.com/flannel-io/flannel/tree/master/pkg/backend/udp
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from . import tun
from .errors import KernelError

log = logging.getLogger(__name__)

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
BATCH = 64  # packets handled per wakeup and source, so neither direction starves the other
MAX_UDP_PAYLOAD = 65507
UDP_MAX_SEGMENTS = 64
CTL_BUFFER = 4 << 20
CTL_TIMEOUT = 5.0
RECV_BUFFER = 1 << 16
SOCKET_BUFFER = 4 << 20

ICMP_UNREACH, ICMP_NET_UNREACH = 3, 0
ICMP_TIME_EXCEEDED = 11
ICMP_ERROR_TYPES = frozenset({3, 4, 5, 11, 12})
TCP_FIN, TCP_PSH, TCP_CWR = 0x01, 0x08, 0x80

ZERO_VNET_HDR = bytes(tun.VNET_HDR_LEN)
COUNTERS = ("tx_packets", "tx_bytes", "tx_drops", "rx_packets", "rx_bytes", "rx_drops", "rx_spoofed")


# -- packets (pure) --------------------------------------------------------------------------------


def _words(data: bytes | bytearray | memoryview) -> int:
    """A number congruent to the one's-complement sum of *data*'s 16-bit words, modulo 0xFFFF."""
    value = int.from_bytes(data, "big")
    return value << 8 if len(data) & 1 else value


def payload_sum(data: bytes | bytearray | memoryview) -> int:
    """The one's-complement sum of *data* read as little-endian words, modulo 0xFFFF (RFC 1071's
    sum is byte-order independent: the big-endian sum is this one times 256).

    Two ``int.from_bytes`` of the halves (split at an even offset, so both stay word-aligned)
    and one modulo of the half-size sum: about twice as fast as one modulo of the whole, since a
    long integer divides digit by digit while conversion and addition run near memory speed."""
    half = (len(data) >> 2) << 1
    return (int.from_bytes(data[:half], "little") + int.from_bytes(data[half:], "little")) % 0xFFFF


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """The Internet checksum (RFC 1071) of *data*, plus a partial sum *initial*; never 0."""
    return 0xFFFF - (_words(data) + initial) % 0xFFFF


def decrement_ttl(packet: bytearray | memoryview) -> bool:
    """Decrement the IPv4 TTL in place, updating the header checksum (RFC 1624); False when it
    has expired (the packet must not be forwarded)."""
    if packet[8] <= 1:
        return False
    packet[8] -= 1
    value = ((packet[10] << 8) | packet[11]) + 0x0100
    value = (value & 0xFFFF) + (value >> 16)
    packet[10], packet[11] = value >> 8, value & 0xFF
    return True


def icmp_error(packet: bytes | bytearray | memoryview, kind: int, code: int, source: bytes) -> bytes | None:
    """The ICMP error (RFC 792) *source* sends about *packet*, or None when none may be sent
    (about an ICMP error, a non-first fragment, or a packet too short to quote)."""
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    if len(packet) < ihl + 8 or ((packet[6] & 0x1F) << 8 | packet[7]):
        return None
    if packet[9] == 1 and packet[ihl] in ICMP_ERROR_TYPES:
        return None
    body = bytearray(struct.pack("!BBHI", kind, code, 0, 0)) + bytes(packet[: ihl + 8])
    struct.pack_into("!H", body, 2, checksum(body))
    destination = bytes(packet[12:16])
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 0, 0, 64, 1, 0, source, destination))
    struct.pack_into("!H", header, 10, checksum(header))
    return bytes(header + body)


def finish_checksum(packet: bytearray | memoryview, start: int, offset: int) -> None:
    """Complete a partial (CHECKSUM_PARTIAL) transport checksum: the field holds the pseudo-header
    sum; the checksum of everything from *start* goes there."""
    at = start + offset
    struct.pack_into("!H", packet, at, checksum(packet[start:]))


def segment_tcp(packet: memoryview, mss: int) -> tuple[int, list[bytes | bytearray | memoryview]]:
    """Cut a TSO super-segment (IPv4 + TCP, any length) into packets of at most *mss* payload
    bytes, as the kernel's ``tcp_gso_segment`` would: returns the full size of every packet
    but the last, and the pieces (header, payload, header, payload, ...) to send.

    The header fields that vary per segment (IP length and ID, TCP sequence number and flags)
    are zeroed in a template summed once; each segment adds its own values to that sum, so
    only the payload is read per segment (:func:`payload_sum`)."""
    ihl = (packet[0] & 0x0F) * 4
    thl = (packet[ihl + 12] >> 4) * 4
    hl = ihl + thl
    payload = packet[hl:]
    size = len(payload)
    template = bytearray(packet[:hl])
    ip_id = (template[4] << 8) | template[5]
    seq = int.from_bytes(template[ihl + 4 : ihl + 8], "big")
    flags = template[ihl + 13]
    template[2:6] = b"\0\0\0\0"
    template[10:12] = b"\0\0"
    template[ihl + 4 : ihl + 8] = b"\0\0\0\0"
    template[ihl + 13] = 0
    template[ihl + 16 : ihl + 18] = b"\0\0"
    ip_base = int.from_bytes(template[:ihl], "big")
    tcp_base = int.from_bytes(template[ihl:], "big") + int.from_bytes(template[12:20], "big") + 6 + thl
    pack = struct.pack_into
    pieces: list[bytes | bytearray | memoryview] = []
    for index, offset in enumerate(range(0, size, mss)):
        chunk = payload[offset : offset + mss]
        length = len(chunk)
        total = hl + length
        ident = (ip_id + index) & 0xFFFF
        own = flags
        if offset + mss < size:
            own &= ~(TCP_FIN | TCP_PSH)
        if index:
            own &= ~TCP_CWR
        number = (seq + offset) & 0xFFFFFFFF
        data = payload_sum(chunk) << 8
        header = template[:]
        pack("!HH", header, 2, total, ident)
        pack("!H", header, 10, 0xFFFF - (ip_base + total + ident) % 0xFFFF)
        pack("!I", header, ihl + 4, number)
        header[ihl + 13] = own
        tcp_sum = tcp_base + length + (number >> 16) + (number & 0xFFFF) + own + data
        pack("!H", header, ihl + 16, 0xFFFF - tcp_sum % 0xFFFF)
        pieces += (header, chunk)
    return hl + mss, pieces


def _tcp_key(packet: memoryview) -> bytes | None:
    """What must be equal for two TCP/IPv4 packets to be merged, or None when *packet* cannot be
    (IP options, a fragment, flags other than ACK/PSH): addresses, ports, ack, window and TCP
    options, as the kernel's ``tcp_gro_receive`` compares them (the merged packet keeps the
    first one's TOS and TTL)."""
    if len(packet) < 40 or packet[0] != 0x45 or packet[9] != 6 or (packet[6] & 0x3F) or packet[7]:
        return None
    hl = 20 + (packet[32] >> 4) * 4
    if hl < 40 or len(packet) < hl or packet[33] & ~TCP_PSH != 0x10:
        return None
    head = bytes(packet[12:hl])
    return head[:12] + head[16:21] + head[22:24] + head[26:]  # all but the sequence number, flags and checksum


def coalesce_tcp(packets: Sequence[memoryview]) -> list[tuple[bytes, list[bytes | bytearray | memoryview]]]:
    """Merge runs of consecutive segments of one TCP flow into GSO super-segments for the TUN.

    Returns ``(virtio_net_hdr, pieces)`` per write: a run of two or more becomes one IPv4/TCP
    packet with the first header, the payloads in order, ``GSO_TCPV4`` with the run's segment
    size and a partial checksum (the kernel finishes or segments it, like a packet GRO made);
    anything else is written as it came, with an empty header.  A run ends at a gap in sequence
    numbers, a short segment, a PSH, or a header that differs."""
    out: list[tuple[bytes, list[bytes | bytearray | memoryview]]] = []
    run: list[memoryview] = []
    run_key: bytes | None = None
    mss = next_seq = 0

    def flush() -> None:
        if len(run) == 1:
            out.append((ZERO_VNET_HDR, [run[0]]))
        elif run:
            first, last = run[0], run[-1]
            thl = (first[32] >> 4) * 4
            hl = 20 + thl
            payloads = [p[hl:] for p in run]
            tcp_len = thl + sum(len(p) for p in payloads)
            header = bytearray(first[:hl])
            struct.pack_into("!H", header, 2, 20 + tcp_len)
            header[10:12] = b"\0\0"
            struct.pack_into("!H", header, 10, checksum(header[:20]))
            header[33] = last[33]
            pseudo = (int.from_bytes(header[12:20], "big") + 6 + tcp_len) % 0xFFFF or 0xFFFF
            struct.pack_into("!H", header, 36, pseudo)
            vnet = tun.VNET_HDR.pack(tun.VIRTIO_NET_HDR_F_NEEDS_CSUM, tun.VIRTIO_NET_HDR_GSO_TCPV4, hl, mss, 20, 16)
            out.append((vnet, [header, *payloads]))
        run.clear()

    for packet in packets:
        key = _tcp_key(packet)
        if key is None:
            flush()
            run_key = None
            out.append((ZERO_VNET_HDR, [packet]))
            continue
        hl = 20 + (packet[32] >> 4) * 4
        size = len(packet) - hl
        seq = int.from_bytes(packet[24:28], "big")
        if run and (key != run_key or seq != next_seq or size > mss):
            flush()
        if not run:
            run_key, mss = key, size
        run.append(packet)
        next_seq = (seq + size) & 0xFFFFFFFF
        if size < mss or packet[33] & TCP_PSH or size == 0:
            flush()
    flush()
    return out


# -- the forwarding table --------------------------------------------------------------------------


class Table:
    """An immutable forwarding table: destination subnet -> peer, and peer -> its subnets.

    Lookups are one dict probe per distinct prefix length (flannel's leases all share one).
    """

    __slots__ = ("_by_length", "_sources", "routes")

    def __init__(self, routes: Iterable[tuple[IPv4Network, IPv4Address]] = ()) -> None:
        self.routes: tuple[tuple[IPv4Network, IPv4Address], ...] = tuple(sorted(routes))
        by_length: dict[int, dict[int, str]] = {}
        sources: dict[str, list[tuple[int, int]]] = {}
        for subnet, peer in self.routes:
            mask = int(subnet.netmask)
            by_length.setdefault(mask, {})[int(subnet.network_address)] = str(peer)
            sources.setdefault(str(peer), []).append((int(subnet.network_address), mask))
        self._by_length = tuple(sorted(by_length.items(), reverse=True))
        self._sources = {peer: tuple(nets) for peer, nets in sources.items()}

    def lookup(self, dst: int) -> str | None:
        """The peer owning IPv4 address *dst* (as an int), or None."""
        for mask, nets in self._by_length:
            peer = nets.get(dst & mask)
            if peer is not None:
                return peer
        return None

    def subnets_of(self, sender: str) -> tuple[tuple[int, int], ...] | None:
        """``(network, mask)`` pairs leased by *sender*, or None when it is not a peer."""
        return self._sources.get(sender)

    def encode(self) -> bytes:
        return json.dumps({"op": "table", "routes": [[str(s), str(p)] for s, p in self.routes]}).encode()

    @classmethod
    def decode(cls, message: Mapping[str, Any]) -> Table:
        return cls((IPv4Network(s), IPv4Address(p)) for s, p in message["routes"])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Table) and self.routes == other.routes

    def __hash__(self) -> int:
        return hash(self.routes)

    def __len__(self) -> int:
        return len(self.routes)


# -- the child process -----------------------------------------------------------------------------


class Forwarder:
    """The loop run in the child: epoll over the TUN queue, the UDP socket and the control socket."""

    def __init__(self, settings: Mapping[str, Any], ctl: socket.socket) -> None:
        self.device = str(settings["device"])
        self.port = int(settings["port"])
        self.ctl = ctl
        self.table = Table()
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.tun_fd, self.offload = tun.attach(self.device, vnet_hdr=bool(settings["offload"]))
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            self.sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
        self.sock.bind((str(settings["bind"]), self.port))
        self.gso = self.gro = False
        if self.offload:
            try:
                self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
                self.gro = True
            except OSError:
                log.info("UDP GRO unavailable; receiving one datagram per call")
            self.gso = True  # proven by the first send; a refusal turns it off
        self.vnet = tun.VNET_HDR_LEN if self.offload else 0
        self.rbuf = bytearray(RECV_BUFFER)
        self.tbuf = bytearray(RECV_BUFFER + tun.VNET_HDR_LEN)
        self.ctl_buf = bytearray(CTL_BUFFER)
        self.zero_hdr = bytes(tun.VNET_HDR_LEN)
        self.addrs: dict[str, tuple[str, int]] = {}

    def status(self) -> dict[str, Any]:
        return {
            **self.counters,
            "pid": os.getpid(),
            "offload": self.offload,
            "gso": self.gso,
            "gro": self.gro,
            "routes": len(self.table),
        }

    def run(self) -> None:
        poller = select.epoll()
        tun_fd, sock_fd, ctl_fd = self.tun_fd, self.sock.fileno(), self.ctl.fileno()
        for fd in (tun_fd, sock_fd, ctl_fd):
            poller.register(fd, select.EPOLLIN)
        self.ctl.sendall(json.dumps({"ready": True, **self.status()}).encode())
        while True:
            for fd, _ in poller.poll():
                if fd == tun_fd:
                    self.from_tun()
                elif fd == sock_fd:
                    self.from_udp()
                elif not self.control():
                    return

    # -- control ------------------------------------------------------------------------------

    def control(self) -> bool:
        try:
            size = self.ctl.recv_into(self.ctl_buf)
        except BlockingIOError:
            return True
        if size == 0:
            return False  # the daemon is gone: so are we
        message = json.loads(bytes(self.ctl_buf[:size]))
        if message.get("op") == "table":
            self.table = Table.decode(message)
        self.ctl.sendall(json.dumps(self.status()).encode())
        return True

    # -- TUN -> UDP ------------------------------------------------------------------------------

    def _to_tun(self, packet: bytes | memoryview) -> None:
        try:
            if self.vnet:
                os.writev(self.tun_fd, (self.zero_hdr, packet))
            else:
                os.write(self.tun_fd, packet)
        except OSError as exc:
            log.debug("write to %s failed: %s", self.device, exc)

    def _reject(self, packet: memoryview, kind: int, code: int) -> None:
        self.counters["tx_drops"] += 1
        reply = icmp_error(packet, kind, code, bytes(packet[16:20]))
        if reply is not None:
            self._to_tun(reply)

    def from_tun(self) -> None:
        buf, vnet = self.tbuf, self.vnet
        view = memoryview(buf)
        counters = self.counters
        for _ in range(BATCH):
            try:
                size = os.readv(self.tun_fd, (buf,))
            except BlockingIOError:
                return
            packet = view[vnet:size]
            if len(packet) < 20 or packet[0] >> 4 != 4:
                counters["tx_drops"] += 1
                continue
            peer = self.table.lookup(int.from_bytes(packet[16:20], "big"))
            if peer is None:
                self._reject(packet, ICMP_UNREACH, ICMP_NET_UNREACH)
                continue
            if not decrement_ttl(packet):
                self._reject(packet, ICMP_TIME_EXCEEDED, 0)
                continue
            addr = self.addrs.get(peer)
            if addr is None:
                addr = self.addrs[peer] = (peer, self.port)
            if vnet:
                flags, gso_type, _, gso_size, csum_start, csum_offset = tun.VNET_HDR.unpack_from(buf)
                if gso_type:
                    if gso_type & ~tun.VIRTIO_NET_HDR_GSO_ECN == tun.VIRTIO_NET_HDR_GSO_TCPV4 and gso_size:
                        self._send_segments(packet, gso_size, addr)
                    else:
                        counters["tx_drops"] += 1  # never asked for (no UFO/USO/TSO6 offered)
                    continue
                if flags & tun.VIRTIO_NET_HDR_F_NEEDS_CSUM:
                    finish_checksum(packet, csum_start, csum_offset)
            try:
                self.sock.sendto(packet, addr)
            except OSError:
                counters["tx_drops"] += 1
                continue
            counters["tx_packets"] += 1
            counters["tx_bytes"] += len(packet)

    def _send_segments(self, packet: memoryview, mss: int, addr: tuple[str, int]) -> None:
        seg_len, pieces = segment_tcp(packet, mss)
        count = len(pieces) // 2
        counters = self.counters
        if self.gso:
            per_send = min(UDP_MAX_SEGMENTS, MAX_UDP_PAYLOAD // seg_len) * 2
            cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg_len))]
            try:
                for first in range(0, len(pieces), per_send):
                    self.sock.sendmsg(pieces[first : first + per_send], cmsg, 0, addr)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    counters["tx_drops"] += count
                    return
                log.info("UDP GSO refused (%s); sending one datagram per packet", exc)
                self.gso = False
            else:
                counters["tx_packets"] += count
                counters["tx_bytes"] += sum(map(len, pieces))
                return
        for index in range(0, len(pieces), 2):
            try:
                self.sock.sendmsg(pieces[index : index + 2], (), 0, addr)
            except OSError:
                counters["tx_drops"] += 1
                continue
            counters["tx_packets"] += 1
            counters["tx_bytes"] += len(pieces[index]) + len(pieces[index + 1])

    # -- UDP -> TUN ------------------------------------------------------------------------------

    def from_udp(self) -> None:
        buf = self.rbuf
        view = memoryview(buf)
        counters = self.counters
        ancillary = socket.CMSG_SPACE(4) if self.gro else 0
        for _ in range(BATCH):
            try:
                size, ancdata, _, sender = self.sock.recvmsg_into((buf,), ancillary, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                counters["rx_drops"] += 1
                continue
            step = size
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO:
                    step = struct.unpack("=i", data[:4])[0] or size
            nets = self.table.subnets_of(sender[0])
            if nets is None:  # not a peer: nothing it sends is delivered
                dropped = len(range(0, size, step))
                counters["rx_drops"] += dropped
                counters["rx_spoofed"] += dropped
                continue
            (net, mask), more = nets[0], len(nets) > 1
            batch = []
            spoofed = 0
            received = view[:size]
            for offset in range(0, size, step):
                packet = received[offset : offset + step]
                if len(packet) < 20 or packet[0] >> 4 != 4:
                    counters["rx_drops"] += 1
                    continue
                source = int.from_bytes(packet[12:16], "big")
                if source & mask != net and not (more and any(source & m == n for n, m in nets)):
                    spoofed += 1
                    continue
                batch.append(packet)
            if spoofed:
                counters["rx_drops"] += spoofed
                counters["rx_spoofed"] += spoofed
            counters["rx_packets"] += len(batch)
            counters["rx_bytes"] += sum(map(len, batch))
            if self.vnet and len(batch) > 1:
                for header, pieces in coalesce_tcp(batch):
                    self._writev((header, *pieces))
            else:
                for packet in batch:
                    self._to_tun(packet)

    def _writev(self, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        try:
            os.writev(self.tun_fd, pieces)
        except OSError as exc:
            log.debug("write to %s failed: %s", self.device, exc)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m overlayd.udpfwd SETTINGS_JSON CTL_FD``: run one forwarder until the daemon goes."""
    args = list(sys.argv[1:] if argv is None else argv)
    gc.freeze()  # the loop allocates only short-lived objects: no collector passes over the rest
    logging.basicConfig(level=logging.INFO, format="udpfwd[%(process)d] %(levelname)s %(message)s")
    settings = json.loads(args[0])
    ctl = socket.socket(fileno=int(args[1]))
    try:
        forwarder = Forwarder(settings, ctl)
    except (OSError, KernelError) as exc:
        ctl.sendall(json.dumps({"ready": False, "error": str(exc)}).encode())
        return 1
    forwarder.run()
    return 0


# -- the daemon's side -----------------------------------------------------------------------------


class ForwarderProcess:
    """The daemon's handle on one forwarder child: start, push a table, read counters, stop.

    Calls are synchronous request/reply on the socketpair, with a timeout, under one lock: the
    daemon's loop pushes tables while the metrics thread reads counters.  Counters of children
    that died are kept in :attr:`past` so totals survive a restart.
    """

    def __init__(self, device: str, bind: IPv4Address, port: int, offload: bool) -> None:
        self.settings = {"device": device, "bind": str(bind), "port": port, "offload": offload}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctl: socket.socket | None = None
        self.table: Table | None = None  # what the running child holds
        self.last: dict[str, Any] = {}
        self.past = dict.fromkeys(COUNTERS, 0)
        self.starts = 0
        self._lock = threading.RLock()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        with self._lock:
            self._start()

    def _start(self) -> None:
        self._stop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for sock in (ours, theirs):
            for option in (getattr(socket, "SO_SNDBUFFORCE", 32), getattr(socket, "SO_RCVBUFFORCE", 33)):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, option, CTL_BUFFER)
                except OSError:
                    pass
        argv = [sys.executable, "-m", "overlayd.udpfwd", json.dumps(self.settings), str(theirs.fileno())]
        try:
            self.proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise KernelError(f"cannot start the udp forwarder: {exc}") from exc
        finally:
            theirs.close()
        self.ctl = ours
        self.table = None
        self.last = {}
        hello = self._receive()
        if not hello.get("ready"):
            self.stop()
            raise KernelError(f"the udp forwarder did not start: {hello.get('error', 'no reason given')}")
        self.starts += 1
        self.last = hello
        log.info(
            "udp forwarder running (pid %s, offload %s, UDP GSO %s, UDP GRO %s)",
            hello["pid"], hello["offload"], hello["gso"], hello["gro"],
        )  # fmt: skip

    def _receive(self) -> dict[str, Any]:
        assert self.ctl is not None
        self.ctl.settimeout(CTL_TIMEOUT)
        try:
            data = self.ctl.recv(CTL_BUFFER)
        except OSError as exc:
            raise KernelError(f"the udp forwarder does not answer: {exc}") from exc
        if not data:
            raise KernelError("the udp forwarder exited")
        reply: dict[str, Any] = json.loads(data)
        return reply

    def _request(self, message: bytes) -> dict[str, Any]:
        if self.ctl is None or not self.alive:
            raise KernelError("the udp forwarder is not running")
        try:
            self.ctl.sendall(message)
        except OSError as exc:
            raise KernelError(f"the udp forwarder does not listen: {exc}") from exc
        reply = self._receive()
        self.last = reply
        return reply

    def push(self, table: Table) -> None:
        """Give the child *table* (it swaps it in between two packets)."""
        with self._lock:
            self._request(table.encode())
            self.table = table

    def counters(self) -> dict[str, int]:
        """Totals since the first start: the live child's counters plus those of dead ones."""
        with self._lock:
            if self.alive:
                try:
                    self._request(b'{"op": "stats"}')
                except KernelError:
                    pass
            return {name: self.past[name] + int(self.last.get(name, 0)) for name in COUNTERS}

    def stop(self) -> None:
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self.ctl is not None:
            self.ctl.close()
            self.ctl = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        for name in COUNTERS:
            self.past[name] += int(self.last.get(name, 0))
        self.last = {}
        self.table = None


if __name__ == "__main__":
    sys.exit(main())
