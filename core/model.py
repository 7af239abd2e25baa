"""Value objects shared by the core, the stores and the backends.

Everything here is a frozen attrs class holding ``ipaddress`` objects, never strings.  The
conversions to and from flannel's on-store formats (key ``10.244.3.0-24``, value
``{"PublicIP": ..., "PublicIPv6": null, "BackendType": ..., "BackendData": {...}}``) live here
too, so every store writes byte-compatible leases.
"""

from __future__ import annotations

import enum
import ipaddress
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import attrs

from .decode import MAX_KEY_CHARS, MAX_LEASE_VALUE_BYTES, DecodeError, load_json
from .errors import GarbledLease

Subnet = IPv4Network | IPv6Network


@attrs.frozen
class LeaseAttrs:
    """What a host publishes about itself in its lease."""

    public_ip: IPv4Address | None
    backend_type: str
    backend_data: Mapping[str, Any] = attrs.field(factory=dict, hash=False)
    public_ipv6: IPv6Address | None = None
    backend_v6_data: Mapping[str, Any] | None = attrs.field(default=None, hash=False)

    def to_json(self) -> str:
        """flannel's value format, key order included."""
        doc: dict[str, Any] = {
            "PublicIP": str(self.public_ip) if self.public_ip is not None else None,
            "PublicIPv6": str(self.public_ipv6) if self.public_ipv6 is not None else None,
            "BackendType": self.backend_type,
            "BackendData": dict(self.backend_data) if self.backend_data else None,
        }
        if self.backend_v6_data:
            doc["BackendV6Data"] = dict(self.backend_v6_data)
        return json.dumps(doc, separators=(",", ":"))

    def public_ip_of(self, version: int) -> IPv4Address | IPv6Address | None:
        """The underlay address peers reach this host at for overlay family *version* (4 or 6)."""
        return self.public_ip if version == 4 else self.public_ipv6

    def backend_data_of(self, version: int) -> Mapping[str, Any]:
        """The backend's data for overlay family *version*: ``BackendData`` or ``BackendV6Data``."""
        return self.backend_data if version == 4 else (self.backend_v6_data or {})

    @classmethod
    def from_json(cls, text: str | bytes) -> LeaseAttrs:
        """Parse a lease value (bounded in size and depth); raise ``GarbledLease`` saying what is wrong."""
        try:
            doc = load_json(text, what="lease value", max_bytes=MAX_LEASE_VALUE_BYTES)
        except DecodeError as exc:
            raise GarbledLease(str(exc)) from exc
        if not isinstance(doc, dict):
            raise GarbledLease("lease value is not a JSON object")
        public_ip = _optional_ip(doc.get("PublicIP"), 4, "PublicIP")
        public_ipv6 = _optional_ip(doc.get("PublicIPv6"), 6, "PublicIPv6")
        backend_type = doc.get("BackendType") or ""
        if not isinstance(backend_type, str):
            raise GarbledLease(f"BackendType {backend_type!r} is not a string")
        data = doc.get("BackendData") or {}
        if not isinstance(data, dict):
            raise GarbledLease(f"BackendData {data!r} is not an object")
        v6data = doc.get("BackendV6Data")
        if v6data is not None and not isinstance(v6data, dict):
            raise GarbledLease(f"BackendV6Data {v6data!r} is not an object")
        return cls(
            public_ip=public_ip,
            public_ipv6=public_ipv6,
            backend_type=backend_type,
            backend_data=data,
            backend_v6_data=v6data,
        )


def _optional_ip(raw: Any, version: int, name: str) -> Any:
    if raw in (None, ""):
        return None
    if not isinstance(raw, str):  # ip_address(3232235777) would happily make 192.168.1.1 of a number
        raise GarbledLease(f"{name} {raw!r} is not an IP address string")
    try:
        addr = ipaddress.ip_address(raw)
    except (ValueError, TypeError) as exc:
        raise GarbledLease(f"{name} {raw!r} is not an IP address") from exc
    if addr.version != version:
        raise GarbledLease(f"{name} {raw!r} is not an IPv{version} address")
    return addr


@attrs.frozen
class Lease:
    """One host's slice of the network, as the store holds it.

    ``expiration is None`` means a reservation: it never expires and no other host may take it.
    ``revision`` is the store's modification revision of the lease (0 when unknown);
    ``created_revision`` the revision at which its key was created, so of two leases claiming the
    same thing the older one can be told apart deterministically.
    """

    subnet: IPv4Network | None
    attrs: LeaseAttrs
    expiration: datetime | None
    ipv6_subnet: IPv6Network | None = None
    revision: int = 0
    created_revision: int = 0  # store revision at which the key was created (older lease wins ties)

    @property
    def is_reservation(self) -> bool:
        return self.expiration is None

    @property
    def families(self) -> tuple[int, ...]:
        """The IP versions this lease holds a subnet of: ``(4,)``, ``(6,)`` or ``(4, 6)``.

        A lease read from one store key holds one family; the lease a dual-stack host holds
        (and a Kubernetes Node with both pod CIDRs) holds both.  Code that programs a lease
        loops over this, with the family as a parameter: one code path per family."""
        return tuple(v for v, s in ((4, self.subnet), (6, self.ipv6_subnet)) if s is not None)

    def subnet_of(self, version: int) -> IPv4Network | IPv6Network | None:
        return self.subnet if version == 4 else self.ipv6_subnet

    @property
    def keys(self) -> tuple[str, ...]:
        """The store key of each subnet held (``10.244.3.0-24``, ``fd00:0:0:3::-64``)."""
        return tuple(subnet_to_key(s) for s in (self.subnet, self.ipv6_subnet) if s is not None)

    def only(self, version: int) -> Lease:
        """This lease restricted to one family (what one store key holds)."""
        if version == 4:
            return attrs.evolve(self, ipv6_subnet=None)
        return attrs.evolve(self, subnet=None)

    @property
    def key(self) -> str:
        """The store key of the lease: the IPv4 subnet's, else the IPv6 subnet's."""
        subnet = self.subnet if self.subnet is not None else self.ipv6_subnet
        assert subnet is not None, "a lease has at least one subnet"
        return subnet_to_key(subnet)


@attrs.frozen
class Reservation:
    """A subnet set aside for one public IP; it never expires."""

    subnet: IPv4Network
    public_ip: IPv4Address


@attrs.frozen
class LeaseList:
    """A consistent snapshot of every lease, and the store revision it was taken at."""

    leases: tuple[Lease, ...]
    revision: int

    def by_subnet(self) -> dict[IPv4Network | IPv6Network, Lease]:
        out: dict[IPv4Network | IPv6Network, Lease] = {}
        for lease in self.leases:
            subnet = lease.subnet if lease.subnet is not None else lease.ipv6_subnet
            assert subnet is not None
            out[subnet] = lease
        return out


class EventKind(enum.Enum):
    ADDED = "added"  # new lease, or an existing one changed (renewal, new BackendData)
    REMOVED = "removed"  # deleted by its owner or an operator
    EXPIRED = "expired"  # its TTL ran out


@attrs.frozen
class LeaseEvent:
    kind: EventKind
    subnet: IPv4Network | IPv6Network
    lease: Lease | None  # the new value for ADDED; the last known value (if any) otherwise
    revision: int = 0


@attrs.frozen
class WatchResult:
    """What a store's ``wait_for_events`` returns: events after a revision, and the new revision."""

    events: tuple[LeaseEvent, ...]
    revision: int


def subnet_to_key(subnet: IPv4Network | IPv6Network) -> str:
    """``10.244.3.0/24`` -> ``10.244.3.0-24`` (flannel's key form)."""
    return f"{subnet.network_address}-{subnet.prefixlen}"


def key_to_subnet(key: str) -> IPv4Network | IPv6Network:
    """The inverse of :func:`subnet_to_key`; ``GarbledLease`` for anything else."""
    if len(key) > MAX_KEY_CHARS + 256:  # the name plus any store prefix
        raise GarbledLease(f"lease key {key[:40]!r}... is {len(key)} characters long")
    name = key.rsplit("/", 1)[-1]
    if len(name) > MAX_KEY_CHARS:
        raise GarbledLease(f"lease key {name[:40]!r}... is {len(name)} characters long")
    addr, sep, length = name.rpartition("-")
    if not sep or not length.isdigit():
        raise GarbledLease(f"lease key {key!r} is not of the form 10.244.3.0-24")
    try:
        return ipaddress.ip_network(f"{addr}/{length}", strict=True)
    except ValueError as exc:
        raise GarbledLease(f"lease key {key!r} is not a subnet: {exc}") from exc


def parse_lease(
    key: str,
    value: str | bytes,
    *,
    expiration: datetime | None,
    revision: int = 0,
    created_revision: int = 0,
    ipv6: bool = False,
) -> Lease:
    """Build a ``Lease`` from a store key and value; ``GarbledLease`` when either is bad."""
    subnet = key_to_subnet(key)
    if ipv6 != (subnet.version == 6):
        raise GarbledLease(f"lease key {key!r} has the wrong address family")
    lease_attrs = LeaseAttrs.from_json(value)
    if isinstance(subnet, IPv6Network):
        return Lease(
            None, lease_attrs, expiration, ipv6_subnet=subnet, revision=revision, created_revision=created_revision
        )
    return Lease(subnet, lease_attrs, expiration, revision=revision, created_revision=created_revision)


def diff_lease_lists(old: Sequence[Lease], new: Sequence[Lease], revision: int) -> list[LeaseEvent]:
    """Events that turn snapshot *old* into snapshot *new* (used after a re-list)."""
    before = {lease.key: lease for lease in old}
    after = {lease.key: lease for lease in new}
    events: list[LeaseEvent] = []
    for key, lease in before.items():
        if key not in after:
            events.append(LeaseEvent(EventKind.REMOVED, key_to_subnet(key), lease, revision))
    for key, lease in after.items():
        previous = before.get(key)
        if previous is None or _changed(previous, lease):
            events.append(LeaseEvent(EventKind.ADDED, key_to_subnet(key), lease, revision))
    return events


def _changed(a: Lease, b: Lease) -> bool:
    if a.revision and b.revision:
        return a.revision != b.revision
    return a != b
