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
  its MAC is, in order: the ``mac`` given to :meth:`VxlanBackend.prepare`, the backend's
  ``preferred_mac`` (the daemon may set it from a persisted value or its previous lease's
  BackendData), or a MAC derived from (VNI, local underlay IP).  The derived MAC is stable across
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
fill in what the config leaves out.  A CLI value overridden by the config is logged as a warning.

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
import socket
from collections.abc import Mapping, Sequence
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, IPv6Address
from typing import Any

import attrs
from overlayd import netlink
from overlayd.config import NetworkConfig
from overlayd.errors import ConfigError, GarbledLease, KernelError, PermanentError
from overlayd.model import Lease
from overlayd.netlink import FdbEntry, MacAddress, Neighbour, Route
from overlayd.plan import Plan
from overlayd.plugin import Backend, HostInfo, Network, option

log = logging.getLogger(__name__)

DEFAULT_PORT = 8472  # Linux's historical VXLAN port (flannel's default), not IANA's 4789
MAX_VNI = (1 << 24) - 1
OVERHEAD_V4 = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
OVERHEAD_V6 = 70  # outer IPv6 40 + UDP 8 + VXLAN 8 + inner Ethernet 14


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


@attrs.frozen
class VxlanOptions:
    vni: int = option(1, "VXLAN network identifier; the device is flannel.<VNI>", converter=int)
    port: int = option(DEFAULT_PORT, "UDP port for VXLAN traffic", converter=int)
    mtu: int = option(0, "device MTU; 0 = underlay MTU - 50 (- 70 over an IPv6 underlay)", converter=int)
    gbp: bool = option(False, "enable VXLAN Group Based Policy extension", converter=_to_bool)
    direct_routing: bool = option(
        False, "route directly (no encapsulation) to peers on the same L2 segment", converter=_to_bool
    )


@attrs.frozen
class VxlanSettings:
    """The effective settings: config ``Backend`` keys over options, validated."""

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
        keys = {str(k).lower(): v for k, v in backend.items()}
        values: dict[str, Any] = {}
        for field, key in (
            ("vni", "vni"),
            ("port", "port"),
            ("mtu", "mtu"),
            ("gbp", "gbp"),
            ("direct_routing", "directrouting"),
        ):
            default = getattr(VxlanOptions(), field)
            mine = getattr(options, field)
            if key in keys:
                values[field] = _config_value(field, key, keys[key], type(default))
                if mine != default and mine != values[field]:
                    log.warning(
                        "vxlan: the network config's Backend sets %s=%r; ignoring the option value %r",
                        key,
                        values[field],
                        mine,
                    )
            else:
                values[field] = mine
        if values["port"] == 0:
            values["port"] = DEFAULT_PORT  # flannel: 0 means the kernel default
        if not 0 <= values["vni"] <= MAX_VNI:
            raise ConfigError(f"vxlan: VNI {values['vni']} is out of range (0..{MAX_VNI})")
        if not 1 <= values["port"] <= 65535:
            raise ConfigError(f"vxlan: Port {values['port']} is out of range (1..65535)")
        if values["mtu"] and not 68 <= values["mtu"] <= 65535:
            raise ConfigError(f"vxlan: MTU {values['mtu']} is out of range (68..65535, or 0 for automatic)")
        return cls(**values)


def _config_value(field: str, key: str, raw: Any, kind: type) -> Any:
    name = {"direct_routing": "DirectRouting", "vni": "VNI", "gbp": "GBP", "mtu": "MTU", "port": "Port"}[field]
    if kind is bool:
        if not isinstance(raw, bool):
            raise ConfigError(f"network config: Backend {name} must be true or false, not {raw!r}")
        return raw
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise ConfigError(f"network config: Backend {name} must be a whole number, not {raw!r}")
    return raw


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
        kwargs: dict[str, Any] = {
            "vxlan_id": self.vni,
            "vxlan_link": self.link_index,
            "vxlan_port": self.port,
            "vxlan_learning": 0,
            "mtu": self.mtu,
        }
        kwargs["vxlan_local6" if self.local.version == 6 else "vxlan_local"] = str(self.local)
        if self.gbp:
            kwargs["vxlan_gbp"] = True
        if mac is not None:
            kwargs["address"] = str(mac)
        with netlink.translated(f"creating VXLAN device {self.name} ({self})", feature="VXLAN (vxlan module)"):
            ipr.link("add", ifname=self.name, kind="vxlan", **kwargs)


class VxlanNetwork(Network):
    """One VXLAN device and the per-peer neighbour, FDB and route entries on it."""

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
        self.settings = settings
        self.host = host
        self.spec = spec
        self.mac = mac
        self.connected = connected
        self.lease: Lease | None = None
        #: True when ``prepare`` created (or recreated) the device, False when it kept one.
        self.created = created
        #: A planning-only network (dry runs): ``apply`` and ``activate`` refuse to run.
        self.offline = offline
        #: Over an IPv6 underlay (the VTEP's local address is IPv6) peers are reached at PublicIPv6.
        self.underlay_v6 = spec.local.version == 6

    @property
    def device(self) -> str:
        return self.spec.name

    @property
    def mtu(self) -> int:
        return self.spec.mtu

    @property
    def backend_data(self) -> Mapping[str, Any]:
        return {"VNI": self.settings.vni, "VtepMAC": str(self.mac)}

    # -- local setup ------------------------------------------------------------------------------

    def activate(self, lease: Lease) -> None:
        self._refuse_offline("activate")
        if lease.subnet is None:
            raise ConfigError("vxlan needs an IPv4 subnet lease (EnableIPv4)")
        self.lease = lease
        with netlink.iproute() as ipr:
            self._configure(ipr, lease.subnet)
            self.connected = netlink.connected_networks(ipr, self.host.iface_index)

    def _configure(self, ipr: Any, subnet: IPv4Network) -> None:
        link = netlink.get_link(ipr, self.device)
        if link is None:
            raise KernelError(f"VXLAN device {self.device} has disappeared")
        want = IPv4Interface(f"{vtep_address(subnet)}/32")
        for addr in netlink.get_addresses(ipr, link.index, socket.AF_INET):
            if addr != want:
                log.info("removing stale address %s from %s", addr, self.device)
                netlink.delete_address(ipr, link.index, addr)
        netlink.add_address(ipr, link.index, want)
        if link.mtu != self.mtu:
            netlink.set_link(ipr, link.index, f"setting MTU {self.mtu} on {self.device}", mtu=self.mtu)
        if not link.up:
            netlink.set_link(ipr, link.index, f"bringing up {self.device}", state="up")

    # -- peers ----------------------------------------------------------------------------------------

    def check_peer(self, lease: Lease) -> None:
        if lease.subnet is None:
            raise GarbledLease(f"lease {lease.key} has no IPv4 subnet; vxlan cannot route to it")
        if self._underlay_ip(lease) is None:
            raise GarbledLease(f"lease {lease.key} has no {'PublicIPv6' if self.underlay_v6 else 'PublicIP'}")
        data = lease.attrs.backend_data or {}
        raw_mac = data.get("VtepMAC")
        try:
            mac = MacAddress.parse(raw_mac)
        except ValueError as exc:
            raise GarbledLease(f"lease {lease.key}: BackendData VtepMAC {raw_mac!r} is not a MAC address") from exc
        if not mac.is_unicast:
            raise GarbledLease(f"lease {lease.key}: BackendData VtepMAC {raw_mac!r} is not a unicast MAC")
        vni = data.get("VNI", self.settings.vni)
        if isinstance(vni, bool) or not isinstance(vni, int) or vni != self.settings.vni:
            raise GarbledLease(f"lease {lease.key}: BackendData VNI {vni!r} does not match ours ({self.settings.vni})")

    def _underlay_ip(self, lease: Lease) -> IPv4Address | IPv6Address | None:
        return lease.attrs.public_ipv6 if self.underlay_v6 else lease.attrs.public_ip

    def _direct(self, public_ip: IPv4Address | IPv6Address) -> bool:
        return (
            self.settings.direct_routing
            and isinstance(public_ip, IPv4Address)
            and any(public_ip in net for net in self.connected)
        )

    def desired_state(self, own: Lease, peers: Sequence[Lease]) -> frozenset[Any]:
        out: dict[Any, Any] = {}
        for lease in sorted(peers, key=lambda lease: lease.key):
            if lease.key == own.key or (own.subnet is not None and lease.subnet == own.subnet):
                continue
            try:
                self.check_peer(lease)
            except GarbledLease:
                continue  # never program what cannot be justified; the reconciler reports it
            subnet, public_ip = lease.subnet, self._underlay_ip(lease)
            assert subnet is not None and public_ip is not None
            if public_ip in (self.spec.local, self.host.public_ip, self.host.public_ipv6):
                continue  # a stale lease of this very host: tunnelling to ourselves would loop
            if self._direct(public_ip):
                objs: list[Any] = [Route(dst=subnet, gateway=public_ip, dev=self.host.iface)]
            else:
                mac = MacAddress.parse(lease.attrs.backend_data["VtepMAC"])
                gateway = vtep_address(subnet)
                objs = [
                    Neighbour(dst=gateway, lladdr=mac, dev=self.device),
                    FdbEntry(lladdr=mac, dst=public_ip, dev=self.device),
                    Route(dst=subnet, gateway=gateway, dev=self.device, onlink=True),
                ]
            for obj in objs:
                out.setdefault(obj.key, obj)  # first lease (by key) wins a contested slot
        return frozenset(out.values())

    def actual_state(self) -> frozenset[Any]:
        with netlink.iproute() as ipr:
            return (
                netlink.read_routes(ipr)
                | netlink.read_neighbours(ipr, self.device)
                | netlink.read_fdb(ipr, self.device)
            )

    def _refuse_offline(self, what: str) -> None:
        if self.offline:
            raise PermanentError(f"vxlan: {what} called on a planning-only (dry run) network")

    def apply(self, plan: Plan[Any]) -> None:
        self._refuse_offline("apply")
        if plan.empty:
            return
        with netlink.iproute() as ipr:
            if netlink.get_link(ipr, self.device) is None:
                log.warning("VXLAN device %s is gone; recreating it with MAC %s", self.device, self.mac)
                self.spec.create(ipr, self.mac)
                if self.lease is not None and self.lease.subnet is not None:
                    self._configure(ipr, self.lease.subnet)
            netlink.apply_plan(ipr, plan)

    def teardown(self) -> None:
        self._refuse_offline("teardown")
        with netlink.iproute() as ipr:
            netlink.delete_link(ipr, self.device)
            for route in netlink.read_routes(ipr):
                netlink.delete_route(ipr, route)


class VxlanBackend(Backend):
    """Kernel VXLAN: one flannel.<VNI> device, static neighbour/FDB/route entries per peer."""

    Options = VxlanOptions

    def __init__(self, options: Any) -> None:
        super().__init__(options)
        #: MAC for a newly created device (e.g. persisted by the daemon); an existing compatible
        #: device keeps its own.  None: derive a stable one from (VNI, local IP).
        self.preferred_mac: str | MacAddress | None = None

    def _spec(self, config: NetworkConfig, host: HostInfo) -> tuple[VxlanSettings, DeviceSpec]:
        settings = VxlanSettings.resolve(self.options, config.backend)
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
        connected: frozenset[IPv4Network] = frozenset()
        if settings.direct_routing and host.iface_index > 0:
            with netlink.iproute() as ipr:
                connected = netlink.connected_networks(ipr, host.iface_index)
        return VxlanNetwork(settings, host, spec, mac, connected, offline=True)

    def prepare(self, config: NetworkConfig, host: HostInfo, *, mac: str | MacAddress | None = None) -> Network:
        settings, spec = self._spec(config, host)
        local = spec.local
        try:
            chosen = mac if mac is not None else self.preferred_mac
            wanted = MacAddress.parse(chosen) if chosen is not None else None
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
