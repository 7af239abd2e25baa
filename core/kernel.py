"""Kernel objects as values: what the backends want in the kernel, and what they read back.

These frozen attrs classes carry no IO and import no netlink library, so planning code (the
backends' ``desired_state``, :mod:`overlayd.plan`, tests, dry runs) can build and compare them
without touching the kernel.  Reading and writing them is :mod:`overlayd.netlink`'s job, the only
module that talks to the kernel.

Each object's ``key`` is the slot the kernel allows one occupant of (a route's table, destination
and metric; a neighbour's device and address; an FDB entry's device and MAC): that is what
:mod:`overlayd.plan` uses to turn "delete old, add new" into one in-place *replace*.  Devices are
named, not indexed, so a desired state stays valid when a device is recreated (the index changes,
the name does not); names are resolved at apply time.
"""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import attrs

#: Route protocol number that marks the routes overlayd makes (``ip route show proto 79``).
#: 0x4f is ASCII "O".  It is not taken in the kernel's rtnetlink.h, in iproute2's rt_protos, nor by
#: the usual routing daemons (bird 12, zebra 11, babel 42, openr 99, bgp 186..., Calico felix 80).
#: Operators may name it: ``echo "79 overlayd" > /etc/iproute2/rt_protos.d/overlayd.conf``.
RTPROT_OVERLAYD = 0x4F
RT_TABLE_MAIN = 254

AddressIP = IPv4Address | IPv6Address


@attrs.frozen(order=True)
class MacAddress:
    """An Ethernet address; ``str()`` gives the canonical ``aa:bb:cc:dd:ee:ff`` form."""

    packed: bytes = attrs.field()

    @packed.validator
    def _check(self, _attribute: Any, value: bytes) -> None:
        if len(value) != 6:
            raise ValueError(f"a MAC address has 6 bytes, not {len(value)}")

    @classmethod
    def parse(cls, text: object) -> MacAddress:
        """``"AA:bb:cc:dd:ee:ff"`` or ``"aa-bb-..."`` -> MacAddress; ``ValueError`` otherwise."""
        if isinstance(text, MacAddress):
            return text
        if not isinstance(text, str):
            raise ValueError(f"{text!r} is not a MAC address")
        parts = text.replace("-", ":").split(":")
        if len(parts) != 6 or not all(len(p) == 2 for p in parts):
            raise ValueError(f"{text!r} is not a MAC address like aa:bb:cc:dd:ee:ff")
        try:
            return cls(bytes(int(p, 16) for p in parts))
        except ValueError as exc:
            raise ValueError(f"{text!r} is not a MAC address like aa:bb:cc:dd:ee:ff") from exc

    @property
    def is_unicast(self) -> bool:
        return not self.packed[0] & 0x01 and self.packed != bytes(6)

    def __str__(self) -> str:
        return ":".join(f"{b:02x}" for b in self.packed)


def _mac(value: str | MacAddress) -> MacAddress:
    return MacAddress.parse(value)


@attrs.frozen
class Route:
    """A unicast route that overlayd owns (marked with ``protocol``)."""

    dst: IPv4Network | IPv6Network
    dev: str
    gateway: AddressIP | None = None
    onlink: bool = False
    protocol: int = RTPROT_OVERLAYD
    table: int = RT_TABLE_MAIN
    metric: int = 0

    @property
    def key(self) -> tuple[str, int, IPv4Network | IPv6Network, int]:
        return ("route", self.table, self.dst, self.metric)

    def __str__(self) -> str:
        via = f" via {self.gateway}" if self.gateway is not None else ""
        return f"{self.dst}{via} dev {self.dev}{' onlink' if self.onlink else ''} proto {self.protocol}"


@attrs.frozen
class Neighbour:
    """A permanent neighbour (ARP) entry: ``dst`` answers at ``lladdr`` on ``dev``."""

    dst: AddressIP
    lladdr: MacAddress = attrs.field(converter=_mac)
    dev: str

    @property
    def key(self) -> tuple[str, str, AddressIP]:
        return ("neigh", self.dev, self.dst)

    def __str__(self) -> str:
        return f"{self.dst} lladdr {self.lladdr} dev {self.dev}"


@attrs.frozen
class FdbEntry:
    """A permanent forwarding entry on a VXLAN device: frames for ``lladdr`` go to ``dst``."""

    lladdr: MacAddress = attrs.field(converter=_mac)
    dst: AddressIP
    dev: str

    @property
    def key(self) -> tuple[str, str, MacAddress]:
        return ("fdb", self.dev, self.lladdr)

    def __str__(self) -> str:
        return f"{self.lladdr} dst {self.dst} dev {self.dev}"


def _device_names(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class KernelScope:
    """What a ``Network`` owns in the kernel, so the daemon can keep it in a notification-fed cache
    (:class:`overlayd.kernelcache.KernelCache`) instead of reading it back every pass: routes
    of *protocol* in *table* (IPv4 and IPv6), and the permanent neighbour (ARP and NDP) and FDB
    entries on each of *devices* (vxlan: ``flannel.<VNI>`` and ``flannel-v6.<VNI>``; a route
    backend owns none).  ``Network.kernel_cache()`` returns one (or None: no cache)."""

    devices: tuple[str, ...] = attrs.field(default=(), converter=_device_names)
    protocol: int = RTPROT_OVERLAYD
    table: int = RT_TABLE_MAIN


#: Everything :func:`overlayd.netlink.apply_plan` can program.
KernelObject = Route | Neighbour | FdbEntry


@attrs.frozen
class Link:
    """What overlayd needs to know about a network device, read from the kernel."""

    index: int
    name: str
    kind: str | None
    mac: MacAddress | None
    mtu: int
    up: bool
    info_data: Mapping[str, Any] = attrs.field(factory=dict, hash=False, eq=False)


@attrs.frozen
class Egress:
    """Where the kernel would send a packet: the output device and its preferred source address."""

    oif: int
    prefsrc: IPv4Address | None = None  # IPv4 only (an IPv6 lookup gives the device alone)
