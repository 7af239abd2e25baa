"""Which leases are peers this host may program: one pure filter for every backend.

A lease comes from a shared store that any host (or anyone with store access) can write, so
nothing in it is trusted until it passes here.  The daemon and ``overlayd.dry_run`` both call
:func:`valid_peers`, so a dry run can never disagree with the daemon, and a backend never
re-implements these checks:

* **The lease must fit the network**, per family it holds (a lease read from one store key holds
  one family; the Kubernetes store's may hold both): the family is one the config enables, the
  subnet is a leasable subnet of the config's network of that family, and the lease has that
  family's underlay address (``PublicIP`` for IPv4, ``PublicIPv6`` for IPv6: a v6 overlay is
  carried over a v6 underlay, as in flannel); its backend type is the config's.
* **The PublicIP must be able to name another host** (:func:`public_ip_problem`): not the
  unspecified address, loopback, broadcast, the reserved 240/4, multicast, IPv6 link-local
  (which needs a zone), nor an address inside the overlay itself.  Each of those, programmed
  as a route gateway or VXLAN remote, sends the overlay's traffic to nowhere or in a loop.
  A present address of the other family is checked too (a dual-stack host publishes both).
  IPv4 link-local (169.254/16) is accepted: it is a real unicast address on one segment.
  The CLI uses the same function to refuse ``--public-ip`` and ``reserve`` values.
* **Not a stale lease of this very host** (:func:`names_this_host`): a lease left by an
  earlier run with another subnet still carries our address; tunnelling or routing to
  ourselves would loop.
* **Backend checks**: ``Network.check_peer`` (vxlan: a unicast VtepMAC, the same VNI).
* **Exclusive claims** (:func:`resolve_claims`): a backend declares what a lease claims that
  no other lease may hold (vxlan: its VtepMAC, because the kernel's FDB has one slot per MAC).
  This host's own lease keeps all its claims; among the others the oldest lease wins (lowest
  ``created_revision``, ties broken by key), so every host decides alike without talking to
  each other.  Without this a lease copying a VtepMAC silently redirected another host's
  traffic (the later ``replace`` of the FDB entry wins in the kernel).

Every skipped lease is handed to *report* with a reason; the daemon logs it once per lease key
and revision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from .config import NetworkConfig
from .errors import GarbledLease
from .model import Lease
from .plugin import Network

Report = Callable[[str, int, str], None]
Address = IPv4Address | IPv6Address

_BROADCAST = IPv4Address("255.255.255.255")


def public_ip_problem(ip: object, network: IPv4Network | IPv6Network | None = None) -> str | None:
    """Why *ip* cannot be a host's public (underlay) address, or None when it can.

    The answer completes a sentence that starts with the address: ``f"PublicIP {ip} {problem}"``.
    """
    if not isinstance(ip, IPv4Address | IPv6Address):
        return "is not an IP address"
    if ip.is_unspecified:
        return "is the unspecified address, which names no host"
    if ip.is_loopback:
        return "is a loopback address, which every host has for itself"
    if ip == _BROADCAST:
        return "is the broadcast address, which names no single host"
    if ip.is_multicast:
        return "is a multicast address, which names a group, not a host"
    if isinstance(ip, IPv4Address) and ip.is_reserved:
        return "is in the reserved range 240.0.0.0/4, which hosts cannot use"
    if isinstance(ip, IPv6Address) and ip.is_link_local:
        return "is an IPv6 link-local address, usable only with an interface (zone) attached"
    if network is not None and ip.version == network.version and ip in network:
        return f"is inside the overlay network {network}; the underlay must be outside it"
    return None


def names_this_host(own: Lease, lease: Lease, host_addresses: Iterable[Address | None] = ()) -> Address | None:
    """The address of ours that *lease* (another key than *own*) carries, or None.

    Such a lease is a stale one of this very host (an earlier run with another subnet): routing
    or tunnelling to it would send the traffic back to ourselves.
    """
    ours = {own.attrs.public_ip, own.attrs.public_ipv6, *host_addresses} - {None}
    for ip in (lease.attrs.public_ip, lease.attrs.public_ipv6):
        if ip is not None and ip in ours:
            return ip
    return None


def public_ip_name(version: int) -> str:
    """The lease field holding the underlay address for overlay family *version*."""
    return "PublicIP" if version == 4 else "PublicIPv6"


def subnet_problem(config: NetworkConfig, version: int, subnet: IPv4Network | IPv6Network) -> str | None:
    """Why *subnet* (of overlay family *version*) is no leasable subnet of *config*, or None."""
    if version not in config.families:
        return f"its IPv{version} subnet {subnet} is for a family this network does not enable"
    if config.contains_of(version, subnet):
        return None
    length = config.subnet_len if version == 4 else config.ipv6_subnet_len
    return f"subnet {subnet} is outside network {config.network_of(version)} or not a /{length}"


def invalid_reason(
    config: NetworkConfig,
    network: Network,
    own: Lease,
    lease: Lease,
    host_addresses: Iterable[Address | None] = (),
) -> str | None:
    """Why *network* must not program *lease* (another host's), or None when it may.

    Every family the lease holds is checked, with the family as the parameter."""
    if not lease.families:
        return "it holds no subnet"
    for version in lease.families:
        subnet = lease.subnet_of(version)
        assert subnet is not None
        problem = subnet_problem(config, version, subnet)
        if problem is not None:
            return problem
        if lease.attrs.public_ip_of(version) is None:
            return f"it has no {public_ip_name(version)}"
    for version in (4, 6):
        ip = lease.attrs.public_ip_of(version)
        if ip is not None:
            problem = public_ip_problem(ip, config.network_of(version))
            if problem is not None:
                return f"{public_ip_name(version)} {ip} {problem}"
    if lease.attrs.backend_type != config.backend_type:
        return f"backend type {lease.attrs.backend_type!r} is not {config.backend_type!r}"
    mine = names_this_host(own, lease, host_addresses)
    if mine is not None:
        return f"it names this host's address {mine} (a stale lease of this host); never routed to ourselves"
    try:
        network.check_peer(lease)
    except GarbledLease as exc:
        return str(exc)
    return None


def age_order(lease: Lease) -> tuple[int, str]:
    """Oldest first: the store revision that created the key, then the key (deterministic)."""
    return (lease.created_revision, lease.key)


def resolve_claims(
    own: Lease,
    candidates: Sequence[Lease],
    claims_of: Callable[[Lease], frozenset[tuple[str, str]]],
) -> tuple[list[Lease], list[tuple[Lease, str]]]:
    """Split *candidates* into those whose exclusive claims are theirs and the rest (with why).

    *own* holds its claims first; then candidates in :func:`age_order` take theirs; a candidate
    that finds one of its claims taken loses all of them (it is not programmed at all).  The
    result does not depend on the order of *candidates*.
    """
    holder: dict[tuple[str, str], str] = {claim: "" for claim in claims_of(own)}
    winners: list[Lease] = []
    losers: list[tuple[Lease, str]] = []
    for lease in sorted(candidates, key=age_order):
        claims = claims_of(lease)
        taken = sorted(claim for claim in claims if claim in holder)
        if taken:
            what, value = taken[0]
            by = holder[taken[0]]
            whose = "this host's own" if not by else f"already claimed by the older lease {by}"
            losers.append((lease, f"its {what} {value} is {whose}; the newer claim is ignored"))
            continue
        for claim in claims:
            holder[claim] = lease.key
        winners.append(lease)
    return winners, losers


def valid_peers(
    config: NetworkConfig,
    network: Network,
    own: Lease,
    leases: Sequence[Lease],
    report: Report,
    host_addresses: Iterable[Address | None] = (),
) -> list[Lease]:
    """Leases of other hosts that *network* can program; *report* hears why each other one is not.

    *host_addresses* are this host's underlay addresses beyond its lease's PublicIP (the
    interface address behind NAT, for instance); a lease naming any of them is a stale one of ours.
    """
    addresses = tuple(host_addresses)
    candidates = []
    for lease in leases:
        if lease.key == own.key or lease.key in own.keys:
            continue  # this host's own lease (a dual-stack host holds one key per family)
        if lease.is_reservation and not lease.attrs.backend_type:
            continue  # reserved, owner not running yet
        reason = invalid_reason(config, network, own, lease, addresses)
        if reason is None:
            candidates.append(lease)
        else:
            report(lease.key, lease.revision, reason)
    winners, losers = resolve_claims(own, candidates, network.exclusive_claims)
    for lease, reason in losers:
        report(lease.key, lease.revision, reason)
    keep = {lease.key for lease in winners}
    return [lease for lease in candidates if lease.key in keep]  # the store's order, as before
