"""The route backend base: "one route per peer, owned by us".

host-gw (``<subnet> via <peer PublicIP> dev <underlay>``), vxlan's DirectRouting and a cloud
route-table backend all program the same thing: for each peer lease at most one route, marked
with our route protocol so that only routes we made are ever read back and deleted (felix's
routetable and flannel's ``pkg/backend/route_network.go`` share the idea).  A backend built on
:class:`RouteNetwork` writes :meth:`RouteNetwork.route_for` and gets the rest:

* ``desired_state``: peers in key order, this host's own lease and stale leases of this host
  skipped, ``check_peer`` failures skipped (the daemon reports them), the first lease wins a
  contested kernel slot.  Pure.
* ``actual_state`` / ``apply`` / ``teardown`` through :mod:`overlayd.netlink`, idempotent;
  ``apply`` writes in batches (:func:`overlayd.netlink.apply_batch`).
* ``kernel_cache``: the daemon keeps our routes (and, with :meth:`RouteNetwork.owned_devices`,
  that device's neighbour and FDB entries) in a cache fed by netlink notifications, so a pass
  costs what changed, not what exists.
* the on-link test host-gw and DirectRouting need (:meth:`RouteNetwork.on_link`): is a peer's
  PublicIP inside a subnet connected to the underlay interface?  The connected subnets are read
  once in ``prepare``/``activate`` (:meth:`RouteNetwork.refresh_connected`).

**Dual stack, one code path.**  A peer lease holds one family (one store key) or both (a
Kubernetes Node); :meth:`RouteNetwork.desired_state` loops over ``lease.families`` that this
network carries (:attr:`RouteNetwork.families`) and asks ``route_for(lease, family)`` /
``objects_for(lease, family)`` with the family as a parameter, as the kernel and pyroute2 do.
The underlay address of family *f* is ``attrs.public_ip_of(f)`` (a v6 overlay over the v6
underlay: ``PublicIPv6``), and :meth:`RouteNetwork.on_link` knows the underlay's prefixes of
both families.

A backend that programs more than routes per peer (vxlan: a neighbour and an FDB entry too)
overrides :meth:`RouteNetwork.objects_for` and extends ``actual_state``/``apply``/``teardown``
rather than copying them.  A cloud backend whose "kernel" is an API overrides ``read_routes`` /
``write`` the same way, and returns None from ``kernel_cache`` (its state is not netlink's:
the daemon then reads ``actual_state`` every pass, the periodic describe).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from . import netlink
from .errors import GarbledLease, PermanentError
from .kernel import RT_TABLE_MAIN, RTPROT_OVERLAYD, KernelObject, KernelScope, Route
from .model import Lease
from .peers import names_this_host
from .plan import Plan
from .plugin import HostInfo, Network

log = logging.getLogger(__name__)


class RouteNetwork(Network):
    """A ``Network`` whose kernel state is (mostly) one owned route per peer."""

    #: Route protocol and table our routes carry; only routes with both are ever ours.
    protocol: int = RTPROT_OVERLAYD
    table: int = RT_TABLE_MAIN

    def __init__(
        self,
        host: HostInfo,
        *,
        connected: Iterable[IPv4Network | IPv6Network] = (),
        offline: bool = False,
        families: Iterable[int] = (4,),
    ) -> None:
        self.host = host
        #: Subnets (IPv4 and IPv6) on the underlay interface, for :meth:`on_link`.
        self.connected: frozenset[IPv4Network | IPv6Network] = frozenset(connected)
        #: The overlay families this network carries (the config's ``families``).
        self.families = tuple(families)
        #: A planning-only network (dry runs): ``apply``, ``activate`` and ``teardown`` refuse to run.
        self.offline = offline

    # -- what a subclass writes ---------------------------------------------------------------

    @abc.abstractmethod
    def route_for(self, lease: Lease, family: int) -> Route | None:
        """The one route to a valid peer *lease*'s subnet of overlay *family* (4 or 6), or None
        to route nothing to it."""

    def objects_for(self, lease: Lease, family: int) -> Iterable[KernelObject]:
        """Every kernel object for a valid peer's *family*; override to add more than the route."""
        route = self.route_for(lease, family)
        return () if route is None else (route,)

    # -- helpers ------------------------------------------------------------------------------

    def underlay_ip(self, lease: Lease, family: int) -> IPv4Address | IPv6Address | None:
        """The peer's underlay address for its overlay *family*: PublicIP, or PublicIPv6 for IPv6."""
        return lease.attrs.public_ip_of(family)

    def on_link(self, ip: IPv4Address | IPv6Address) -> bool:
        """True when *ip* lies in a subnet (of its family) connected to the underlay interface."""
        return any(ip.version == net.version and ip in net for net in self.connected)

    def is_own(self, own: Lease, lease: Lease) -> bool:
        """Is *lease* (one key of) this host's own lease, or holding one of its subnets?"""
        if lease.key == own.key or lease.key in own.keys:
            return True
        return any(lease.subnet_of(v) is not None and lease.subnet_of(v) == own.subnet_of(v) for v in lease.families)

    def refresh_connected(self) -> None:
        """Re-read the underlay interface's connected subnets (after its addresses may have changed)."""
        if self.host.iface_index > 0:
            with netlink.iproute() as ipr:
                self.connected = netlink.connected_networks(ipr, self.host.iface_index)

    def refuse_offline(self, what: str) -> None:
        if self.offline:
            raise PermanentError(f"{what} called on a planning-only (dry run) network")

    # -- the Network contract -----------------------------------------------------------------

    def activate(self, lease: Lease) -> None:
        self.refuse_offline("activate")
        self.refresh_connected()

    def desired_state(self, own: Lease, peers: Sequence[Lease]) -> frozenset[Any]:
        host_addresses = (self.host.public_ip, self.host.iface_addr, self.host.public_ipv6)
        out: dict[Any, KernelObject] = {}
        for lease in sorted(peers, key=lambda lease: lease.key):
            if self.is_own(own, lease):
                continue
            if names_this_host(own, lease, host_addresses) is not None:
                continue  # a stale lease of this very host: routing to ourselves would loop
            try:
                self.check_peer(lease)
            except GarbledLease:
                continue  # never program what cannot be justified; the daemon reports it
            for family in lease.families:
                if family not in self.families:
                    continue  # a family this network does not carry (peers.valid_peers reports it)
                for obj in self.objects_for(lease, family):
                    out.setdefault(obj.key, obj)  # first lease (by key) wins a contested slot
        return frozenset(out.values())

    def owned_devices(self) -> tuple[str, ...]:
        """The devices whose permanent neighbour and FDB entries are ours (vxlan's, one per family)."""
        return ()

    def kernel_cache(self) -> KernelScope | None:
        if self.offline:
            return None
        return KernelScope(devices=self.owned_devices(), protocol=self.protocol, table=self.table)

    def read_routes(self) -> frozenset[Route]:
        """Our routes (IPv4 and IPv6) as the kernel has them now."""
        with netlink.iproute() as ipr:
            return netlink.read_routes(ipr, protocol=self.protocol, table=self.table)

    def actual_state(self) -> frozenset[Any]:
        return self.read_routes()

    def apply(self, plan: Plan[Any]) -> None:
        self.refuse_offline("apply")
        if plan.empty:
            return
        if not self.local_state_ok():
            with netlink.iproute() as ipr:
                self.before_apply(ipr)
        netlink.apply_batch(plan)

    def local_state_ok(self) -> bool:
        """A cheap check before every apply: False runs :meth:`before_apply` with a netlink socket.

        The default is True unless ``before_apply`` is overridden: opening a pyroute2 socket per
        apply was a third of the daemon's CPU per event at 5000 peers.  Override it with a cheap
        test (vxlan: does the device exist?) when ``before_apply`` repairs something."""
        return type(self).before_apply is RouteNetwork.before_apply

    def before_apply(self, ipr: Any) -> None:
        """Hook run with a netlink socket before the plan when :meth:`local_state_ok` says so
        (vxlan recreates its device)."""

    def teardown(self) -> None:
        self.refuse_offline("teardown")
        with netlink.iproute() as ipr:
            for route in netlink.read_routes(ipr, protocol=self.protocol, table=self.table):
                netlink.delete_route(ipr, route)
