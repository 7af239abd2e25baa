"""Kernel access over netlink: reading and writing the objects the backends own.

Design:

* **The only kernel door.**  This is the one module that imports pyroute2; the core
  (:mod:`overlayd.hostiface`) and the backends call the functions here.  The values it reads and
  writes (``Route``, ``Neighbour``, ``FdbEntry``, ``MacAddress``, ``Link``) live in
  :mod:`overlayd.kernel`, free of IO, and are re-exported here for convenience.
* **Ownership is marked in the kernel.**  Every route overlayd makes carries the route protocol
  number :data:`RTPROT_OVERLAYD` and only routes with that number are ever read back as ours, and
  therefore ever deleted.  Neighbour and FDB entries have no such mark; they are ours because
  they sit on a device we own (``flannel.<VNI>``) and are ``permanent`` (the kernel's own
  learned/incomplete entries are left alone).
* **Idempotent by construction.**  Adds are ``replace`` (``NLM_F_CREATE|NLM_F_REPLACE``), so an
  update never leaves a gap; ``EEXIST`` on a plain add and ``ENOENT``/``ESRCH``/``ENODEV``/
  ``EADDRNOTAVAIL`` on delete count as success.  Anything else becomes a ``KernelError`` that
  says what was being done and, for ``EOPNOTSUPP``, which kernel feature is missing.
* **Batched writes.**  :func:`apply_batch` encodes every change of a plan as a raw rtnetlink
  request (``struct``, no pyroute2 objects) and sends hundreds of them in one ``send``; the
  kernel handles the requests of one datagram in order and queues one ack per request, which
  are then collected and matched back to their objects by sequence number.  One round trip per
  chunk instead of one per object is what makes 5000 peers (15 000 objects) take a fraction of
  a second rather than several seconds.  The errno rules are the same as for the one-at-a-time
  functions below; a failure names its object.  Chunks stay well under the socket buffers, so
  acks are never dropped (netlink(7): an overrun ack queue fails with ``ENOBUFS``).
* **One socket per call site.**  :func:`open_iproute` opens an ``IPRoute`` in the calling
  thread's network namespace (a netlink socket belongs to the netns it was created in, see
  netlink(7)); callers open one per pass and close it, which keeps threads and netns switches
  (tests, ``overlayd demo``) trivially correct at a cost of well under a millisecond.

pyroute2 quirks (0.9.x): ``fdb("replace")`` does not get the ``NUD_NOARP|NUD_PERMANENT`` state and
``NTF_SELF`` flag that ``fdb("add")`` fills in, so they are passed explicitly (the kernel answers
``EOPNOTSUPP`` otherwise); an onlink route needs its device up (``ENETDOWN``, see
``fib_check_nh_v4_gw`` in net/ipv4/fib_semantics.c).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
from typing import Any

import attrs
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .errors import KernelError
from .kernel import (
    RT_TABLE_MAIN,
    RTPROT_OVERLAYD,
    AddressIP,
    Egress,
    FdbEntry,
    KernelObject,
    Link,
    MacAddress,
    Neighbour,
    Route,
)
from .plan import Plan

log = logging.getLogger(__name__)

# The value types from overlayd.kernel are re-exported: ``from overlayd.netlink import Route`` works.
__all__ = [
    "ADD_OK",
    "DELETE_OK",
    "FAMILIES",
    "IFA_F_NODAD",
    "NTF_SELF",
    "NUD_NOARP",
    "NUD_PERMANENT",
    "RTNH_F_ONLINK",
    "RTPROT_OVERLAYD",
    "RT_TABLE_MAIN",
    "AddressIP",
    "Egress",
    "FdbEntry",
    "KernelObject",
    "Link",
    "MacAddress",
    "Neighbour",
    "Route",
    "add_address",
    "add_link",
    "add_vxlan",
    "apply_batch",
    "apply_plan",
    "connected_networks",
    "default_routes",
    "delete_address",
    "delete_fdb",
    "delete_link",
    "delete_neighbour",
    "delete_route",
    "family_of",
    "get_addresses",
    "get_link",
    "interfaces",
    "iproute",
    "ipv4_interfaces",
    "kernel_error",
    "link_exists",
    "link_index",
    "link_names",
    "open_iproute",
    "read_fdb",
    "read_neighbours",
    "read_routes",
    "replace_fdb",
    "replace_neighbour",
    "replace_route",
    "route_get",
    "set_link",
    "translated",
]

RTNH_F_ONLINK = 0x4
IFA_F_NODAD = 0x02
#: The address families overlayd programs; a reader given ``family=None`` reads both.
FAMILIES = (socket.AF_INET, socket.AF_INET6)
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
#: The metric the kernel gives an IPv6 route added without one (``IP6_RT_PRIO_USER``).
IP6_RT_PRIO_USER = 1024

#: errnos that mean "already there" for a create, and "already gone" for a delete.
ADD_OK = frozenset({errno.EEXIST})
DELETE_OK = frozenset({errno.ENOENT, errno.ESRCH, errno.ENODEV, errno.EADDRNOTAVAIL})


# -- test-only fault injection ---------------------------------------------------------------------

#: Names a file that makes the kernel "answer" requests with an error (issue 19's netlink faults).
#: Read once, at import: a daemon started without it never looks at any file.  Each line of the
#: file is ``write ERRNO [EVERY]`` (every EVERY-th write request of a batch is refused with ERRNO
#: instead of being sent, as if the kernel refused that object) or ``dump ERRNO`` (the receive of
#: every kernel dump fails with ERRNO, as ``recv`` would).  No file, no fault: a test removes it
#: to end the fault.  This is the one seam, at the IO boundary; everything above it runs as is.
FAULTS_ENV = "OVERLAYD_TEST_NETLINK_FAULTS"
_fault_file = os.environ.get(FAULTS_ENV) or None


def injected_fault(kind: str) -> tuple[int, int]:
    """(errno, every) that the fault file asks for requests of *kind* (``write``, ``dump``); (0, 1) for none."""
    if _fault_file is None:
        return 0, 1
    try:
        with open(_fault_file) as f:
            text = f.read(4096)
    except OSError:
        return 0, 1
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == kind:
            code = getattr(errno, parts[1], 0)
            every = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() and int(parts[2]) > 0 else 1
            if isinstance(code, int) and code > 0:
                return code, every
    return 0, 1


# -- errors ----------------------------------------------------------------------------------------


def kernel_error(what: str, exc: NetlinkError | int, feature: str | None = None) -> KernelError:
    """A ``KernelError`` naming the operation, the errno (or the ``NetlinkError``), and the likely cause."""
    code = exc if isinstance(exc, int) else exc.code
    reason = os.strerror(code) if code else str(exc)
    hint = ""
    if code == errno.EOPNOTSUPP:
        hint = f": this kernel lacks {feature or 'a needed feature'} (module not built or not loaded)"
    elif code == errno.EPERM:
        hint = ": overlayd needs root or CAP_NET_ADMIN"
    elif code == errno.ENETDOWN:
        hint = ": the device is down (activate the network first)"
    return KernelError(f"{what} failed: {reason} (errno {code}){hint}")


@contextmanager
def translated(what: str, ok: Iterable[int] = (), feature: str | None = None) -> Iterator[None]:
    """Run a netlink call: errnos in *ok* are success, any other becomes a ``KernelError``."""
    try:
        yield
    except NetlinkError as exc:
        if exc.code in frozenset(ok):
            log.debug("%s: %s counts as done", what, os.strerror(exc.code))
            return
        raise kernel_error(what, exc, feature) from exc


# -- sockets and links -----------------------------------------------------------------------------


def open_iproute() -> IPRoute:
    """An ``IPRoute`` in the calling thread's current network namespace (close it when done)."""
    try:
        return IPRoute()
    except OSError as exc:
        raise KernelError(f"cannot open a netlink socket: {exc}") from exc


@contextmanager
def iproute() -> Iterator[IPRoute]:
    ipr = open_iproute()
    try:
        yield ipr
    finally:
        ipr.close()


def _link_from_msg(msg: Any) -> Link:
    info = msg.get("linkinfo")
    kind = info.get("kind") if info is not None else None
    data: dict[str, Any] = {}
    raw = info.get("data") if info is not None else None
    if isinstance(raw, dict):  # pyroute2 leaves the data of kinds it cannot decode as a string
        for name, value in raw.get("attrs", ()):
            if name.startswith("IFLA_"):
                data[name] = value
    mac = msg.get("address")
    return Link(
        index=int(msg["index"]),
        name=str(msg.get("ifname")),
        kind=kind,
        mac=MacAddress.parse(mac) if mac and len(mac) == 17 else None,
        mtu=int(msg.get("mtu") or 0),
        up=bool(msg["flags"] & 0x1),
        info_data=data,
    )


def get_link(ipr: IPRoute, name: str | None = None, index: int | None = None) -> Link | None:
    """The device called *name* (or with *index*), or None when there is none."""
    kwargs: dict[str, Any] = {"ifname": name} if name is not None else {"index": index}
    try:
        msgs = ipr.link("get", **kwargs)
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT):
            return None
        raise kernel_error(f"looking up link {name or index}", exc) from exc
    return _link_from_msg(msgs[0]) if msgs else None


def link_index(ipr: IPRoute, name: str) -> int:
    """The index of device *name*; ``KernelError`` when it does not exist."""
    link = get_link(ipr, name)
    if link is None:
        raise KernelError(f"network device {name!r} does not exist")
    return link.index


def link_exists(name: str) -> bool:
    """Does device *name* exist in the calling thread's namespace?  (One ioctl, no netlink socket.)"""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def link_names(ipr: IPRoute) -> dict[int, str]:
    """index -> name for every device in the namespace."""
    return {int(msg["index"]): str(msg.get("ifname")) for msg in ipr.link("dump")}


def add_link(ipr: IPRoute, name: str, kind: str, **kwargs: Any) -> None:
    """Create a device; ``EEXIST`` counts as success (callers check compatibility first)."""
    with translated(f"creating {kind} device {name}", ok=ADD_OK, feature=f"{kind} links"):
        ipr.link("add", ifname=name, kind=kind, **kwargs)


def set_link(ipr: IPRoute, index: int, what: str, **kwargs: Any) -> None:
    with translated(what):
        ipr.link("set", index=index, **kwargs)


def delete_link(ipr: IPRoute, name: str) -> None:
    """Delete device *name*; a missing device counts as success."""
    link = get_link(ipr, name)
    if link is None:
        return
    with translated(f"deleting device {name}", ok=DELETE_OK):
        ipr.link("del", index=link.index)


def add_vxlan(
    ipr: IPRoute,
    name: str,
    *,
    vni: int,
    local: IPv4Address | IPv6Address,
    link_index: int,
    port: int,
    mtu: int,
    gbp: bool = False,
    learning: bool = False,
    mac: MacAddress | None = None,
) -> None:
    """Create a VXLAN device; an existing one is an error (callers check compatibility first)."""
    kwargs: dict[str, Any] = {
        "vxlan_id": vni,
        "vxlan_link": link_index,
        "vxlan_port": port,
        "vxlan_learning": 1 if learning else 0,
        "mtu": mtu,
    }
    kwargs["vxlan_local6" if local.version == 6 else "vxlan_local"] = str(local)
    if gbp:
        kwargs["vxlan_gbp"] = True
    if mac is not None:
        kwargs["address"] = str(mac)
    what = f"creating VXLAN device {name} (VNI {vni}, local {local}, port {port})"
    with translated(what, feature="VXLAN (vxlan module)"):
        ipr.link("add", ifname=name, kind="vxlan", **kwargs)


def interfaces(ipr: IPRoute, family: int = socket.AF_INET) -> list[tuple[Link, tuple[AddressIP, ...]]]:
    """Every device with its addresses of *family* (kernel order), for choosing the underlay.

    IPv6 link-local addresses (``fe80::/10``) are left out: they name no host off the link."""
    addrs: dict[int, list[AddressIP]] = {}
    with translated(f"listing IPv{4 if family == socket.AF_INET else 6} addresses"):
        for msg in ipr.addr("dump", family=family):
            if msg["family"] != family:
                continue
            address = ipaddress.ip_address(msg.get("address"))
            if not address.is_link_local or address.version == 4:
                addrs.setdefault(int(msg["index"]), []).append(address)
    with translated("listing network devices"):
        links = [_link_from_msg(msg) for msg in ipr.link("dump")]
    return [(link, tuple(addrs.get(link.index, ()))) for link in links]


def ipv4_interfaces(ipr: IPRoute) -> list[tuple[Link, tuple[IPv4Address, ...]]]:
    """Every device with its IPv4 addresses (kernel order), for choosing the underlay."""
    return [(link, tuple(a for a in addrs if isinstance(a, IPv4Address))) for link, addrs in interfaces(ipr)]


def _egress(msg: Any) -> Egress | None:
    oif = msg.get("oif")
    if oif is None:
        return None
    src = msg.get("prefsrc")
    address = ipaddress.ip_address(src) if src else None
    return Egress(oif=int(oif), prefsrc=address if isinstance(address, IPv4Address) else None)


def route_get(ipr: IPRoute, dst: IPv4Address | IPv6Address) -> list[Egress]:
    """Where the kernel would send a packet to *dst* (``ip route get``); ``KernelError`` if nowhere."""
    with translated(f"looking up the route to {dst}"):
        msgs = ipr.route("get", dst=str(dst), family=_family(dst))
    return [egress for egress in map(_egress, msgs) if egress is not None]


def default_routes(ipr: IPRoute, family: int = socket.AF_INET) -> list[Egress]:
    """The default routes of *family* (IPv4 unless told) in the main table."""
    out = []
    with translated("listing routes"):
        msgs = ipr.route("dump", family=family, table=RT_TABLE_MAIN)
    for msg in msgs:
        if msg["dst_len"] == 0 and msg["type"] == 1 and (msg.get("table") or msg["table"]) == RT_TABLE_MAIN:
            egress = _egress(msg)
            if egress is not None:
                out.append(egress)
    return out


# -- addresses -------------------------------------------------------------------------------------


def get_addresses(ipr: IPRoute, index: int, family: int = socket.AF_INET) -> list[IPv4Interface | IPv6Interface]:
    """The addresses of *family* on a device (with prefix length), in kernel order."""
    out: list[IPv4Interface | IPv6Interface] = []
    for msg in ipr.addr("dump", index=index, family=family):
        if msg.get("index") != index or msg["family"] != family:
            continue
        out.append(ipaddress.ip_interface(f"{msg.get('address')}/{msg['prefixlen']}"))
    return out


def add_address(ipr: IPRoute, index: int, addr: IPv4Interface | IPv6Interface) -> None:
    """Add *addr* to device *index*; an IPv6 address skips duplicate address detection (``nodad``):
    overlayd's addresses are unique by lease, and DAD would leave them tentative (unusable as a
    source) for a second or two after every start."""
    kwargs: dict[str, Any] = {"flags": IFA_F_NODAD} if addr.version == 6 else {}
    with translated(f"adding address {addr} to device {index}", ok=ADD_OK):
        ipr.addr("add", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen, **kwargs)


def delete_address(ipr: IPRoute, index: int, addr: IPv4Interface | IPv6Interface) -> None:
    with translated(f"deleting address {addr} from device {index}", ok=DELETE_OK):
        ipr.addr("del", index=index, address=str(addr.ip), prefixlen=addr.network.prefixlen)


def family_of(addr: IPv4Address | IPv6Address | IPv4Network | IPv6Network | IPv4Interface | IPv6Interface) -> int:
    """``AF_INET`` or ``AF_INET6`` for an address, network or interface value."""
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def configure_device(ipr: IPRoute, link: Link, address: IPv4Interface | IPv6Interface | None, mtu: int) -> None:
    """Give our device *link* exactly one address of *address*'s family, the MTU *mtu*, and bring it up.

    Idempotent: only what differs is changed.  Used by the backends that own a device (vxlan's
    VTEPs, udp's TUN) once they know their lease, and again when the device had to be recreated.
    Addresses of the other family are left alone, and so is IPv6 link-local (``fe80::/10``,
    which the kernel gives every device with a MAC and which neighbour discovery needs).
    *address* None only sets the MTU and the link state.
    """
    if address is not None:
        for addr in get_addresses(ipr, link.index, family_of(address)):
            if addr != address and not (addr.version == 6 and addr.ip.is_link_local):
                log.info("removing stale address %s from %s", addr, link.name)
                delete_address(ipr, link.index, addr)
    if link.mtu != mtu:
        set_link(ipr, link.index, f"setting MTU {mtu} on {link.name}", mtu=mtu)
    if address is not None:
        add_address(ipr, link.index, address)
    if not link.up:
        set_link(ipr, link.index, f"bringing up {link.name}", state="up")


def connected_networks(ipr: IPRoute, index: int) -> frozenset[IPv4Network | IPv6Network]:
    """The subnets directly attached to a device (its addresses' networks), both families;
    host routes (/32, /128) and IPv6 link-local are left out (no peer's PublicIP can be there)."""
    return frozenset(
        iface.network
        for family in FAMILIES
        for iface in get_addresses(ipr, index, family)
        if iface.network.prefixlen < iface.max_prefixlen and not iface.ip.is_link_local
    )


# -- reading state back ----------------------------------------------------------------------------


def _families(family: int | None) -> tuple[int, ...]:
    return FAMILIES if family is None else (family,)


def read_routes(
    ipr: IPRoute, protocol: int = RTPROT_OVERLAYD, table: int = RT_TABLE_MAIN, family: int | None = None
) -> frozenset[Route]:
    """The unicast routes in *table* marked with *protocol*, of *family* (None: IPv4 and IPv6);
    nothing else is ever ours."""
    names = link_names(ipr)
    out: set[Route] = set()
    for fam in _families(family):
        for msg in ipr.route("dump", family=fam):
            if msg["proto"] != protocol or (msg.get("table") or msg["table"]) != table or msg["type"] != 1:
                continue
            if msg["family"] != fam:
                continue
            dst = msg.get("dst")
            if dst is None:
                dst = "0.0.0.0" if fam == socket.AF_INET else "::"
            gateway = msg.get("gateway")
            oif = msg.get("oif")
            out.add(
                Route(
                    dst=ipaddress.ip_network(f"{dst}/{msg['dst_len']}"),
                    dev=names.get(oif, f"if{oif}") if oif is not None else "",
                    gateway=ipaddress.ip_address(gateway) if gateway else None,
                    onlink=bool(msg["flags"] & RTNH_F_ONLINK),
                    protocol=protocol,
                    table=table,
                    metric=_metric(msg),
                )
            )
    return frozenset(out)


def _metric(msg: Any) -> int:
    """The route's metric as the kernel reports it; IPv6 routes always carry one (1024 when
    none was asked for), which overlayd's ``Route.metric`` 0 stands for."""
    metric = int(msg.get("priority") or 0)
    if msg["family"] == socket.AF_INET6 and metric == IP6_RT_PRIO_USER:
        return 0
    return metric


def read_neighbours(ipr: IPRoute, dev: str, family: int | None = None) -> frozenset[Neighbour]:
    """The permanent neighbour entries of *family* (None: ARP and NDP) on device *dev*
    (empty when it does not exist)."""
    link = get_link(ipr, dev)
    if link is None:
        return frozenset()
    out: set[Neighbour] = set()
    for fam in _families(family):
        for msg in ipr.neigh("dump", ifindex=link.index, family=fam):
            if msg.get("ifindex") != link.index or msg["family"] != fam or not msg["state"] & NUD_PERMANENT:
                continue
            lladdr, dst = msg.get("lladdr"), msg.get("dst")
            if not lladdr or not dst:
                continue
            out.add(Neighbour(dst=ipaddress.ip_address(dst), lladdr=lladdr, dev=dev))
    return frozenset(out)


def read_fdb(ipr: IPRoute, dev: str) -> frozenset[FdbEntry]:
    """The permanent FDB entries with a remote (``dst``, IPv4 or IPv6) on VXLAN device *dev*."""
    link = get_link(ipr, dev)
    if link is None:
        return frozenset()
    out: set[FdbEntry] = set()
    for msg in ipr.fdb("dump", ifindex=link.index):
        if msg.get("ifindex") != link.index or not msg["state"] & NUD_PERMANENT:
            continue
        lladdr, dst = msg.get("lladdr"), msg.get("dst")
        if not lladdr or not dst:
            continue
        out.add(FdbEntry(lladdr=lladdr, dst=ipaddress.ip_address(dst), dev=dev))
    return frozenset(out)


# -- writing ---------------------------------------------------------------------------------------


class _Indexes:
    """Device name -> index, looked up once per apply."""

    def __init__(self, ipr: IPRoute) -> None:
        self._ipr = ipr
        self._cache: dict[str, int] = {}

    def __call__(self, name: str) -> int:
        if name not in self._cache:
            self._cache[name] = link_index(self._ipr, name)
        return self._cache[name]


def _family(addr: IPv4Address | IPv6Address | IPv4Network | IPv6Network) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


def replace_route(ipr: IPRoute, route: Route, index: Callable[[str], int] | None = None) -> None:
    index = index or _Indexes(ipr)
    kwargs: dict[str, Any] = {
        "dst": str(route.dst),
        "oif": index(route.dev),
        "proto": route.protocol,
        "table": route.table,
        "family": _family(route.dst),
    }
    if route.gateway is not None:
        kwargs["gateway"] = str(route.gateway)
    if route.onlink:
        kwargs["flags"] = RTNH_F_ONLINK
    if route.metric:
        kwargs["priority"] = route.metric
    with translated(f"setting route {route}"):
        ipr.route("replace", **kwargs)


def delete_route(ipr: IPRoute, route: Route) -> None:
    kwargs: dict[str, Any] = {
        "dst": str(route.dst),
        "proto": route.protocol,
        "table": route.table,
        "family": _family(route.dst),
    }
    if route.metric:
        kwargs["priority"] = route.metric
    with translated(f"deleting route {route}", ok=DELETE_OK):
        ipr.route("del", **kwargs)


def replace_neighbour(ipr: IPRoute, neigh: Neighbour, index: Callable[[str], int] | None = None) -> None:
    index = index or _Indexes(ipr)
    with translated(f"setting neighbour {neigh}"):
        ipr.neigh(
            "replace",
            dst=str(neigh.dst),
            lladdr=str(neigh.lladdr),
            ifindex=index(neigh.dev),
            family=_family(neigh.dst),
            state=NUD_PERMANENT,
        )


def delete_neighbour(ipr: IPRoute, neigh: Neighbour, index: Callable[[str], int] | None = None) -> None:
    index = index or _Indexes(ipr)
    try:
        ifindex = index(neigh.dev)
    except KernelError:
        return  # the device is gone, and its neighbours with it
    with translated(f"deleting neighbour {neigh}", ok=DELETE_OK):
        ipr.neigh("del", dst=str(neigh.dst), ifindex=ifindex, family=_family(neigh.dst))


def replace_fdb(ipr: IPRoute, entry: FdbEntry, index: Callable[[str], int] | None = None) -> None:
    index = index or _Indexes(ipr)
    with translated(f"setting FDB entry {entry}", feature="VXLAN FDB entries"):
        ipr.fdb(
            "replace",
            ifindex=index(entry.dev),
            lladdr=str(entry.lladdr),
            dst=str(entry.dst),
            state=NUD_PERMANENT | NUD_NOARP,
            flags=NTF_SELF,
        )


def delete_fdb(ipr: IPRoute, entry: FdbEntry, index: Callable[[str], int] | None = None) -> None:
    index = index or _Indexes(ipr)
    try:
        ifindex = index(entry.dev)
    except KernelError:
        return
    with translated(f"deleting FDB entry {entry}", ok=DELETE_OK):
        ipr.fdb("del", ifindex=ifindex, lladdr=str(entry.lladdr), dst=str(entry.dst))


def apply_plan(ipr: IPRoute, plan: Plan[Any]) -> None:
    """Make the kernel match *plan*: replace every addition, then delete what is left over.

    Additions go first and are ``replace``s, so a changed entry is updated in place and a peer is
    never unreachable in between; they run neighbour, FDB, route, so a route only appears once
    the L2 path under it resolves.  Deletions run route, FDB, neighbour (the reverse).  Routes and
    neighbours are deleted only when no addition refills their slot (``plan.removals()``), because
    a delete matches the slot, not the old content.  An FDB delete names the exact remote
    (``dst``), so every removed FDB entry is deleted: the all-zeros (flood) and multicast MACs can
    hold several remotes in one slot, and this clears the extra ones in the same pass.  (For a
    unicast MAC the kernel keeps one remote: ``append`` is silently ignored, ``replace`` swaps it.)
    """
    index = _Indexes(ipr)
    for obj in plan.add:
        if not isinstance(obj, Route | Neighbour | FdbEntry):
            raise TypeError(f"netlink.apply_plan cannot program {type(obj).__name__} objects")

    def ordered(objs: Iterable[Any], kind: type) -> list[Any]:
        return sorted((o for o in objs if isinstance(o, kind)), key=str)

    for neigh in ordered(plan.add, Neighbour):
        log.debug("neighbour %s", neigh)
        replace_neighbour(ipr, neigh, index)
    for entry in ordered(plan.add, FdbEntry):
        log.debug("fdb %s", entry)
        replace_fdb(ipr, entry, index)
    for route in ordered(plan.add, Route):
        log.debug("route %s", route)
        replace_route(ipr, route, index)

    removals = plan.removals()
    for route in ordered(removals, Route):
        log.debug("delete route %s", route)
        delete_route(ipr, route)
    for entry in ordered(plan.remove, FdbEntry):
        log.debug("delete fdb %s", entry)
        delete_fdb(ipr, entry, index)
    for neigh in ordered(removals, Neighbour):
        log.debug("delete neighbour %s", neigh)
        delete_neighbour(ipr, neigh, index)


# -- batched writes --------------------------------------------------------------------------------

_NLMSG_ERROR = 2
_RTM_NEWROUTE, _RTM_DELROUTE, _RTM_NEWNEIGH, _RTM_DELNEIGH = 24, 25, 28, 29
_NLM_F_REQUEST, _NLM_F_ACK, _NLM_F_REPLACE, _NLM_F_CREATE = 0x1, 0x4, 0x100, 0x400
_RTA_DST, _RTA_OIF, _RTA_GATEWAY, _RTA_PRIORITY, _RTA_TABLE = 1, 4, 5, 6, 15
_NDA_DST, _NDA_LLADDR = 1, 2
_RTN_UNICAST, _RT_SCOPE_UNIVERSE, _RT_SCOPE_NOWHERE = 1, 0, 255
_AF_BRIDGE = 7
_SO_SNDBUFFORCE, _SO_RCVBUFFORCE = 32, 33
_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BBHiHBB")
_NLA = struct.Struct("=HH")
#: Requests per ``send``: ~100 bytes each, so a chunk is far below the socket buffers set below.
BATCH_CHUNK = 512
_BATCH_BUFFER = 4 << 20


def _nla(kind: int, payload: bytes) -> bytes:
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * ((-length) % 4)


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)


def _route_request(route: Route, index: Callable[[str], int] | None, seq: int) -> bytes:
    """RTM_NEWROUTE (replace) when *index* is given, else RTM_DELROUTE (matched by the slot)."""
    family = _family(route.dst)
    table = route.table if route.table < 256 else 0
    attrs = _nla(_RTA_DST, route.dst.network_address.packed)
    if route.table >= 256:
        attrs += _nla(_RTA_TABLE, _u32(route.table))
    if route.metric:
        attrs += _nla(_RTA_PRIORITY, _u32(route.metric))
    if index is None:
        kind, flags = _RTM_DELROUTE, _NLM_F_REQUEST | _NLM_F_ACK
        body = _RTMSG.pack(family, route.dst.prefixlen, 0, 0, table, route.protocol, _RT_SCOPE_NOWHERE, 0, 0)
    else:
        kind, flags = _RTM_NEWROUTE, _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_REPLACE
        body = _RTMSG.pack(
            family,
            route.dst.prefixlen,
            0,
            0,
            table,
            route.protocol,
            _RT_SCOPE_UNIVERSE,
            _RTN_UNICAST,
            RTNH_F_ONLINK if route.onlink else 0,
        )
        attrs += _nla(_RTA_OIF, _u32(index(route.dev)))
        if route.gateway is not None:
            if route.gateway.version != route.dst.version:
                raise KernelError(f"setting route {route}: a gateway of another address family is not supported")
            attrs += _nla(_RTA_GATEWAY, route.gateway.packed)
    return _message(kind, flags, seq, body + attrs)


def _neigh_request(obj: Neighbour | FdbEntry, ifindex: int, add: bool, seq: int) -> bytes:
    if isinstance(obj, Neighbour):
        family, state, ntf = _family(obj.dst), NUD_PERMANENT, 0
        attrs = _nla(_NDA_DST, obj.dst.packed) + (_nla(_NDA_LLADDR, obj.lladdr.packed) if add else b"")
    else:
        family, state, ntf = _AF_BRIDGE, NUD_PERMANENT | NUD_NOARP, NTF_SELF
        attrs = _nla(_NDA_LLADDR, obj.lladdr.packed) + _nla(_NDA_DST, obj.dst.packed)
    if add:
        kind, flags = _RTM_NEWNEIGH, _NLM_F_REQUEST | _NLM_F_ACK | _NLM_F_CREATE | _NLM_F_REPLACE
    else:
        kind, flags, state = _RTM_DELNEIGH, _NLM_F_REQUEST | _NLM_F_ACK, 0
    return _message(kind, flags, seq, _NDMSG.pack(family, 0, 0, ifindex, state, ntf, 0) + attrs)


def _message(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(payload), kind, flags, seq, 0) + payload


@attrs.frozen
class _Request:
    what: str
    ok: frozenset[int]
    feature: str | None
    data: bytes


def _if_index(name: str) -> int:
    try:
        return socket.if_nametoindex(name)
    except OSError as exc:
        raise KernelError(f"network device {name!r} does not exist") from exc


def _requests(plan: Plan[Any]) -> Iterator[_Request | KernelError]:
    """The plan as raw requests, in :func:`apply_plan`'s order (sequence numbers filled in later)."""
    indexes: dict[str, int | None] = {}

    def index(name: str) -> int:
        if name not in indexes:
            try:
                indexes[name] = _if_index(name)
            except KernelError:
                indexes[name] = None
        found = indexes[name]
        if found is None:
            raise KernelError(f"network device {name!r} does not exist")
        return found

    def index_or_none(name: str) -> int | None:
        try:
            return index(name)
        except KernelError:
            return None

    def add(what: str, feature: str | None, build: Callable[[], bytes]) -> _Request | KernelError:
        try:
            return _Request(what, frozenset(), feature, build())
        except KernelError as exc:  # e.g. its device is missing: the others still go ahead
            return KernelError(f"{what} failed: {exc}")

    def ordered(objs: Iterable[Any], kind: type) -> list[Any]:
        return sorted((o for o in objs if isinstance(o, kind)), key=str)

    for obj in plan.add:
        if not isinstance(obj, Route | Neighbour | FdbEntry):
            raise TypeError(f"netlink.apply_batch cannot program {type(obj).__name__} objects")

    def neigh_add(obj: Neighbour | FdbEntry) -> Callable[[], bytes]:
        return lambda: _neigh_request(obj, index(obj.dev), True, 0)

    def route_add(route: Route) -> Callable[[], bytes]:
        return lambda: _route_request(route, index, 0)

    for neigh in ordered(plan.add, Neighbour):
        yield add(f"setting neighbour {neigh}", None, neigh_add(neigh))
    for entry in ordered(plan.add, FdbEntry):
        yield add(f"setting FDB entry {entry}", "VXLAN FDB entries", neigh_add(entry))
    for route in ordered(plan.add, Route):
        yield add(f"setting route {route}", None, route_add(route))
    removals = plan.removals()
    for route in ordered(removals, Route):
        yield _Request(f"deleting route {route}", DELETE_OK, None, _route_request(route, None, 0))
    for entry in ordered(plan.remove, FdbEntry):
        ifindex = index_or_none(entry.dev)
        if ifindex is not None:  # the device is gone, and its entries with it
            yield _Request(f"deleting FDB entry {entry}", DELETE_OK, None, _neigh_request(entry, ifindex, False, 0))
    for neigh in ordered(removals, Neighbour):
        ifindex = index_or_none(neigh.dev)
        if ifindex is not None:
            yield _Request(f"deleting neighbour {neigh}", DELETE_OK, None, _neigh_request(neigh, ifindex, False, 0))


def _batch_socket() -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except OSError as exc:
        raise KernelError(f"cannot open a netlink socket: {exc}") from exc
    try:
        for force, plain in ((_SO_SNDBUFFORCE, socket.SO_SNDBUF), (_SO_RCVBUFFORCE, socket.SO_RCVBUF)):
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, _BATCH_BUFFER)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, plain, _BATCH_BUFFER)
        sock.bind((0, 0))
    except OSError as exc:
        sock.close()
        raise KernelError(f"cannot set up a netlink socket: {exc}") from exc
    return sock


def apply_batch(plan: Plan[Any], chunk: int = BATCH_CHUNK) -> int:
    """:func:`apply_plan`'s changes, in its order and with its errno rules, many per round trip.

    Opens a raw rtnetlink socket in the calling thread's network namespace, sends the requests
    in chunks of *chunk* (one ``send`` each) and collects every ack before the next chunk.  The
    kernel carries on after a failed request, so one bad object does not hold the others back;
    the first failure is raised afterwards as a ``KernelError`` naming its object and counting
    the others (logged at debug level).  Returns the number of requests sent.
    """
    failures: list[KernelError] = []
    requests: list[_Request] = []
    fault, every = injected_fault("write")  # (0, 1) unless a test asks for refusals
    for item in _requests(plan):
        if isinstance(item, KernelError):
            failures.append(item)
        elif fault and len(requests) % every == 0:
            failures.append(kernel_error(item.what, fault, item.feature))
            requests.append(_Request(item.what, item.ok, item.feature, b""))  # refused: never sent
        else:
            requests.append(item)
    requests = [request for request in requests if request.data]
    if not requests and not failures:
        return 0
    sock = _batch_socket()
    try:
        for start in range(0, len(requests), chunk):
            part = requests[start : start + chunk]
            waiting: dict[int, _Request] = {}
            data = bytearray()
            for seq, request in enumerate(part, start=start + 1):
                raw = bytearray(request.data)
                struct.pack_into("=I", raw, 8, seq)
                data += raw
                waiting[seq] = request
            try:
                sock.send(bytes(data))
                while waiting:
                    reply = sock.recv(1 << 20)
                    offset = 0
                    while offset + _NLMSGHDR.size <= len(reply):
                        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(reply, offset)
                        if length < _NLMSGHDR.size:
                            break
                        if kind == _NLMSG_ERROR and seq in waiting:
                            (code,) = struct.unpack_from("=i", reply, offset + _NLMSGHDR.size)
                            request = waiting.pop(seq)
                            if code and -code in request.ok:
                                log.debug("%s: %s counts as done", request.what, os.strerror(-code))
                            elif code:
                                failures.append(kernel_error(request.what, -code, request.feature))
                        offset += (length + 3) & ~3
            except OSError as exc:
                raise KernelError(f"netlink batch ({len(part)} requests) failed: {exc}") from exc
    finally:
        sock.close()
    # The caller logs the raised error (the daemon once per distinct text while it retries), so
    # the others go to debug: at warning, a host-gw host with its underlay down logged one line
    # per peer on every retry, once a second, for as long as the link stayed down.
    for failure in failures[1:]:
        log.debug("%s", failure)
    if failures:
        more = f" (and {len(failures) - 1} more, at debug level)" if len(failures) > 1 else ""
        raise KernelError(f"{failures[0]}{more}")
    return len(requests)
