"""The kernel-state cache: overlayd's routes, neighbours and FDB entries, kept from netlink notifications.

Why: a full read-back of the kernel (every route, neighbour and FDB entry, decoded by pyroute2 at
about 0.25 ms a message) per reconcile pass made one event cost O(cluster) — at 1000 peers it was
three quarters of the daemon's CPU.  Calico's felix keeps a dataplane cache instead; so do we:

* **Read fully once, then listen.**  :meth:`KernelCache.open` subscribes a netlink socket to the
  route (``RTNLGRP_IPV4_ROUTE``, ``RTNLGRP_IPV6_ROUTE``), neighbour (``RTNLGRP_NEIGH``: ARP, IPv6
  NDP *and* the VXLAN FDB, which the kernel reports as ``AF_BRIDGE`` neighbours) and link
  (``RTNLGRP_LINK``) groups *before*
  dumping, so nothing that happens during the dump is missed.  :meth:`KernelCache.drain` reads
  what is pending without blocking and updates the cache; each slot (the kernel objects' ``key``,
  as :mod:`overlayd.plan` uses it) whose content changed is remembered until
  :meth:`KernelCache.take_changes`, so the reconciler re-checks only those slots.  Our own writes
  come back the same way, which keeps the cache right even when an apply fails half way.
* **What notifications do not say.**  IPv4 removes the routes through a device that goes down or
  disappears without sending ``RTM_DELROUTE`` (``fib_sync_down_dev``/``fib_flush`` in
  net/ipv4/fib_semantics.c, fib_frontend.c); the link group tells us, so a deleted device drops
  everything cached on it and a device going down (or being renamed) asks for a resync.  IPv6
  does the same (``rt6_sync_down_dev`` cleans with ``skip_notify``).  The same silent flush
  happens when a device loses its last IPv4 address (``fib_disable_ip``), so an address removed
  from a device our objects use (``RTNLGRP_IPV4_IFADDR``, ``RTNLGRP_IPV6_IFADDR``) asks for one too.
* **Both families, one code path.**  Routes and neighbours are dumped and decoded per address
  family with the family as a parameter; an IPv6 route added without a metric carries the
  kernel's 1024 (``IP6_RT_PRIO_USER``), read back as metric 0 like :func:`overlayd.netlink.read_routes`.
* **Overrun.**  When the socket's receive buffer overflows the kernel drops notifications and the
  next ``recv`` fails with ``ENOBUFS`` (netlink(7)); the cache cannot know what it missed, so it
  sets :attr:`KernelCache.needs_resync` and the next :meth:`KernelCache.resync` re-reads
  everything.  The buffer is enlarged (``SO_RCVBUFFORCE``, we run as root) so that programming
  thousands of peers at once does not normally overrun it.
* **A cheap full dump.**  With ``NETLINK_GET_STRICT_CHK`` (Linux >= 4.20) the kernel filters
  dumps itself: routes by table and protocol (``ip_valid_fib_dump_req``), neighbours by device
  (``NDA_IFINDEX``, ``neigh_valid_dump_req``), FDB entries by device (``ndm_ifindex``,
  ``valid_fdb_dump_strict`` in net/core/rtnetlink.c).  Messages are decoded here with ``struct``,
  only the header and the few attributes the cache uses; everything else is skipped unparsed.
  The same filters are applied in user space too, so an older kernel that ignores them (or
  refuses strict checking) gets the same answer, only slower.  ``bench/kernel_dump.py`` measures
  both gains against :func:`overlayd.netlink.read_routes` & co.
* **Slow audit.**  :meth:`KernelCache.audit_due` turns true every ``audit_period`` seconds; the
  daemon then resyncs, which repairs a cache that missed something for any other reason.

Ownership is the one :mod:`overlayd.netlink` defines: routes of protocol ``RTPROT_OVERLAYD`` in
our table, permanent neighbour and FDB entries on our devices.  Writing stays in ``netlink``.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from typing import Any

from .errors import KernelError
from .netlink import (
    FAMILIES,
    IP6_RT_PRIO_USER,
    NUD_PERMANENT,
    RT_TABLE_MAIN,
    RTNH_F_ONLINK,
    RTPROT_OVERLAYD,
    FdbEntry,
    MacAddress,
    Neighbour,
    Route,
    injected_fault,
)

log = logging.getLogger(__name__)

KernelObject = Route | Neighbour | FdbEntry

#: How often the cache re-reads the kernel even when notifications say nothing changed.
DEFAULT_AUDIT_PERIOD = 300.0
#: Receive buffer for notifications: ~15 000 notifications (5000 VXLAN peers written at once).
DEFAULT_RCVBUF = 16 << 20

SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12
SO_RCVBUFFORCE = 33

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
RTM_DELADDR = 21
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP_INTR, NLM_F_REPLACE, NLM_F_DUMP = 0x1, 0x2, 0x10, 0x100, 0x300
RTNLGRP_LINK, RTNLGRP_NEIGH, RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV4_ROUTE = 1, 3, 5, 7
RTNLGRP_IPV6_IFADDR, RTNLGRP_IPV6_ROUTE = 9, 11
AF_BRIDGE = 7
IFF_UP = 0x1
RTN_UNICAST = 1
IFLA_IFNAME = 3
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
NDA_DST, NDA_LLADDR, NDA_IFINDEX = 1, 2, 8
NLA_TYPE_MASK = 0x3FFF

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope, type, flags
_NDMSG = struct.Struct("=BBHiHBB")  # family, pad1, pad2, ifindex, state, flags, type
_IFINFOMSG = struct.Struct("=BBHiII")  # family, pad, type, index, flags, change
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")

Slot = Hashable


def _groups(*numbers: int) -> int:
    mask = 0
    for number in numbers:
        mask |= 1 << (number - 1)
    return mask


def _attrs(data: bytes | memoryview, start: int, end: int) -> dict[int, bytes | memoryview]:
    """type -> payload of the attributes in ``data[start:end]`` (not decoded)."""
    out: dict[int, bytes | memoryview] = {}
    while start + 4 <= end:
        length, kind = _RTA.unpack_from(data, start)
        if length < 4:
            break
        out[kind & NLA_TYPE_MASK] = data[start + 4 : start + length]
        start += (length + 3) & ~3
    return out


def _messages(data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
    """(type, flags, seq, body offset, end offset) of each netlink message in one datagram."""
    offset = 0
    while offset + _HDR.size <= len(data):
        length, kind, flags, seq, _pid = _HDR.unpack_from(data, offset)
        if length < _HDR.size:
            return
        yield kind, flags, seq, offset + _HDR.size, offset + length
        offset += (length + 3) & ~3


def _ip(raw: bytes | memoryview) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(bytes(raw))


def open_socket(groups: int = 0, rcvbuf: int | None = None, strict: bool = True) -> tuple[socket.socket, bool]:
    """A raw rtnetlink socket bound to *groups*; returns it and whether strict dump checking is on."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except OSError as exc:
        raise KernelError(f"cannot open a netlink socket: {exc}") from exc
    try:
        if rcvbuf:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        strict_on = False
        if strict:
            try:
                sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
                strict_on = True
            except OSError:
                log.debug("this kernel has no NETLINK_GET_STRICT_CHK: dumps are filtered in user space")
        sock.bind((0, groups))
    except OSError as exc:
        sock.close()
        raise KernelError(f"cannot set up a netlink socket: {exc}") from exc
    return sock, strict_on


class KernelCache:
    """overlayd's kernel objects (routes of *protocol* in *table*, IPv4 and IPv6; permanent
    neighbours and FDB entries on *devices*), by slot, kept current by :meth:`drain`; see the
    module notes.

    *devices*: one name, several (vxlan's ``flannel.<VNI>`` and ``flannel-v6.<VNI>``), or None /
    empty: routes only (a route backend such as host-gw owns no device).
    """

    def __init__(
        self,
        devices: str | Iterable[str] | None,
        *,
        protocol: int = RTPROT_OVERLAYD,
        table: int = RT_TABLE_MAIN,
        audit_period: float = DEFAULT_AUDIT_PERIOD,
        rcvbuf: int = DEFAULT_RCVBUF,
        strict: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.devices: tuple[str, ...] = (
            () if devices is None else (devices,) if isinstance(devices, str) else tuple(devices)
        )
        self.protocol = protocol
        self.table = table
        self.audit_period = audit_period
        self._rcvbuf = rcvbuf
        self._strict = strict
        self._clock = clock
        self._sock: socket.socket | None = None
        self._dump_sock: socket.socket | None = None
        self._strict_on = False
        self._seq = 0
        self._slots: dict[Slot, set[KernelObject]] = {}
        self._names: dict[int, str] = {}
        self._up: dict[int, bool] = {}
        self._dev_of: dict[int, str] | None = None  # memo of _device_indexes: index -> our device
        self._changed: set[Slot] = set()
        self._synced_at: float | None = None
        #: True when notifications were lost (ENOBUFS) or cannot be interpreted: resync.
        self.needs_resync = True
        #: Counts a device that carried our objects when it went down coming up again, and then
        #: the kernel's first route of each family through it (its connected route: gateways
        #: reachable again):
        #: writes through it that failed while it was down can succeed now, don't wait to retry.
        self.devices_back = 0
        self._flushed: set[str] = set()  # devices that went down under our objects
        self._returning: set[tuple[int, int]] = set()  # (index, family): up, no route of that family yet
        #: Counters for logs, tests and benches.
        self.overruns = 0
        self.dumps = 0
        self.notifications = 0

    # -- life cycle -----------------------------------------------------------------------------

    def open(self) -> None:
        """Subscribe to notifications, then read the kernel fully."""
        if self._sock is None:
            groups = _groups(
                RTNLGRP_LINK,
                RTNLGRP_NEIGH,
                RTNLGRP_IPV4_IFADDR,
                RTNLGRP_IPV4_ROUTE,
                RTNLGRP_IPV6_IFADDR,
                RTNLGRP_IPV6_ROUTE,
            )
            self._sock, _ = open_socket(groups, self._rcvbuf, strict=False)
            self._sock.setblocking(False)
            self._dump_sock, self._strict_on = open_socket(0, None, strict=self._strict)
        self.resync()

    def close(self) -> None:
        for sock in (self._sock, self._dump_sock):
            if sock is not None:
                sock.close()
        self._sock = self._dump_sock = None

    def __enter__(self) -> KernelCache:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fileno_or_none(self) -> int | None:
        """The notification socket's descriptor, or None before :meth:`open` (and after :meth:`close`)."""
        return None if self._sock is None else self._sock.fileno()

    def fileno(self) -> int:
        """The notification socket, readable when :meth:`drain` has something to do."""
        assert self._sock is not None, "open() first"
        return self._sock.fileno()

    @property
    def strict(self) -> bool:
        """True when the kernel filters dumps for us (``NETLINK_GET_STRICT_CHK`` accepted)."""
        return self._strict_on

    # -- what a pass reads ----------------------------------------------------------------------

    def objects(self) -> frozenset[KernelObject]:
        """Everything cached (what ``Network.actual_state()`` would read from the kernel)."""
        return frozenset(obj for objs in self._slots.values() for obj in objs)

    def objects_in(self, slots: Iterable[Slot]) -> frozenset[KernelObject]:
        """The cached objects occupying *slots*."""
        return frozenset(obj for slot in slots for obj in self._slots.get(slot, ()))

    def take_changes(self) -> frozenset[Slot]:
        """Slots whose content changed since the last call (then forgets them)."""
        changed, self._changed = frozenset(self._changed), set()
        return changed

    def audit_due(self) -> bool:
        return self._synced_at is None or self._clock() - self._synced_at >= self.audit_period

    def maybe_resync(self) -> bool:
        """Resync when notifications were lost or the audit is due; True when it did."""
        if self.needs_resync or self.audit_due():
            self.resync()
            return True
        return False

    # -- keeping it current ---------------------------------------------------------------------

    def drain(self) -> bool:
        """Apply every pending notification without blocking; True when some slot changed."""
        assert self._sock is not None, "open() first"
        before = len(self._changed)
        while True:
            try:
                data = self._sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.overruns += 1
                    if not self.needs_resync:
                        log.warning("netlink notifications were lost (socket overrun); re-reading the kernel")
                    self.needs_resync = True
                    continue
                raise KernelError(f"reading netlink notifications failed: {exc}") from exc
            for kind, flags, _seq, body, end in _messages(data):
                self.notifications += 1
                self._handle(data, kind, flags, body, end)
        return len(self._changed) != before

    def resync(self) -> None:
        """Read the kernel fully (filtered) and replace the cache; changed slots are remembered."""
        assert self._dump_sock is not None, "open() first"
        if self._sock is not None:
            self.drain()  # what is queued predates the dump, which supersedes it
        names: dict[int, str] = {}
        up: dict[int, bool] = {}
        for kind, _flags, body, end, data in self._dump(RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0, 0)):
            if kind == RTM_NEWLINK:
                index, name, is_up = self._link(data, body, end)
                if name is not None:
                    names[index], up[index] = name, is_up
        self._names, self._up = names, up
        self._dev_of = None
        slots: dict[Slot, set[KernelObject]] = {}
        for family in FAMILIES:
            request = _RTMSG.pack(family, 0, 0, 0, self.table if self.table < 256 else 0, self.protocol, 0, 0, 0)
            if self.table >= 256:
                request += _RTA.pack(8, RTA_TABLE) + _U32.pack(self.table)
            for kind, _flags, body, end, data in self._dump(RTM_GETROUTE, request):
                route = self._route(data, body, end) if kind == RTM_NEWROUTE else None
                if isinstance(route, Route):
                    slots.setdefault(route.key, set()).add(route)
        for dev_index in sorted(self._device_indexes()):
            for family in FAMILIES:
                neigh_req = _NDMSG.pack(family, 0, 0, 0, 0, 0, 0) + _RTA.pack(8, NDA_IFINDEX) + _U32.pack(dev_index)
                for kind, _flags, body, end, data in self._dump(RTM_GETNEIGH, neigh_req):
                    neigh = self._neigh(data, body, end) if kind == RTM_NEWNEIGH else None
                    if isinstance(neigh, Neighbour):
                        slots.setdefault(neigh.key, set()).add(neigh)
            fdb_req = _NDMSG.pack(AF_BRIDGE, 0, 0, dev_index if self._strict_on else 0, 0, 0, 0)
            for kind, _flags, body, end, data in self._dump(RTM_GETNEIGH, fdb_req):
                entry = self._neigh(data, body, end) if kind == RTM_NEWNEIGH else None
                if isinstance(entry, FdbEntry):
                    slots.setdefault(entry.key, set()).add(entry)
        for slot in self._slots.keys() | slots.keys():
            if self._slots.get(slot) != slots.get(slot):
                self._changed.add(slot)
        self._slots = slots
        self._synced_at = self._clock()
        self.needs_resync = False
        self.dumps += 1

    def _dump(self, kind: int, body: bytes) -> Iterator[tuple[int, int, int, int, bytes]]:
        """(type, flags, body offset, end, datagram) of every message a dump request returns.

        A dump interrupted by a concurrent change (``NLM_F_DUMP_INTR``) is still consistent for
        each object it returns; the change itself arrives as a notification.
        """
        sock = self._dump_sock
        assert sock is not None
        self._seq += 1
        seq = self._seq
        try:
            sock.send(_HDR.pack(_HDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body)
        except OSError as exc:
            raise KernelError(f"netlink dump (type {kind}) failed: {exc}") from exc
        while True:
            try:
                fault, _ = injected_fault("dump")  # a test's seam: (0, 1) unless asked for
                if fault:
                    raise OSError(fault, os.strerror(fault))
                data = sock.recv(1 << 20)
            except OSError as exc:
                # e.g. ENOBUFS: the dump is incomplete, so the cache keeps its old content, asks
                # for another read, and the caller's pass fails as a KernelError (retried) instead
                # of ending the daemon; a later dump skips this one's leftovers by sequence number
                self.needs_resync = True
                raise KernelError(f"netlink dump (type {kind}) failed: {exc}") from exc
            for mkind, flags, mseq, start, end in _messages(data):
                if mseq != seq:
                    continue
                if mkind == NLMSG_DONE:
                    return
                if mkind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, start)
                    if code == 0:
                        return
                    raise KernelError(f"netlink dump (type {kind}) failed: errno {-code}")
                yield mkind, flags, start, end, data

    # -- decoding ---------------------------------------------------------------------------------

    def _device_indexes(self) -> dict[int, str]:
        """index -> name of our devices that exist now (memoised until the link table changes)."""
        if self._dev_of is None:
            ours = set(self.devices)
            self._dev_of = {index: name for index, name in self._names.items() if name in ours}
        return self._dev_of

    def _link(self, data: bytes, body: int, end: int) -> tuple[int, str | None, bool]:
        _family, _pad, _type, index, flags, _change = _IFINFOMSG.unpack_from(data, body)
        raw = _attrs(data, body + _IFINFOMSG.size, end).get(IFLA_IFNAME)
        name = bytes(raw).split(b"\0", 1)[0].decode() if raw is not None else None
        return index, name, bool(flags & IFF_UP)

    def _route(self, data: bytes, body: int, end: int) -> Route | tuple[Slot, bool] | None:
        """Our route; or (its slot, False) for someone else's route in a slot of our table."""
        family, dst_len, _src, _tos, table, protocol, _scope, rtype, flags = _RTMSG.unpack_from(data, body)
        if family not in FAMILIES:
            return None
        attrs = _attrs(data, body + _RTMSG.size, end)
        if RTA_TABLE in attrs:
            (table,) = _U32.unpack_from(attrs[RTA_TABLE])
        if table != self.table or rtype != RTN_UNICAST:
            return None
        raw_dst = attrs.get(RTA_DST)
        size = 4 if family == socket.AF_INET else 16
        dst = ipaddress.ip_network((bytes(raw_dst) if raw_dst is not None else bytes(size), dst_len))
        metric = _U32.unpack_from(attrs[RTA_PRIORITY])[0] if RTA_PRIORITY in attrs else 0
        if family == socket.AF_INET6 and metric == IP6_RT_PRIO_USER:
            metric = 0  # the kernel's default for an IPv6 route added without one
        if protocol != self.protocol:
            return ("route", table, dst, metric), False
        oif = _U32.unpack_from(attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
        gateway = attrs.get(RTA_GATEWAY)
        return Route(
            dst=dst,
            dev=self._names.get(oif, f"if{oif}") if oif is not None else "",
            gateway=_ip(gateway) if gateway is not None else None,
            onlink=bool(flags & RTNH_F_ONLINK),
            protocol=protocol,
            table=table,
            metric=metric,
        )

    def _neigh(self, data: bytes, body: int, end: int) -> Neighbour | FdbEntry | tuple[Slot, bool] | None:
        """A permanent entry on one of our devices (ARP, NDP or FDB); (slot, False) for a
        non-permanent one there."""
        family, _p1, _p2, ifindex, state, _flags, _type = _NDMSG.unpack_from(data, body)
        device = self._device_indexes().get(ifindex) if self.devices else None
        if device is None:
            return None
        attrs = _attrs(data, body + _NDMSG.size, end)
        lladdr, dst = attrs.get(NDA_LLADDR), attrs.get(NDA_DST)
        if family in FAMILIES:
            if dst is None:
                return None
            address = _ip(dst)
            if not state & NUD_PERMANENT or lladdr is None or len(lladdr) != 6:
                return ("neigh", device, address), False
            return Neighbour(dst=address, lladdr=MacAddress(bytes(lladdr)), dev=device)
        if family == AF_BRIDGE and lladdr is not None and len(lladdr) == 6:
            mac = MacAddress(bytes(lladdr))
            if not state & NUD_PERMANENT or dst is None:
                return ("fdb", device, mac), False
            return FdbEntry(lladdr=mac, dst=_ip(dst), dev=device)
        return None

    # -- notifications ------------------------------------------------------------------------------

    def _set(self, slot: Slot, objs: set[KernelObject]) -> None:
        if self._slots.get(slot, set()) != objs:
            self._changed.add(slot)
            if objs:
                self._slots[slot] = objs
            else:
                self._slots.pop(slot, None)

    def _handle(self, data: bytes, kind: int, flags: int, body: int, end: int) -> None:
        if kind == RTM_DELADDR:
            # the last IPv4 address leaving a device flushes the routes through it silently
            # (fib_disable_ip); we cannot tell which address was the last one, so re-read (IPv6
            # removals are treated alike: cheap, and never wrong)
            (index,) = struct.unpack_from("=i", data, body + 4)  # ifaddrmsg: family, prefixlen, flags, scope, index
            name = self._names.get(index)
            if name is not None and self._uses(name):
                self.needs_resync = True
        elif kind in (RTM_NEWLINK, RTM_DELLINK):
            self._on_link(kind, *self._link(data, body, end))
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE):
            if self._returning and kind == RTM_NEWROUTE:
                attrs = _attrs(data, body + _RTMSG.size, end)
                oif = _U32.unpack_from(attrs[RTA_OIF])[0] if RTA_OIF in attrs else None
                if (oif, data[body]) in self._returning:  # rtmsg's first byte: the family
                    self._returning.discard((oif, data[body]))
                    self.devices_back += 1
            route = self._route(data, body, end)
            if isinstance(route, Route):
                self._set(route.key, {route} if kind == RTM_NEWROUTE else set())
            elif route is not None and kind == RTM_NEWROUTE and flags & NLM_F_REPLACE:
                self._set(route[0], set())  # someone replaced our route with one of theirs
        elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
            obj = self._neigh(data, body, end)
            if obj is None:
                return
            if not isinstance(obj, Neighbour | FdbEntry):
                if kind == RTM_NEWNEIGH:  # no longer permanent: not ours
                    self._set(obj[0], set())
                return
            current = set(self._slots.get(obj.key, ()))
            if kind == RTM_DELNEIGH:
                current.discard(obj) if isinstance(obj, FdbEntry) else current.clear()
            elif isinstance(obj, FdbEntry) and not obj.lladdr.is_unicast:
                current.add(obj)  # the all-zeros (flood) and multicast MACs hold several remotes
            else:
                current = {obj}
            self._set(obj.key, current)

    def _on_link(self, kind: int, index: int, name: str | None, up: bool) -> None:
        old = self._names.get(index)
        if kind == RTM_DELLINK or name != old:
            self._dev_of = None  # a device of ours may have come, gone or been renamed
        if kind == RTM_DELLINK:
            self._names.pop(index, None)
            self._up.pop(index, None)
            if old is not None:
                self._drop_device(old)
            return
        if name is None:
            return
        was_up = self._up.get(index, True)
        self._names[index], self._up[index] = name, up
        if old is not None and old != name and self._uses(old):
            self.needs_resync = True  # renamed under our objects
        elif was_up and not up and self._uses(name):
            self.needs_resync = True  # the kernel flushes routes through a down device silently
            self._flushed.add(name)
        elif up and not was_up and name in self._flushed:
            self._flushed.discard(name)
            self._returning.update((index, family) for family in (socket.AF_INET, socket.AF_INET6))
            self.devices_back += 1

    def _uses(self, dev: str) -> bool:
        return any(obj.dev == dev for objs in self._slots.values() for obj in objs)

    def _drop_device(self, dev: str) -> None:
        for slot, objs in list(self._slots.items()):
            kept = {obj for obj in objs if obj.dev != dev}
            if kept != objs:
                self._set(slot, kept)


def describe(objs: Iterable[Any]) -> str:
    """A short, sorted text of kernel objects (for logs and test failures)."""
    return ", ".join(sorted(str(obj) for obj in objs)) or "(none)"
