"""The ``udp`` backend: userspace encapsulation through a TUN device, flannel's ``udp`` on the wire.

flannel keeps this backend "for debugging or very old kernels": no kernel tunnel module, just a
TUN device and a UDP socket.  Every host has

* TUN device ``flannel0`` (no packet-info header) with address ``<subnet>.0/32`` and MTU =
  underlay - 28 (outer IPv4 20 + UDP 8), made persistent so that it, its address and routes
  survive a forwarder restart;
* one route, ``<network> dev flannel0``, marked with our route protocol (the per-host subnet on
  cni0 is more specific, so only traffic for other hosts enters the TUN);
* a forwarder child process (:mod:`overlayd.udpfwd`) bound to ``<PublicIP>:<port>`` that moves
  packets between the two, one IP packet per datagram.

The per-peer state is not in the kernel but in the forwarder's table.  It is reconciled like
kernel state: :meth:`UdpNetwork.desired_state` has one :class:`Forward` entry per valid peer
(built on the route backend base, so own/stale/garbled leases are skipped the same way),
:meth:`UdpNetwork.actual_state` reports the table the running child holds — nothing when the
child has died — and :meth:`UdpNetwork.apply` restarts a dead child and pushes the whole new
table, which the child swaps in between two packets.  So a crashed forwarder is restarted by
the daemon's next pass, and a lease change never restarts it.

Settings: ``Port`` from the network config's ``Backend`` object beats ``--udp-port`` (every host
must agree); ``--udp-offload`` (default on) enables TSO on the TUN, UDP GSO and UDP GRO, each
falling back to one packet per system call when the kernel refuses it.
Link: https://github.com/flannel-io/flannel/blob/master/pkg/backend/udp/udp_network_amd64.go
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from typing import Any

import attrs
from overlayd.sdk import (
    COUNTERS,
    Backend,
    ConfigError,
    ForwarderProcess,
    ForwardingTable,
    GarbledLease,
    HostInfo,
    KernelError,
    Lease,
    Network,
    NetworkConfig,
    Plan,
    Route,
    RouteNetwork,
    apply_config_keys,
    netlink,
    option,
    to_bool,
    tun,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 8285
DEVICE = "flannel0"
OVERHEAD = 28  # outer IPv4 20 + UDP 8: the inner IP packet is the whole payload


@attrs.frozen
class UdpOptions:
    port: int = option(DEFAULT_PORT, "UDP port the forwarder listens and sends on", converter=int, config_key="Port")
    offload: bool = option(
        True,
        "use TSO on the TUN device, UDP GSO and UDP GRO when the kernel has them (else one packet per syscall)",
        converter=to_bool,
    )


@attrs.frozen
class Forward:
    """One forwarding-table entry: packets for *subnet* go to *peer* (the forwarder's state)."""

    subnet: IPv4Network
    peer: IPv4Address

    @property
    def key(self) -> tuple[str, IPv4Network]:
        return ("udp-forward", self.subnet)

    def __str__(self) -> str:
        return f"{self.subnet} -> udp {self.peer}"


class UdpNetwork(RouteNetwork):
    """The TUN device, the whole-network route, and the forwarder child with its table."""

    def __init__(
        self,
        host: HostInfo,
        network: IPv4Network,
        port: int,
        offload: bool,
        mtu: int,
        created: bool = False,
        offline: bool = False,
    ) -> None:
        super().__init__(host, offline=offline)
        self.network = network
        self.port = port
        self.offload = offload
        self._mtu = mtu
        self.created = created
        self.lease: Lease | None = None
        self.forwarder: ForwarderProcess | None = None
        #: The UDP port peers send to (the firewall's overlay-port allow-list lets it in).
        self.overlay_port: int | None = port

    @property
    def device(self) -> str:
        return DEVICE

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def backend_data(self) -> Mapping[str, Any]:
        return {}  # flannel's udp leases carry no BackendData: a peer needs only the PublicIP

    @property
    def network_route(self) -> Route:
        return Route(dst=self.network, dev=self.device)

    # -- local setup ------------------------------------------------------------------------------

    def activate(self, lease: Lease) -> None:
        self.refuse_offline("udp: activate")
        if lease.subnet is None:
            raise ConfigError("udp needs an IPv4 subnet lease (EnableIPv4)")
        if self.host.public_ip is None:
            raise ConfigError(f"udp: interface {self.host.iface} has no IPv4 address to bind the forwarder to")
        self.lease = lease
        with netlink.iproute() as ipr:
            self._configure(ipr, lease.subnet)
        if self.forwarder is None:
            self.forwarder = ForwarderProcess(self.device, self.host.public_ip, self.port, self.offload)
            self.forwarder.start()

    def _configure(self, ipr: Any, subnet: IPv4Network) -> None:
        link = netlink.get_link(ipr, self.device)
        if link is None:
            tun.create_persistent(self.device)
            link = netlink.get_link(ipr, self.device)
            if link is None:
                raise KernelError(f"TUN device {self.device} vanished right after it was created")
        want = IPv4Interface(f"{subnet.network_address}/32")
        netlink.configure_device(ipr, link, want, self.mtu)

    # -- peers ------------------------------------------------------------------------------------

    def check_peer(self, lease: Lease) -> None:
        if lease.subnet is None:
            raise GarbledLease(f"lease {lease.key} has no IPv4 subnet; udp cannot route to it")
        if lease.attrs.public_ip is None:
            raise GarbledLease(f"lease {lease.key} has no PublicIP")

    def route_for(self, lease: Lease, family: int) -> Route | None:
        return None  # no kernel route per peer: the forwarder's table does it

    def objects_for(self, lease: Lease, family: int) -> Iterable[Any]:
        if family != 4 or lease.subnet is None or lease.attrs.public_ip is None:
            return ()
        return (Forward(lease.subnet, lease.attrs.public_ip),)

    def desired_state(self, own: Lease, peers: Sequence[Lease]) -> frozenset[Any]:
        return super().desired_state(own, peers) | {self.network_route}

    def kernel_cache(self) -> None:
        """No kernel cache: the forwarder's table is not kernel state, and the whole-network route
        belongs to no one peer, so the daemon keeps the un-cached loop (``actual_state`` per pass)."""
        return None

    def actual_state(self) -> frozenset[Any]:
        forwarder = self.forwarder
        table = forwarder.table if forwarder is not None and forwarder.alive else None
        entries = frozenset(Forward(s, p) for s, p in table.routes) if table is not None else frozenset()
        return self.read_routes() | entries

    def apply(self, plan: Plan[Any]) -> None:
        self.refuse_offline("udp: apply")
        if plan.empty:
            return
        routes = Plan(
            add=frozenset(o for o in plan.add if isinstance(o, Route)),
            remove=frozenset(o for o in plan.remove if isinstance(o, Route)),
        )
        with netlink.iproute() as ipr:
            if self.lease is not None and self.lease.subnet is not None:
                self._configure(ipr, self.lease.subnet)  # recreates a deleted device
            netlink.apply_plan(ipr, routes)
        forwards = [o for o in plan.add | plan.remove if isinstance(o, Forward)]
        if not forwards or self.forwarder is None:
            return
        if not self.forwarder.alive:
            if self.forwarder.starts:
                log.warning("udp forwarder (pid %s) is gone; restarting it", self.forwarder.last.get("pid", "?"))
            self.forwarder.start()
        current = self.forwarder.table.routes if self.forwarder.table is not None else ()
        slots = {subnet: peer for subnet, peer in current}
        for entry in plan.remove:
            if isinstance(entry, Forward) and slots.get(entry.subnet) == entry.peer:
                del slots[entry.subnet]
        for entry in plan.add:
            if isinstance(entry, Forward):
                slots[entry.subnet] = entry.peer
        self.forwarder.push(ForwardingTable(slots.items()))

    def counters(self) -> Mapping[str, int]:
        """Forwarder counters since the daemon started (restarts included), per direction.

        ``tx_*`` is TUN -> peers, ``rx_*`` is peers -> TUN; ``rx_spoofed`` (also in ``rx_drops``)
        counts datagrams from a non-peer or with an inner source outside the sender's lease;
        ``restarts`` counts forwarders the daemon had to start again.  Asks the live child over
        its control socket (thread-safe: the metrics thread calls this).
        """
        if self.forwarder is None:
            return {name: 0 for name in (*COUNTERS, "restarts")}
        return {**self.forwarder.counters(), "restarts": max(0, self.forwarder.starts - 1)}

    def teardown(self) -> None:
        self.refuse_offline("udp: teardown")
        if self.forwarder is not None:
            self.forwarder.stop()
        super().teardown()
        with netlink.iproute() as ipr:
            tun.delete_persistent(self.device)
            netlink.delete_link(ipr, self.device)


class UdpBackend(Backend):
    """Userspace UDP encapsulation through TUN device flannel0 (flannel's ``udp`` backend)."""

    Options = UdpOptions

    def _settings(self, config: NetworkConfig, host: HostInfo) -> tuple[IPv4Network, UdpOptions, int]:
        options: UdpOptions = apply_config_keys(self.options, config.backend, "udp")
        port = options.port or DEFAULT_PORT
        if not 1 <= port <= 65535:
            raise ConfigError(f"udp: Port {port} is out of range (1..65535)")
        if config.network is None:
            raise ConfigError("udp needs an IPv4 Network in the network config")
        mtu = host.iface_mtu - OVERHEAD
        if mtu < 68:
            raise ConfigError(f"udp: underlay {host.iface} MTU {host.iface_mtu} leaves less than 68 bytes for the TUN")
        return config.network, attrs.evolve(options, port=port), mtu

    def offline(self, config: NetworkConfig, host: HostInfo, own: Lease) -> Network:
        network, options, mtu = self._settings(config, host)
        return UdpNetwork(host, network, options.port, options.offload, mtu, offline=True)

    def prepare(self, config: NetworkConfig, host: HostInfo) -> Network:
        network, options, mtu = self._settings(config, host)
        with netlink.iproute() as ipr:
            link = netlink.get_link(ipr, DEVICE)
            created = False
            if link is not None and link.kind != "tun":
                log.warning("%s exists but is a %s device; recreating it as a TUN", DEVICE, link.kind or "plain")
                netlink.delete_link(ipr, DEVICE)
                link = None
            if link is None:
                tun.create_persistent(DEVICE)
                created = True
                log.info("created TUN device %s (MTU %d)", DEVICE, mtu)
        return UdpNetwork(host, network, options.port, options.offload, mtu, created=created)
