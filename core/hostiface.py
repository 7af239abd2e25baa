"""Choosing the public (underlay) interface and IP, as flannel's ``--iface`` family does.

Order: ``--iface`` (names or IPs, first match wins), then ``--iface-regex`` (matched against
interface names and addresses), then ``--iface-can-reach`` (the interface the kernel would use
to reach that IP), else the interface of the default route.  ``--public-ip`` overrides the
advertised address (e.g. behind NAT) without changing the interface.  The kernel is read
through :mod:`overlayd.netlink`, like everywhere else.

Both families are read: the interface's IPv4 address becomes ``public_ip`` and its first global
IPv6 address (not link-local, which needs a zone, nor loopback) ``public_ipv6``, overridden by
``--public-ip`` / ``--public-ipv6``.  An interface needs only one of them here: which family the
network carries is known once the config is read, and the daemon then asks for the address of
each family it carries (an IPv6-only host has no IPv4 address at all).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv6Address
from typing import Any

import attrs

from . import netlink
from .errors import KernelError, UserError
from .peers import public_ip_problem
from .plugin import HostInfo


@attrs.frozen
class _Iface:
    name: str
    index: int
    mtu: int
    addrs: tuple[IPv4Address, ...]
    addrs6: tuple[IPv6Address, ...] = ()  # global IPv6 addresses only

    @property
    def all_addrs(self) -> tuple[IPv4Address | IPv6Address, ...]:
        return (*self.addrs, *self.addrs6)


def _interfaces(ipr: Any) -> list[_Iface]:
    """Every device with its IPv4 addresses and its global IPv6 ones: one dump per family."""
    v6 = {link.index: addrs for link, addrs in netlink.interfaces(ipr, socket.AF_INET6)}
    return [
        _Iface(
            name=link.name,
            index=link.index,
            mtu=link.mtu,
            addrs=addrs,
            addrs6=tuple(a for a in v6.get(link.index, ()) if isinstance(a, IPv6Address) and not a.is_loopback),
        )
        for link, addrs in netlink.ipv4_interfaces(ipr)
    ]


@attrs.frozen
class _Pinned:
    """``--public-ip`` and ``--public-ipv6``, validated."""

    v4: IPv4Address | None = None
    v6: IPv6Address | None = None


def _host(iface: _Iface, pinned: _Pinned, preferred: IPv4Address | IPv6Address | None = None) -> HostInfo:
    usable = [a for a in iface.addrs if not a.is_loopback and not a.is_link_local] or list(iface.addrs)
    addr = preferred if isinstance(preferred, IPv4Address) and preferred in iface.addrs else None
    addr = addr or (usable[0] if usable else None)
    addr6 = preferred if isinstance(preferred, IPv6Address) and preferred in iface.addrs6 else None
    addr6 = addr6 or (iface.addrs6[0] if iface.addrs6 else None)
    advertised, advertised6 = pinned.v4 or addr, pinned.v6 or addr6
    if advertised is None and advertised6 is None:
        raise UserError(
            f"interface {iface.name} has no IPv4 nor global IPv6 address; "
            "pass --public-ip / --public-ipv6 or choose another --iface"
        )
    return HostInfo(
        iface=iface.name,
        iface_index=iface.index,
        iface_mtu=iface.mtu,
        public_ip=advertised,
        public_ipv6=advertised6,
        iface_addr=addr,
    )


def _pin(flag: str, raw: str | None, kind: type[IPv4Address] | type[IPv6Address]) -> Any:
    if not raw:
        return None
    try:
        pinned = kind(raw)
    except ValueError as exc:
        raise UserError(f"{flag} {raw!r} is not an IPv{4 if kind is IPv4Address else 6} address") from exc
    problem = public_ip_problem(pinned)
    if problem is not None:
        raise UserError(f"{flag} {pinned} {problem}; peers could not reach this host there")
    return pinned


def select_host(
    ifaces: Sequence[str] = (),
    regexes: Sequence[str] = (),
    can_reach: str | None = None,
    public_ip: str | None = None,
    public_ipv6: str | None = None,
) -> HostInfo:
    """Pick the underlay interface in the current network namespace; ``UserError`` if none fits."""
    pinned = _Pinned(_pin("--public-ip", public_ip, IPv4Address), _pin("--public-ipv6", public_ipv6, IPv6Address))
    with netlink.iproute() as ipr:
        all_ifaces = _interfaces(ipr)
        by_name = {i.name: i for i in all_ifaces}
        for wanted in ifaces:
            try:
                ip = ipaddress.ip_address(wanted)
            except ValueError:
                if wanted in by_name:
                    return _host(by_name[wanted], pinned)
                continue
            for iface in all_ifaces:
                if ip in iface.all_addrs:
                    return _host(iface, pinned, preferred=ip)
        if ifaces:
            raise UserError(f"none of --iface {', '.join(ifaces)} exists here with an IP address")
        for pattern in regexes:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise UserError(f"--iface-regex {pattern!r} is not a valid regular expression: {exc}") from exc
            for iface in all_ifaces:
                for addr in iface.all_addrs:
                    if rx.fullmatch(str(addr)):
                        return _host(iface, pinned, preferred=addr)
                if rx.fullmatch(iface.name) and iface.all_addrs:
                    return _host(iface, pinned)
        if regexes:
            raise UserError(f"no interface matches --iface-regex {', '.join(regexes)}")
        target = can_reach
        if target:
            try:
                reach = ipaddress.ip_address(target)
            except ValueError as exc:
                raise UserError(f"--iface-can-reach {target!r} is not an IP address") from exc
            try:
                routes = netlink.route_get(ipr, reach)
            except KernelError as exc:
                raise UserError(f"--iface-can-reach {target}: no route to it ({exc}); pass --iface NAME") from exc
        else:
            routes = netlink.default_routes(ipr)
        for route in routes:
            for iface in all_ifaces:
                if iface.index == route.oif:
                    return _host(iface, pinned, preferred=route.prefsrc)
    where = f"a route to {can_reach}" if can_reach else "a default route"
    raise UserError(f"found no interface with {where}; pass --iface NAME or --iface-can-reach IP")
