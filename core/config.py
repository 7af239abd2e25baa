"""The network config: flannel's JSON document, parsed and validated with flannel's rules.

The same document lives at ``<prefix>/config`` in etcd, so a flannel node and an overlayd node
read each other's config.  Keys match case-insensitively (Go's ``encoding/json`` does the same,
and operators write ``network`` as often as ``Network``).  Unknown top-level keys are logged and
kept out of the model; they never stop the daemon.  One deliberate difference: when no
``Backend`` is given the default is ``{"Type": "vxlan"}``, not flannel's ``udp``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import attrs

from .decode import MAX_CONFIG_BYTES, DecodeError, load_json
from .errors import ConfigError

log = logging.getLogger(__name__)

#: The backend when the network config names none (flannel defaults to udp; vxlan is the better default).
DEFAULT_BACKEND_TYPE = "vxlan"
DEFAULT_BACKEND: Mapping[str, Any] = {"Type": DEFAULT_BACKEND_TYPE}

_KNOWN_KEYS = {
    "network": "Network",
    "subnetlen": "SubnetLen",
    "subnetmin": "SubnetMin",
    "subnetmax": "SubnetMax",
    "enableipv4": "EnableIPv4",
    "enableipv6": "EnableIPv6",
    "ipv6network": "IPv6Network",
    "ipv6subnetlen": "IPv6SubnetLen",
    "ipv6subnetmin": "IPv6SubnetMin",
    "ipv6subnetmax": "IPv6SubnetMax",
    "enablenftables": "EnableNFTables",
    "backend": "Backend",
}


@attrs.frozen
class SubnetRange:
    """One family's leasable subnets: the *length*-long subnets of *network* from *lo* to *hi*.

    A view by index rather than a list: an IPv6 range (a /48 cut into /64s holds 65536, a /32
    billions) is never enumerated; :mod:`overlayd.ipam` picks candidates by index.
    """

    network: IPv4Network | IPv6Network
    length: int
    lo: IPv4Address | IPv6Address
    hi: IPv4Address | IPv6Address

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def step(self) -> int:
        return 1 << (self.network.max_prefixlen - self.length)

    def count(self) -> int:
        return (int(self.hi) - int(self.lo)) // self.step + 1

    def nth(self, index: int) -> IPv4Network | IPv6Network:
        """The *index*-th subnet, SubnetMin being the 0th."""
        kind = IPv4Network if self.version == 4 else IPv6Network
        return kind((int(self.lo) + index * self.step, self.length))

    def contains(self, subnet: IPv4Network | IPv6Network) -> bool:
        return (
            subnet.version == self.version
            and subnet.prefixlen == self.length
            and subnet.subnet_of(self.network)  # type: ignore[arg-type]
            and self.lo <= subnet.network_address <= self.hi  # type: ignore[operator]
        )


@attrs.frozen
class NetworkConfig:
    """A validated network config; every default already filled in."""

    network: IPv4Network | None
    subnet_len: int
    subnet_min: IPv4Address | None
    subnet_max: IPv4Address | None
    enable_ipv4: bool = True
    enable_ipv6: bool = False
    ipv6_network: IPv6Network | None = None
    ipv6_subnet_len: int = 64
    ipv6_subnet_min: IPv6Address | None = None
    ipv6_subnet_max: IPv6Address | None = None
    enable_nftables: bool = False
    backend: Mapping[str, Any] = attrs.field(factory=lambda: dict(DEFAULT_BACKEND), hash=False)

    @property
    def backend_type(self) -> str:
        return str(self.backend.get("Type", DEFAULT_BACKEND_TYPE))

    @property
    def families(self) -> tuple[int, ...]:
        """The overlay families this network carries: ``(4,)``, ``(6,)`` or ``(4, 6)``."""
        return tuple(v for v, on in ((4, self.enable_ipv4), (6, self.enable_ipv6)) if on)

    def network_of(self, version: int) -> IPv4Network | IPv6Network | None:
        """``Network`` or ``IPv6Network``."""
        return self.network if version == 4 else self.ipv6_network

    def range_of(self, version: int) -> SubnetRange | None:
        """The leasable subnets of family *version* (None when that family is off)."""
        fields: tuple[Any, ...] = (
            (self.network, self.subnet_len, self.subnet_min, self.subnet_max)
            if version == 4
            else (self.ipv6_network, self.ipv6_subnet_len, self.ipv6_subnet_min, self.ipv6_subnet_max)
        )
        net, length, lo, hi = fields
        if net is None or lo is None or hi is None:
            return None
        return SubnetRange(net, length, lo, hi)

    def contains_of(self, version: int, subnet: IPv4Network | IPv6Network) -> bool:
        """True when *subnet* is a leasable subnet of family *version* (right size, in range)."""
        span = self.range_of(version)
        return span is not None and span.contains(subnet)

    def subnet_count(self) -> int:
        """How many IPv4 subnets lie in [SubnetMin, SubnetMax]."""
        span = self.range_of(4)
        return 0 if span is None else span.count()

    def subnets(self) -> list[IPv4Network]:
        """Every leasable IPv4 subnet, SubnetMin first (IPv6 ranges are never listed: see ``range_of``)."""
        span = self.range_of(4)
        return [] if span is None else [IPv4Network(span.nth(i)) for i in range(span.count())]

    def contains_subnet(self, subnet: IPv4Network) -> bool:
        """True when *subnet* is a leasable IPv4 subnet of this network (right size, in range)."""
        return self.contains_of(4, subnet)

    def contains_ipv6_subnet(self, subnet: IPv6Network) -> bool:
        return self.contains_of(6, subnet)

    @classmethod
    def from_json(cls, text: str | bytes) -> NetworkConfig:
        """Parse flannel's JSON config (bounded in size and depth); ``ConfigError`` naming the bad key."""
        try:
            doc = load_json(text, what="network config", max_bytes=MAX_CONFIG_BYTES)
        except DecodeError as exc:
            raise ConfigError(str(exc)) from exc
        if not isinstance(doc, dict):
            raise ConfigError('network config must be a JSON object like {"Network": "10.244.0.0/16"}')
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> NetworkConfig:
        values: dict[str, Any] = {}
        for key, value in doc.items():
            canonical = _KNOWN_KEYS.get(str(key).lower())
            if canonical is None:
                log.warning("network config: ignoring unknown key %r", key)
                continue
            values[canonical] = value
        return _validate(values)

    def to_dict(self) -> dict[str, Any]:
        """flannel's JSON keys; only the keys that carry information."""
        out: dict[str, Any] = {}
        if self.network is not None:
            out["Network"] = str(self.network)
            out["SubnetLen"] = self.subnet_len
            out["SubnetMin"] = str(self.subnet_min)
            out["SubnetMax"] = str(self.subnet_max)
        if not self.enable_ipv4:
            out["EnableIPv4"] = False
        if self.enable_ipv6:
            out["EnableIPv6"] = True
            out["IPv6Network"] = str(self.ipv6_network)
            out["IPv6SubnetLen"] = self.ipv6_subnet_len
            out["IPv6SubnetMin"] = str(self.ipv6_subnet_min)
            out["IPv6SubnetMax"] = str(self.ipv6_subnet_max)
        if self.enable_nftables:
            out["EnableNFTables"] = True
        out["Backend"] = dict(self.backend)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def _bool(values: Mapping[str, Any], key: str, default: bool) -> bool:
    value = values.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"network config: {key} must be true or false, not {value!r}")
    return value


def _int(values: Mapping[str, Any], key: str) -> int:
    value = values.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"network config: {key} must be a whole number, not {value!r}")
    return value


def _net(values: Mapping[str, Any], key: str, version: int) -> Any:
    raw = values.get(key)
    if raw in (None, ""):
        return None
    try:
        net = ipaddress.ip_network(str(raw), strict=False)
    except ValueError as exc:
        raise ConfigError(f"network config: {key} {raw!r} is not a CIDR like 10.244.0.0/16") from exc
    if net.version != version:
        raise ConfigError(f"network config: {key} {raw!r} must be an IPv{version} CIDR")
    return net


def _addr(values: Mapping[str, Any], key: str, version: int) -> Any:
    raw = values.get(key)
    if raw in (None, ""):
        return None
    try:
        # flannel writes SubnetMin as "10.244.1.0" but some configs carry a "/24": accept both.
        addr = ipaddress.ip_interface(str(raw)).ip
    except ValueError as exc:
        raise ConfigError(f"network config: {key} {raw!r} is not an IP address") from exc
    if addr.version != version:
        raise ConfigError(f"network config: {key} {raw!r} must be an IPv{version} address")
    return addr


def _subnet_range(
    values: Mapping[str, Any], family: str, network: Any, version: int, bits: int, default_len: int
) -> tuple[int, Any, Any]:
    """flannel's SubnetLen/SubnetMin/SubnetMax rules, shared by IPv4 and IPv6."""
    prefix = "" if version == 4 else "IPv6"
    len_key, min_key, max_key = f"{prefix}SubnetLen", f"{prefix}SubnetMin", f"{prefix}SubnetMax"
    subnet_len = _int(values, len_key)
    if subnet_len:
        if subnet_len > bits - 2:
            raise ConfigError(f"network config: {len_key} {subnet_len} is too long; use at most /{bits - 2}")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError(
                f"network config: {len_key} /{subnet_len} leaves fewer than four subnets in "
                f"{network}; use at least /{network.prefixlen + 2}"
            )
    else:
        if network.prefixlen > bits - 4:
            raise ConfigError(f"network config: {family} {network} is too small; use at least a /{bits - 4}")
        subnet_len = default_len if network.prefixlen <= default_len - 2 else network.prefixlen + 2
    size = 1 << (bits - subnet_len)
    first = network.network_address + size
    last = network.network_address + (network.num_addresses - size)
    lo = _addr(values, min_key, version) or first
    hi = _addr(values, max_key, version) or last
    for key, addr in ((min_key, lo), (max_key, hi)):
        if addr not in network:
            raise ConfigError(f"network config: {key} {addr} is outside {family} {network}")
        if int(addr) % size:
            raise ConfigError(f"network config: {key} {addr} is not on a /{subnet_len} boundary")
    if lo > hi:
        raise ConfigError(f"network config: {min_key} {lo} is above {max_key} {hi}")
    return subnet_len, lo, hi


def _validate(values: Mapping[str, Any]) -> NetworkConfig:
    enable_ipv4 = _bool(values, "EnableIPv4", True)
    enable_ipv6 = _bool(values, "EnableIPv6", False)
    enable_nftables = _bool(values, "EnableNFTables", False)
    if not enable_ipv4 and not enable_ipv6:
        raise ConfigError("network config: EnableIPv4 and EnableIPv6 are both false; enable at least one")

    network = _net(values, "Network", 4)
    subnet_len, subnet_min, subnet_max = 0, None, None
    if enable_ipv4:
        if network is None:
            raise ConfigError('network config: "Network" is required, e.g. {"Network": "10.244.0.0/16"}')
        subnet_len, subnet_min, subnet_max = _subnet_range(values, "Network", network, 4, 32, 24)

    ipv6_network = _net(values, "IPv6Network", 6)
    ipv6_len, ipv6_min, ipv6_max = 64, None, None
    if enable_ipv6:
        if ipv6_network is None:
            raise ConfigError('network config: EnableIPv6 needs "IPv6Network", e.g. "fd00:10:244::/56"')
        ipv6_len, ipv6_min, ipv6_max = _subnet_range(values, "IPv6Network", ipv6_network, 6, 128, 64)

    backend = values.get("Backend", DEFAULT_BACKEND)
    if not isinstance(backend, Mapping):
        raise ConfigError('network config: "Backend" must be an object like {"Type": "vxlan"}')
    backend = {str(k): v for k, v in backend.items()}
    type_key = next((k for k in backend if k.lower() == "type"), None)
    if type_key is None:
        backend["Type"] = DEFAULT_BACKEND_TYPE
    elif type_key != "Type":
        backend["Type"] = backend.pop(type_key)
    if not isinstance(backend["Type"], str) or not backend["Type"]:
        raise ConfigError('network config: Backend "Type" must be a backend name such as "vxlan"')

    return NetworkConfig(
        network=network if enable_ipv4 else None,
        subnet_len=subnet_len,
        subnet_min=subnet_min,
        subnet_max=subnet_max,
        enable_ipv4=enable_ipv4,
        enable_ipv6=enable_ipv6,
        ipv6_network=ipv6_network if enable_ipv6 else None,
        ipv6_subnet_len=ipv6_len,
        ipv6_subnet_min=ipv6_min,
        ipv6_subnet_max=ipv6_max,
        enable_nftables=enable_nftables,
        backend=backend,
    )
