"""Choosing the public (underlay) interface and IP, as flannel's ``--iface`` family does.

Order: ``--iface`` (names or IPs, first match wins), then ``--iface-regex`` (matched against
interface names and addresses), then ``--iface-can-reach`` (the interface the kernel would use
to reach that IP), else the interface of the default route.  ``--public-ip`` overrides the
advertised address (e.g. behind NAT) without changing the interface.  The kernel is read
through :mod:`overlayd.netlink`, like everywhere else.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from ipaddress import IPv4Address
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


def _interfaces(ipr: Any) -> list[_Iface]:
    return [
        _Iface(name=link.name, index=link.index, mtu=link.mtu, addrs=addrs)
        for link, addrs in netlink.ipv4_interfaces(ipr)
    ]


def _host(iface: _Iface, public_ip: IPv4Address | None, preferred: IPv4Address | None = None) -> HostInfo:
    usable = [a for a in iface.addrs if not a.is_loopback and not a.is_link_local] or list(iface.addrs)
    addr = preferred if preferred in iface.addrs else (usable[0] if usable else None)
    advertised = public_ip or addr
    if advertised is None:
        raise UserError(f"interface {iface.name} has no IPv4 address; pass --public-ip or choose another --iface")
    return HostInfo(
        iface=iface.name, iface_index=iface.index, iface_mtu=iface.mtu, public_ip=advertised, iface_addr=addr
    )


def select_host(
    ifaces: Sequence[str] = (),
    regexes: Sequence[str] = (),
    can_reach: str | None = None,
    public_ip: str | None = None,
) -> HostInfo:
    """Pick the underlay interface in the current network namespace; ``UserError`` if none fits."""
    pinned = None
    if public_ip:
        try:
            pinned = IPv4Address(public_ip)
        except ValueError as exc:
            raise UserError(f"--public-ip {public_ip!r} is not an IPv4 address") from exc
        problem = public_ip_problem(pinned)
        if problem is not None:
            raise UserError(f"--public-ip {pinned} {problem}; peers could not reach this host there")
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
                if ip in iface.addrs:
                    return _host(iface, pinned, preferred=IPv4Address(int(ip)) if ip.version == 4 else None)
        if ifaces:
            raise UserError(f"none of --iface {', '.join(ifaces)} exists here with an IPv4 address")
        for pattern in regexes:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise UserError(f"--iface-regex {pattern!r} is not a valid regular expression: {exc}") from exc
            for iface in all_ifaces:
                for addr in iface.addrs:
                    if rx.fullmatch(str(addr)):
                        return _host(iface, pinned, preferred=addr)
                if rx.fullmatch(iface.name) and iface.addrs:
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
