"""The ``host-gw`` backend: every peer's subnet routed via the peer itself, no encapsulation.

Design history (flannel's ``pkg/backend/hostgw/hostgw.go`` and ``route_network.go``):

* host-gw is the oldest and fastest flannel backend: one kernel route per peer,
  ``<peer subnet> via <peer PublicIP> dev <underlay>``, so container traffic leaves with its own
  addresses and full MTU, and the underlay's routers never see a tunnel.  The price is that every
  host must be one hop from every other: the gateway of a route has to be on-link.  flannel added
  ``vxlan``'s ``DirectRouting`` later for clusters that are only partly on one segment.
* flannel refuses to start host-gw when the PublicIP differs from the interface address ("you're
  probably behind NAT"): a peer would route to an address that is not on the wire.  We refuse the
  same, as a configuration error naming both addresses, in :meth:`HostGwBackend.prepare`.
* flannel's route network programmed a route per lease event and only re-checked its own routes
  every ten seconds against its own cache; a route deleted by hand or a departed peer's left-over
  route could outlive the lease.  Here the route backend base
  (``overlayd.routenet.RouteNetwork``) reconciles desired against actual on every pass: drift is
  repaired, stale routes (only ours, marked with our route protocol) are removed, and a stale
  lease of this very host is never routed.
* A peer whose PublicIP is not in a subnet connected to the underlay interface cannot be a
  gateway.  flannel logged an error per event and tried anyway (the kernel answers "Nexthop has
  invalid gateway"); here :meth:`HostGwNetwork.check_peer` rejects it, so it is reported once per
  lease revision by the daemon with a sentence that says what to do, and never programmed.

* Dual stack: the IPv6 overlay is routed the same way over the IPv6 underlay,
  ``<peer v6 subnet> via <peer PublicIPv6> dev <underlay>``; the on-link test uses the
  interface's IPv6 prefixes (link-local aside).  One code path, the family as a parameter:
  ``route_for(lease, family)`` with ``attrs.public_ip_of(family)``.  host-gw keeps nothing per
  family, so ``BackendV6Data`` is empty too.

BackendData is empty; the container MTU is the underlay MTU (nothing is added to a packet).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from overlayd.sdk import (
    Backend,
    ConfigError,
    GarbledLease,
    HostInfo,
    Lease,
    Network,
    NetworkConfig,
    NoOptions,
    Route,
    RouteNetwork,
)

log = logging.getLogger(__name__)


class HostGwNetwork(RouteNetwork):
    """One route per peer on the underlay interface, gateway = the peer's PublicIP."""

    @property
    def mtu(self) -> int:
        return self.host.iface_mtu

    @property
    def backend_data(self) -> Mapping[str, Any]:
        return {}

    @property
    def backend_v6_data(self) -> Mapping[str, Any] | None:
        return {} if 6 in self.families else None

    def activate(self, lease: Lease) -> None:
        missing = [v for v in self.families if lease.subnet_of(v) is None]
        if missing:
            raise ConfigError(f"host-gw needs an IPv{missing[0]} subnet lease (the network enables IPv{missing[0]})")
        super().activate(lease)

    def check_peer(self, lease: Lease) -> None:
        for family in lease.families:
            name = "PublicIP" if family == 4 else "PublicIPv6"
            ip = lease.attrs.public_ip_of(family)
            if ip is None or ip.version != family:
                raise GarbledLease(f"lease {lease.key} has no {name}; host-gw cannot route its IPv{family} subnet")
            if not self.on_link(ip):
                nets = ", ".join(sorted(str(n) for n in self.connected if n.version == family)) or "none"
                raise GarbledLease(
                    f"{name} {ip} is not on-link on {self.host.iface} (connected: {nets}); host-gw needs "
                    "every host on one L2 segment: use vxlan with DirectRouting for a routed underlay"
                )

    def route_for(self, lease: Lease, family: int) -> Route | None:
        subnet, gateway = lease.subnet_of(family), lease.attrs.public_ip_of(family)
        if subnet is None or gateway is None:
            return None
        return Route(dst=subnet, gateway=gateway, dev=self.host.iface)


class HostGwBackend(Backend):
    """Route each peer's subnet via its PublicIP on the underlay; all hosts on one L2 segment."""

    Options = NoOptions

    @staticmethod
    def _check_host(config: NetworkConfig, host: HostInfo) -> None:
        if 6 in config.families and host.public_ipv6 is None:
            raise ConfigError(
                f"host-gw: the network enables IPv6 but interface {host.iface} has no IPv6 address "
                "(give one, or --public-ipv6)"
            )
        if 4 not in config.families:
            return
        if host.public_ip is None:
            raise ConfigError(f"host-gw: interface {host.iface} has no IPv4 address")
        if host.iface_addr is not None and host.iface_addr != host.public_ip:
            raise ConfigError(
                f"host-gw: public IP {host.public_ip} is not the address of {host.iface} ({host.iface_addr}); "
                "this host looks to be behind NAT, which host-gw cannot route through: drop --public-ip "
                "or use the vxlan backend"
            )

    def prepare(self, config: NetworkConfig, host: HostInfo) -> Network:
        self._check_host(config, host)
        network = HostGwNetwork(host, families=config.families)
        network.refresh_connected()
        network.created = False  # nothing is created before the first pass: a failed start removes nothing
        return network

    def offline(self, config: NetworkConfig, host: HostInfo, own: Lease) -> Network:
        network = HostGwNetwork(host, offline=True, families=config.families)
        if host.iface_index > 0:
            network.refresh_connected()  # reads the kernel, changes nothing
        return network
