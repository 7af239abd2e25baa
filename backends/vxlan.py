"""The ``vxlan`` backend: kernel VXLAN, programmed the way flannel does it.

Design history (flannel's ``backend/vxlan/vxlan.go`` explains the same choices at more length):

* flannel started with L2 multicast/learning and then moved to a **static, L3-routed** scheme:
  the device runs with ``nolearning`` and every remote host gets three kernel objects, written by
  the daemon from the leases and never learned on the wire:

  - route ``<peer subnet> via <peer subnet>.0 dev flannel.<VNI> onlink``: the peer's VTEP is the
    next hop, although no local address is on its subnet (hence ``onlink``);
  - permanent neighbour ``<peer subnet>.0 -> <peer VtepMAC>``: no ARP is ever sent;
  - permanent FDB entry ``<peer VtepMAC> dst <peer PublicIP>``: where to send the encapsulated frame.

  So the lease's BackendData must carry the VTEP MAC, which is why the device is created in
  ``prepare`` before the lease is acquired: a peer never sees a lease without a VtepMAC.
* The device keeps its MAC across restarts because a compatible existing device is kept, not
  recreated (flannel's ``ensureLink``).  When the device must be created (first start, reboot),
  its MAC is the ``mac`` given to :meth:`VxlanBackend.prepare` (a tool embedding the backend
  may pass a persisted one), else a MAC derived from (VNI, local underlay IP), which is what the
  daemon uses: nothing needs persisting.  The derived MAC is stable across
  reboots with no state at all, so peers' neighbour/FDB entries stay right even before they see
  the renewed lease; the kernel's random MAC (or systemd-udev's "persistent" policy) would not be.
* An incompatible device (different VNI, local address, underlay link, port, GBP, learning) is
  deleted and recreated, as flannel does: those cannot all be changed on a live VXLAN device.
* Reconciling rather than edge-triggered updates fixes flannel #2554-style drift: an entry
  removed behind our back returns on the next pass; even the device itself is recreated.
* DirectRouting: for a peer whose PublicIP lies in a subnet connected to our underlay interface,
  a plain route ``<subnet> via <PublicIP> dev <underlay>`` replaces the tunnel (no neighbour, no
  FDB).  flannel asks the kernel (``RouteGet`` has no gateway); the connected-subnet test is the
  same question answered from the interface's addresses, read in ``prepare``/``activate``.

Settings come from the network config's ``Backend`` object with flannel's keys (``VNI``, ``Port``,
``GBP``, ``DirectRouting``, ``MTU``; case-insensitive) **when present**, because that document is
shared by every host and all of them must agree on VNI, port and GBP; the ``--vxlan-*`` options
fill in what the config leaves out.  The options declare their keys (``option(config_key=...)``)
and the core's one resolver (``overlayd.plugin.apply_config_keys``) applies them and warns about
an option the config overrides.

The per-peer route, the read-back of our routes, apply and teardown come from the route backend
base (``overlayd.routenet.RouteNetwork``); this module adds the device, the neighbour and FDB
entries, and the VtepMAC as an exclusive claim (two leases with one MAC would share one FDB slot,
so ``overlayd.peers`` gives it to the older lease and reports the other; a peer is never given
our own MAC).

Kernel quirks: VXLAN's MTU may not exceed the underlay's minus the encapsulation (50 bytes over
IPv4, 70 over IPv6): at creation a larger MTU is silently clamped (``vxlan_config_apply``), later
it is refused with EINVAL (``vxlan_change_mtu``; drivers/net/vxlan/vxlan_core.c), so overlayd
rejects it up front as a config error.  An onlink route needs its device up.  Links: https://www.kernel.org/doc/Documentation/networking/vxlan.rst,
https://github.com/flannel-io/flannel/blob/master/pkg/backend/vxlan/vxlan.go
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address
from typing import Any

import attrs
from overlayd.sdk import (
    Backend,
    ConfigError,
    FdbEntry,
    GarbledLease,
    HostInfo,
    KernelError,
    KernelObject,
    Lease,
    MacAddress,
    Neighbour,
    Network,
    NetworkConfig,
    Route,
    RouteNetwork,
    apply_config_keys,
    netlink,
    option,
    to_bool,
)

log = logging.getLogger(__name__)

DEFAULT_PORT = 8472  # Linux's historical VXLAN port (flannel's default), not IANA's 4789
MAX_VNI = (1 << 24) - 1
OVERHEAD_V4 = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
OVERHEAD_V6 = 70  # outer IPv6 40 + UDP 8 + VXLAN 8 + inner Ethernet 14


@attrs.frozen
class VxlanOptions:
    vni: int = option(1, "VXLAN network identifier; the device is flannel.<VNI>", converter=int, config_key="VNI")
    port: int = option(DEFAULT_PORT, "UDP port for VXLAN traffic", converter=int, config_key="Port")
    mtu: int = option(
        0, "device MTU; 0 = underlay MTU - 50 (- 70 over an IPv6 underlay)", converter=int, config_key="MTU"
    )
    gbp: bool = option(False, "enable VXLAN Group Based Policy extension", converter=to_bool, config_key="GBP")
    direct_routing: bool = option(
        False,
        "route directly (no encapsulation) to peers on the same L2 segment",
        converter=to_bool,
        config_key="DirectRouting",
    )


@attrs.frozen
class VxlanSettings:
    """The effective settings: the config's ``Backend`` keys over the options, validated."""

    vni: int
    port: int
    mtu: int
    gbp: bool
    direct_routing: bool

    @property
    def device(self) -> str:
        return f"flannel.{self.vni}"

    @classmethod
    def resolve(cls, options: VxlanOptions, backend: Mapping[str, Any]) -> VxlanSettings:
        """Settings from *options* with the config's ``Backend`` keys applied (the core's resolver)."""
        return cls.validated(apply_config_keys(options, backend, "vxlan"))

    @classmethod
    def validated(cls, options: VxlanOptions) -> VxlanSettings:
        values = attrs.asdict(options)
        if values["port"] == 0:
            values["port"] = DEFAULT_PORT  # flannel: 0 means the kernel default
        if not 0 <= values["vni"] <= MAX_VNI:
            raise ConfigError(f"vxlan: VNI {values['vni']} is out of range (0..{MAX_VNI})")
        if not 1 <= values["port"] <= 65535:
            raise ConfigError(f"vxlan: Port {values['port']} is out of range (1..65535)")
        if values["mtu"] and not 68 <= values["mtu"] <= 65535:
            raise ConfigError(f"vxlan: MTU {values['mtu']} is out of range (68..65535, or 0 for automatic)")
        return cls(**values)


def vxlan_mtu(underlay_mtu: int, ipv6_underlay: bool = False) -> int:
    """The automatic device MTU: the underlay's minus the encapsulation overhead."""
    return underlay_mtu - (OVERHEAD_V6 if ipv6_underlay else OVERHEAD_V4)


def derived_mac(vni: int, local: IPv4Address | IPv6Address) -> MacAddress:
    """A stable, locally administered unicast MAC for this host's VTEP."""
    digest = bytearray(hashlib.sha256(f"overlayd-vxlan/{vni}/{local}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFC) | 0x02
    return MacAddress(bytes(digest))


def vtep_address(subnet: IPv4Network) -> IPv4Address:
    """The address a host puts on its VTEP (and peers route via): the subnet's network address."""
    return subnet.network_address


@attrs.frozen
class DeviceSpec:
    """The VXLAN device overlayd wants, and the compatibility test against an existing one."""

    name: str
    vni: int
    local: IPv4Address | IPv6Address
    link_index: int
    port: int
    gbp: bool
    mtu: int

    def incompatibility(self, link: netlink.Link) -> str | None:
        """Why *link* cannot be kept (None when it can)."""
        if link.kind != "vxlan":
            return f"it is a {link.kind or 'plain'} device, not vxlan"
        data = link.info_data
        local = data.get("IFLA_VXLAN_LOCAL") or data.get("IFLA_VXLAN_LOCAL6")
        checks = [
            ("VNI", data.get("IFLA_VXLAN_ID"), self.vni),
            ("local address", ipaddress.ip_address(local) if local else None, self.local),
            ("underlay device index", data.get("IFLA_VXLAN_LINK"), self.link_index),
            ("port", data.get("IFLA_VXLAN_PORT"), self.port),
            ("GBP", bool(data.get("IFLA_VXLAN_GBP")), self.gbp),
            ("learning", bool(data.get("IFLA_VXLAN_LEARNING")), False),
        ]
        for what, have, want in checks:
            if have != want:
                return f"{what} is {have}, want {want}"
        return None

    def create(self, ipr: Any, mac: MacAddress | None) -> None:
        netlink.add_vxlan(
            ipr,
            self.name,
            vni=self.vni,
            local=self.local,
            link_index=self.link_index,
            port=self.port,
            mtu=self.mtu,
            gbp=self.gbp,
            mac=mac,
        )


class VxlanNetwork(RouteNetwork):
    """One VXLAN device and the per-peer neighbour, FDB and route entries on it.

    Built on the route backend base: a peer gets :meth:`route_for`'s route, plus (unless it is
    reached by DirectRouting) the neighbour and FDB entry the route's next hop needs.
    """

    def __init__(
        self,
        settings: VxlanSettings,
        host: HostInfo,
        spec: DeviceSpec,
        mac: MacAddress,
        connected: frozenset[IPv4Network],
        created: bool = False,
        offline: bool = False,
    ) -> None:
        super().__init__(host, connected=connected, offline=offline)
        self.settings = settings
        self.overlay_port = settings.port
        self.spec = spec
        self.mac = mac
        self.lease: Lease | None = None
        #: True when ``prepare`` created (or recreated) the device, False when it kept one.
        self.created = created
        #: Over an IPv6 underlay (the VTEP's local address is IPv6) peers are reached at PublicIPv6.
        self.underlay_v6 = spec.local.version == 6

    @property
    def device(self) -> str:
        return self.spec.name

    @property
    def mtu(self) -> int:
        return self.spec.mtu

    def owned_device(self) -> str | None:
        return self.device

    @property
    def backend_data(self) -> Mapping[str, Any]:
        return {"VNI": self.settings.vni, "VtepMAC": str(self.mac)}

    # -- local setup ------------------------------------------------------------------------------

    def activate(self, lease: Lease) -> None:
        self.refuse_offline("vxlan: activate")
        if lease.subnet is None:
            raise ConfigError("vxlan needs an IPv4 subnet lease (EnableIPv4)")
        self.lease = lease
        with netlink.iproute() as ipr:
            self._configure(ipr, lease.subnet)
        self.refresh_connected()

    def _configure(self, ipr: Any, subnet: IPv4Network) -> None:
        link = netlink.get_link(ipr, self.device)
        if link is None:
            raise KernelError(f"VXLAN device {self.device} has disappeared")
        want = IPv4Interface(f"{vtep_address(subnet)}/32")
        netlink.configure_device(ipr, link, want, self.mtu)

    # -- peers ----------------------------------------------------------------------------------------

    def check_peer(self, lease: Lease) -> None:
        if lease.subnet is None:
            raise GarbledLease(f"lease {lease.key} has no IPv4 subnet; vxlan cannot route to it")
        if self.underlay_ip(lease) is None:
            raise GarbledLease(f"lease {lease.key} has no {'PublicIPv6' if self.underlay_v6 else 'PublicIP'}")
        self._peer_mac(lease)
        vni = (lease.attrs.backend_data or {}).get("VNI", self.settings.vni)
        if isinstance(vni, bool) or not isinstance(vni, int) or vni != self.settings.vni:
            raise GarbledLease(f"lease {lease.key}: BackendData VNI {vni!r} does not match ours ({self.settings.vni})")

    @staticmethod
    def _peer_mac(lease: Lease) -> MacAddress:
        raw_mac = (lease.attrs.backend_data or {}).get("VtepMAC")
        try:
            mac = MacAddress.parse(raw_mac)
        except ValueError as exc:
            raise GarbledLease(f"lease {lease.key}: BackendData VtepMAC {raw_mac!r} is not a MAC address") from exc
        if not mac.is_unicast:
            raise GarbledLease(f"lease {lease.key}: BackendData VtepMAC {raw_mac!r} is not a unicast MAC")
        return mac

    def exclusive_claims(self, lease: Lease) -> frozenset[tuple[str, str]]:
        """A VTEP MAC is one FDB slot: two leases with one MAC would steal each other's traffic."""
        try:
            return frozenset({("VtepMAC", str(self._peer_mac(lease)))})
        except GarbledLease:
            return frozenset()

    def underlay_ip(self, lease: Lease) -> IPv4Address | IPv6Address | None:
        return lease.attrs.public_ipv6 if self.underlay_v6 else lease.attrs.public_ip

    def route_for(self, lease: Lease) -> Route | None:
        subnet, public_ip = lease.subnet, self.underlay_ip(lease)
        if subnet is None or public_ip is None:
            return None
        if self.settings.direct_routing and self.on_link(public_ip):
            return Route(dst=subnet, gateway=public_ip, dev=self.host.iface)
        return Route(dst=subnet, gateway=vtep_address(subnet), dev=self.device, onlink=True)

    def objects_for(self, lease: Lease) -> list[KernelObject]:
        route, subnet, public_ip = self.route_for(lease), lease.subnet, self.underlay_ip(lease)
        if route is None or subnet is None or public_ip is None:
            return []
        if route.dev != self.device:
            return [route]  # DirectRouting: no tunnel, so no neighbour or FDB entry
        mac = self._peer_mac(lease)
        if mac == self.mac:
            return []  # never point our own MAC elsewhere (peers.valid_peers reports such a lease)
        return [
            Neighbour(dst=vtep_address(subnet), lladdr=mac, dev=self.device),
            FdbEntry(lladdr=mac, dst=public_ip, dev=self.device),
            route,
        ]

    def actual_state(self) -> frozenset[Any]:
        with netlink.iproute() as ipr:
            return (
                netlink.read_routes(ipr, protocol=self.protocol, table=self.table)
                | netlink.read_neighbours(ipr, self.device)
                | netlink.read_fdb(ipr, self.device)
            )

    def local_state_ok(self) -> bool:
        return netlink.link_exists(self.device)

    def before_apply(self, ipr: Any) -> None:
        if netlink.get_link(ipr, self.device) is None:
            log.warning("VXLAN device %s is gone; recreating it with MAC %s", self.device, self.mac)
            self.spec.create(ipr, self.mac)
            if self.lease is not None and self.lease.subnet is not None:
                self._configure(ipr, self.lease.subnet)

    def teardown(self) -> None:
        self.refuse_offline("vxlan: teardown")
        with netlink.iproute() as ipr:
            netlink.delete_link(ipr, self.device)
        super().teardown()


class VxlanBackend(Backend):
    """Kernel VXLAN: one flannel.<VNI> device, static neighbour/FDB/route entries per peer."""

    Options = VxlanOptions

    @classmethod
    def describe(cls, lease: Lease) -> Mapping[str, str]:
        data = lease.attrs.backend_data or {}
        return {"VtepMAC": str(data.get("VtepMAC") or "-")}

    @classmethod
    def probe_address(cls, lease: Lease) -> IPv4Address | None:
        """The peer's VTEP address ``<subnet>.0``: answering it needs the tunnel, nothing else."""
        return vtep_address(lease.subnet) if lease.subnet is not None else None

    def _spec(self, config: NetworkConfig, host: HostInfo) -> tuple[VxlanSettings, DeviceSpec]:
        settings = VxlanSettings.validated(self.effective_options(config))
        local = host.iface_addr or host.public_ip or host.public_ipv6
        if local is None:
            raise ConfigError(f"vxlan: interface {host.iface} has no address to use as the VTEP's local address")
        limit = vxlan_mtu(host.iface_mtu, ipv6_underlay=local.version == 6)
        if settings.mtu > limit:
            raise ConfigError(
                f"vxlan: MTU {settings.mtu} does not fit underlay {host.iface or local} (MTU {host.iface_mtu}); "
                f"use at most {limit}, or 0 for automatic"
            )
        mtu = settings.mtu or limit
        spec = DeviceSpec(
            name=settings.device,
            vni=settings.vni,
            local=local,
            link_index=host.iface_index,
            port=settings.port,
            gbp=settings.gbp,
            mtu=mtu,
        )
        return settings, spec

    def offline(self, config: NetworkConfig, host: HostInfo, own: Lease) -> Network:
        """A planning-only network: the device is not touched; the MAC comes from *own*'s lease.

        DirectRouting needs the underlay's connected subnets: they are read (not changed) when
        ``host.iface_index`` names a device here, else no peer counts as directly reachable.
        """
        settings, spec = self._spec(config, host)
        try:
            mac = MacAddress.parse((own.attrs.backend_data or {}).get("VtepMAC"))
        except ValueError:
            mac = derived_mac(spec.vni, spec.local)
        network = VxlanNetwork(settings, host, spec, mac, frozenset(), offline=True)
        if settings.direct_routing:
            network.refresh_connected()  # reads the kernel, changes nothing
        return network

    def prepare(self, config: NetworkConfig, host: HostInfo, *, mac: str | MacAddress | None = None) -> Network:
        settings, spec = self._spec(config, host)
        local = spec.local
        try:
            wanted = MacAddress.parse(mac) if mac is not None else None
        except ValueError as exc:
            raise ConfigError(f"vxlan: {exc}") from exc
        with netlink.iproute() as ipr:
            link = netlink.get_link(ipr, spec.name)
            created = False
            if link is not None:
                why = spec.incompatibility(link)
                if why is None:
                    log.debug("keeping existing %s (MAC %s)", spec.name, link.mac)
                else:
                    log.warning("%s exists with an incompatible configuration (%s); recreating it", spec.name, why)
                    netlink.delete_link(ipr, spec.name)
                    link = None
            if link is None:
                spec.create(ipr, wanted or derived_mac(spec.vni, local))
                created = True
                link = netlink.get_link(ipr, spec.name)
                if link is None:
                    raise KernelError(f"VXLAN device {spec.name} vanished right after it was created")
                log.info("created VXLAN device %s (VNI %s, port %s, MAC %s)", spec.name, spec.vni, spec.port, link.mac)
            if link.mac is None:
                raise KernelError(f"VXLAN device {spec.name} has no MAC address")
            connected = netlink.connected_networks(ipr, host.iface_index)
        return VxlanNetwork(settings, host, spec, link.mac, connected, created)
