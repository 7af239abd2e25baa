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
from collections.abc import Iterable, Mapping
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address, IPv6Interface, IPv6Network
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


def vtep_address(subnet: IPv4Network | IPv6Network) -> IPv4Address | IPv6Address:
    """The address a host puts on its VTEP (and peers route via): the subnet's network address.

    For IPv6 that is the subnet-router anycast address of the /64, but on a /128 the kernel
    joins no anycast group (RFC 6164, ``addrconf_join_anycast``), so it is an ordinary unicast
    address there, as flannel uses it."""
    return subnet.network_address


def device_name(vni: int, family: int) -> str:
    """``flannel.<VNI>`` for the IPv4 overlay, ``flannel-v6.<VNI>`` for the IPv6 overlay (flannel's names)."""
    return f"flannel.{vni}" if family == 4 else f"flannel-v6.{vni}"


def mac_claim(family: int) -> str:
    """The exclusive-claim name of a VTEP MAC of overlay *family* (one FDB slot per device)."""
    return "VtepMAC" if family == 4 else "v6 VtepMAC"


@attrs.frozen
class DeviceSpec:
    """The VXLAN device overlayd wants for one overlay family, and the compatibility test against
    an existing one.  The IPv4 and IPv6 devices are two instances of this, differing only in
    their values (name, local address, MTU, *family*)."""

    name: str
    vni: int
    local: IPv4Address | IPv6Address
    link_index: int
    port: int
    gbp: bool
    mtu: int
    #: The overlay family the device carries (its VTEP address and peers' subnets): 4 or 6.
    family: int = 4

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

    def vtep_interface(self, subnet: IPv4Network | IPv6Network) -> IPv4Interface | IPv6Interface:
        """The device's own address for our *subnet*: its network address, /32 or /128."""
        return ipaddress.ip_interface(f"{vtep_address(subnet)}/{subnet.max_prefixlen}")

    def ensure(self, ipr: Any, wanted: MacAddress | None) -> tuple[netlink.Link, bool]:
        """Keep a compatible device (and its MAC), else (re)create it with *wanted* or the derived
        MAC; returns the link and whether it was created."""
        link = netlink.get_link(ipr, self.name)
        if link is not None:
            why = self.incompatibility(link)
            if why is None:
                log.debug("keeping existing %s (MAC %s)", self.name, link.mac)
                return link, False
            log.warning("%s exists with an incompatible configuration (%s); recreating it", self.name, why)
            netlink.delete_link(ipr, self.name)
        self.create(ipr, wanted or derived_mac(self.vni, self.local))
        link = netlink.get_link(ipr, self.name)
        if link is None:
            raise KernelError(f"VXLAN device {self.name} vanished right after it was created")
        log.info("created VXLAN device %s (VNI %s, port %s, MAC %s)", self.name, self.vni, self.port, link.mac)
        return link, True


@attrs.frozen
class Vtep:
    """One VXLAN endpoint of this host: the device of one overlay family and its MAC."""

    spec: DeviceSpec
    mac: MacAddress

    @property
    def family(self) -> int:
        return self.spec.family

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def underlay_version(self) -> int:
        """The family peers are reached over: that of the local address (PublicIP / PublicIPv6)."""
        return self.spec.local.version


class VxlanNetwork(RouteNetwork):
    """One VXLAN device per overlay family and the per-peer neighbour, FDB and route entries on it.

    Built on the route backend base: a peer gets :meth:`route_for`'s route, plus (unless it is
    reached by DirectRouting) the neighbour and FDB entry the route's next hop needs, for each
    family with the family as a parameter.
    """

    def __init__(
        self,
        settings: VxlanSettings,
        host: HostInfo,
        vteps: Iterable[Vtep],
        connected: Iterable[IPv4Network | IPv6Network],
        created: bool = False,
        offline: bool = False,
    ) -> None:
        self.vteps: dict[int, Vtep] = {vtep.family: vtep for vtep in vteps}
        if not self.vteps:
            raise ConfigError("vxlan: the network enables neither IPv4 nor IPv6")
        super().__init__(host, connected=connected, offline=offline, families=sorted(self.vteps))
        self.settings = settings
        self.overlay_port = settings.port
        self.lease: Lease | None = None
        #: True when ``prepare`` created (or recreated) a device, False when it kept them all.
        self.created = created

    @property
    def primary(self) -> Vtep:
        """The IPv4 VTEP, or the IPv6 one on an IPv6-only network."""
        return self.vteps[self.families[0]]

    @property
    def device(self) -> str:
        return self.primary.name

    @property
    def spec(self) -> DeviceSpec:
        return self.primary.spec

    @property
    def mac(self) -> MacAddress:
        return self.primary.mac

    @property
    def mtu(self) -> int:
        """The containers' MTU: the smallest of the devices' (one FLANNEL_MTU for both families)."""
        return min(vtep.spec.mtu for vtep in self.vteps.values())

    def owned_devices(self) -> tuple[str, ...]:
        return tuple(vtep.name for vtep in self.vteps.values())

    def _data(self, family: int) -> Mapping[str, Any] | None:
        vtep = self.vteps.get(family)
        return None if vtep is None else {"VNI": self.settings.vni, "VtepMAC": str(vtep.mac)}

    @property
    def backend_data(self) -> Mapping[str, Any]:
        return self._data(4) or {}

    @property
    def backend_v6_data(self) -> Mapping[str, Any] | None:
        return self._data(6)

    # -- local setup ------------------------------------------------------------------------------

    def activate(self, lease: Lease) -> None:
        self.refuse_offline("vxlan: activate")
        missing = [family for family in self.families if lease.subnet_of(family) is None]
        if missing:
            raise ConfigError(f"vxlan needs an IPv{missing[0]} subnet lease (the network enables IPv{missing[0]})")
        self.lease = lease
        with netlink.iproute() as ipr:
            for vtep in self.vteps.values():
                self._configure(ipr, vtep, lease)
        self.refresh_connected()

    def _configure(self, ipr: Any, vtep: Vtep, lease: Lease) -> None:
        link = netlink.get_link(ipr, vtep.name)
        if link is None:
            raise KernelError(f"VXLAN device {vtep.name} has disappeared")
        subnet = lease.subnet_of(vtep.family)
        want = vtep.spec.vtep_interface(subnet) if subnet is not None else None
        netlink.configure_device(ipr, link, want, vtep.spec.mtu)

    # -- peers ----------------------------------------------------------------------------------------

    def check_peer(self, lease: Lease) -> None:
        for family in lease.families:
            vtep = self.vteps.get(family)
            if vtep is None:
                raise GarbledLease(f"lease {lease.key} has an IPv{family} subnet; this network carries no IPv{family}")
            if self.underlay_ip(lease, family) is None:
                raise GarbledLease(
                    f"lease {lease.key} has no {'PublicIPv6' if vtep.underlay_version == 6 else 'PublicIP'}"
                )
            self._peer_mac(lease, family)
            field = "BackendData" if family == 4 else "BackendV6Data"
            vni = lease.attrs.backend_data_of(family).get("VNI", self.settings.vni)
            if isinstance(vni, bool) or not isinstance(vni, int) or vni != self.settings.vni:
                raise GarbledLease(f"lease {lease.key}: {field} VNI {vni!r} does not match ours ({self.settings.vni})")

    @staticmethod
    def _peer_mac(lease: Lease, family: int) -> MacAddress:
        field = "BackendData" if family == 4 else "BackendV6Data"
        raw_mac = lease.attrs.backend_data_of(family).get("VtepMAC")
        try:
            mac = MacAddress.parse(raw_mac)
        except ValueError as exc:
            raise GarbledLease(f"lease {lease.key}: {field} VtepMAC {raw_mac!r} is not a MAC address") from exc
        if not mac.is_unicast:
            raise GarbledLease(f"lease {lease.key}: {field} VtepMAC {raw_mac!r} is not a unicast MAC")
        return mac

    def exclusive_claims(self, lease: Lease) -> frozenset[tuple[str, str]]:
        """A VTEP MAC is one FDB slot of its family's device: two leases with one MAC would steal
        each other's traffic.  Claimed per family the lease holds, so the IPv4 and IPv6 leases of
        one dual-stack host (one attrs document, both MACs) never contest each other."""
        claims = set()
        for family in lease.families:
            try:
                claims.add((mac_claim(family), str(self._peer_mac(lease, family))))
            except GarbledLease:
                continue
        return frozenset(claims)

    def underlay_ip(self, lease: Lease, family: int) -> IPv4Address | IPv6Address | None:
        vtep = self.vteps.get(family)
        return None if vtep is None else lease.attrs.public_ip_of(vtep.underlay_version)

    def route_for(self, lease: Lease, family: int) -> Route | None:
        vtep = self.vteps.get(family)
        subnet, public_ip = lease.subnet_of(family), self.underlay_ip(lease, family)
        if vtep is None or subnet is None or public_ip is None:
            return None
        if self.settings.direct_routing and self.on_link(public_ip) and public_ip.version == family:
            return Route(dst=subnet, gateway=public_ip, dev=self.host.iface)
        return Route(dst=subnet, gateway=vtep_address(subnet), dev=vtep.name, onlink=True)

    def objects_for(self, lease: Lease, family: int) -> list[KernelObject]:
        route, subnet, public_ip = (
            self.route_for(lease, family),
            lease.subnet_of(family),
            self.underlay_ip(lease, family),
        )
        vtep = self.vteps.get(family)
        if route is None or subnet is None or public_ip is None or vtep is None:
            return []
        if route.dev != vtep.name:
            return [route]  # DirectRouting: no tunnel, so no neighbour or FDB entry
        mac = self._peer_mac(lease, family)
        if mac == vtep.mac:
            return []  # never point our own MAC elsewhere (peers.valid_peers reports such a lease)
        return [
            Neighbour(dst=vtep_address(subnet), lladdr=mac, dev=vtep.name),
            FdbEntry(lladdr=mac, dst=public_ip, dev=vtep.name),
            route,
        ]

    def actual_state(self) -> frozenset[Any]:
        with netlink.iproute() as ipr:
            state: frozenset[Any] = netlink.read_routes(ipr, protocol=self.protocol, table=self.table)
            for vtep in self.vteps.values():
                state |= netlink.read_neighbours(ipr, vtep.name) | netlink.read_fdb(ipr, vtep.name)
            return state

    def local_state_ok(self) -> bool:
        return all(netlink.link_exists(vtep.name) for vtep in self.vteps.values())

    def before_apply(self, ipr: Any) -> None:
        for vtep in self.vteps.values():
            if netlink.get_link(ipr, vtep.name) is None:
                log.warning("VXLAN device %s is gone; recreating it with MAC %s", vtep.name, vtep.mac)
                vtep.spec.create(ipr, vtep.mac)
                if self.lease is not None:
                    self._configure(ipr, vtep, self.lease)

    def teardown(self) -> None:
        self.refuse_offline("vxlan: teardown")
        with netlink.iproute() as ipr:
            for vtep in self.vteps.values():
                netlink.delete_link(ipr, vtep.name)
        super().teardown()


#: IPv6 refuses to run on a device with a smaller MTU (RFC 8200): the kernel disables it there.
IPV6_MIN_MTU = 1280


class VxlanBackend(Backend):
    """Kernel VXLAN: flannel.<VNI> (and flannel-v6.<VNI>), static neighbour/FDB/route entries per peer."""

    Options = VxlanOptions

    @classmethod
    def describe(cls, lease: Lease) -> Mapping[str, str]:
        macs = [str(lease.attrs.backend_data_of(f).get("VtepMAC") or "-") for f in lease.families or (4,)]
        return {"VtepMAC": " ".join(macs)}

    @classmethod
    def probe_address(cls, lease: Lease) -> IPv4Address | IPv6Address | None:
        """The peer's VTEP address (``<subnet>.0``, or the v6 subnet's network address on an
        IPv6-only lease): answering it needs the tunnel, nothing else."""
        subnet = lease.subnet if lease.subnet is not None else lease.ipv6_subnet
        return vtep_address(subnet) if subnet is not None else None

    def _spec(self, config: NetworkConfig, host: HostInfo, family: int) -> DeviceSpec:
        settings = VxlanSettings.validated(self.effective_options(config))
        local: IPv4Address | IPv6Address | None
        if family == 4:
            local = host.iface_addr or host.public_ip or host.public_ipv6
            if local is None:
                raise ConfigError(f"vxlan: interface {host.iface} has no address to use as the VTEP's local address")
        else:
            local = host.public_ipv6
            if local is None:
                raise ConfigError(
                    f"vxlan: the network enables IPv6 but interface {host.iface} has no global IPv6 address "
                    "for flannel-v6's local address: give it one, or --public-ipv6"
                )
        name = device_name(settings.vni, family)
        limit = vxlan_mtu(host.iface_mtu, ipv6_underlay=local.version == 6)
        if settings.mtu > limit:
            raise ConfigError(
                f"vxlan: MTU {settings.mtu} does not fit {name} over underlay {host.iface or local} "
                f"(MTU {host.iface_mtu}); use at most {limit}, or 0 for automatic"
            )
        mtu = settings.mtu or limit
        if family == 6 and mtu < IPV6_MIN_MTU:
            raise ConfigError(
                f"vxlan: {name} would get MTU {mtu}, below IPv6's minimum of {IPV6_MIN_MTU}; "
                f"the underlay {host.iface or local} needs an MTU of at least {IPV6_MIN_MTU + host.iface_mtu - limit}"
            )
        return DeviceSpec(
            name=name,
            vni=settings.vni,
            local=local,
            link_index=host.iface_index,
            port=settings.port,
            gbp=settings.gbp,
            mtu=mtu,
            family=family,
        )

    def _specs(self, config: NetworkConfig, host: HostInfo) -> tuple[VxlanSettings, list[DeviceSpec]]:
        settings = VxlanSettings.validated(self.effective_options(config))
        if not config.families:
            raise ConfigError("vxlan: the network enables neither IPv4 nor IPv6")
        return settings, [self._spec(config, host, family) for family in config.families]

    def offline(self, config: NetworkConfig, host: HostInfo, own: Lease) -> Network:
        """A planning-only network: the devices are not touched; the MACs come from *own*'s lease.

        DirectRouting needs the underlay's connected subnets: they are read (not changed) when
        ``host.iface_index`` names a device here, else no peer counts as directly reachable.
        """
        settings, specs = self._specs(config, host)
        vteps = []
        for spec in specs:
            try:
                mac = MacAddress.parse(own.attrs.backend_data_of(spec.family).get("VtepMAC"))
            except ValueError:
                mac = derived_mac(spec.vni, spec.local)
            vteps.append(Vtep(spec, mac))
        network = VxlanNetwork(settings, host, vteps, frozenset(), offline=True)
        if settings.direct_routing:
            network.refresh_connected()  # reads the kernel, changes nothing
        return network

    def prepare(
        self,
        config: NetworkConfig,
        host: HostInfo,
        *,
        mac: str | MacAddress | None = None,
        mac_v6: str | MacAddress | None = None,
    ) -> Network:
        """Create (or keep) one device per family the network enables; *mac* / *mac_v6* are used
        when the IPv4 / IPv6 device has to be created (else the MAC derived from VNI and local
        address).  A device of a family the network no longer enables is removed."""
        settings, specs = self._specs(config, host)
        try:
            wanted = {4: MacAddress.parse(mac) if mac is not None else None}
            wanted[6] = MacAddress.parse(mac_v6) if mac_v6 is not None else None
        except ValueError as exc:
            raise ConfigError(f"vxlan: {exc}") from exc
        vteps: list[Vtep] = []
        created = False
        with netlink.iproute() as ipr:
            for family in (4, 6):
                if family not in config.families and netlink.get_link(ipr, device_name(settings.vni, family)):
                    log.info(
                        "removing %s: the network no longer enables IPv%s", device_name(settings.vni, family), family
                    )
                    netlink.delete_link(ipr, device_name(settings.vni, family))
            for spec in specs:
                link, made = spec.ensure(ipr, wanted[spec.family])
                if link.mac is None:
                    raise KernelError(f"VXLAN device {spec.name} has no MAC address")
                vteps.append(Vtep(spec, link.mac))
                created |= made
            connected = netlink.connected_networks(ipr, host.iface_index)
        return VxlanNetwork(settings, host, vteps, connected, created)
