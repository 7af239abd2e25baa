"""Subnet choice: which subnet of the network this host should lease, per address family.

Pure functions over a snapshot of leases, with the family (4 or 6) as a parameter: one code
path for both.  Preference order, as flannel operators expect: the lease (or reservation)
already held by this host's public address of that family (PublicIP for IPv4, PublicIPv6 for
IPv6), then a subnet the caller prefers (the one in the previous subnet file), then a random
free one — random rather than lowest-first so that hosts racing to join rarely collide on the
same compare-and-create.

The range is never enumerated: an IPv6 network cut into /64s holds 65536 subnets for a /48 and
billions for a /32.  A free subnet is found by a few random probes, then (when the range is
nearly full) by a scan from a random start that looks at no more than ``taken + 1`` slots — at
most that many of them can be taken, so the scan finds a free one if there is one.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from .config import NetworkConfig
from .errors import SubnetExhausted
from .model import Lease

#: Random probes before the bounded scan.
PROBES = 32


def find_own_lease(
    config: NetworkConfig,
    leases: Iterable[Lease],
    public_ip: IPv4Address | IPv6Address | None,
    version: int = 4,
) -> Lease | None:
    """The lease or reservation of family *version* held by *public_ip* (the host's address of
    that family) inside this network, if any."""
    if public_ip is None:
        return None
    mine: list[tuple[bool, int, Lease]] = []
    for lease in leases:
        subnet = lease.subnet_of(version)
        if (
            subnet is not None
            and lease.attrs.public_ip_of(version) == public_ip
            and config.contains_of(version, subnet)
        ):
            # A reservation wins over an ordinary lease: the operator asked for it.
            mine.append((not lease.is_reservation, int(subnet.network_address), lease))
    if not mine:
        return None
    return min(mine, key=lambda item: item[:2])[2].only(version)


def choose_free_subnet(
    config: NetworkConfig,
    leases: Iterable[Lease],
    *,
    version: int = 4,
    prefer: Sequence[IPv4Network | IPv6Network] = (),
    rng: random.Random | None = None,
) -> IPv4Network | IPv6Network:
    """A subnet of family *version* nobody holds: a preferred one when free, else a random free one."""
    span = config.range_of(version)
    family = "network" if version == 4 else "IPv6 network"
    if span is None:
        raise SubnetExhausted(f"the network config has no {family}")
    taken = {s for lease in leases if (s := lease.subnet_of(version)) is not None and span.contains(s)}
    for subnet in prefer:
        if span.contains(subnet) and subnet not in taken:
            return subnet
    count = span.count()
    if len(taken) >= count:
        raise SubnetExhausted(
            f"{family} {span.network} is exhausted: all {count} /{span.length} "
            f"subnets between {span.lo} and {span.hi} are leased or reserved; "
            "remove stale leases or grow the network"
        )
    rng = rng or random.Random()
    for _ in range(PROBES):
        candidate = span.nth(rng.randrange(count))
        if candidate not in taken:
            return candidate
    start = rng.randrange(count)
    for offset in range(len(taken) + 1):
        candidate = span.nth((start + offset) % count)
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable: fewer subnets taken than the range holds")  # pragma: no cover
