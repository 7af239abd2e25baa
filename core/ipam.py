"""Subnet choice: which subnet of the network this host should lease.

Pure functions over a snapshot of leases.  Preference order, as flannel operators expect:
the lease (or reservation) already held by this host's public IP, then a subnet the caller
prefers (the one in the previous subnet file), then a random free one — random rather than
lowest-first so that hosts racing to join rarely collide on the same compare-and-create.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from ipaddress import IPv4Address, IPv4Network

from .config import NetworkConfig
from .errors import SubnetExhausted
from .model import Lease


def find_own_lease(config: NetworkConfig, leases: Iterable[Lease], public_ip: IPv4Address | None) -> Lease | None:
    """The lease or reservation of *public_ip* inside this network, if any."""
    if public_ip is None:
        return None
    mine = [
        lease
        for lease in leases
        if lease.attrs.public_ip == public_ip and lease.subnet is not None and config.contains_subnet(lease.subnet)
    ]
    # A reservation wins over an ordinary lease: the operator asked for it.
    mine.sort(key=lambda lease: (not lease.is_reservation, lease.subnet))
    return mine[0] if mine else None


def choose_free_subnet(
    config: NetworkConfig,
    leases: Iterable[Lease],
    *,
    prefer: Sequence[IPv4Network] = (),
    rng: random.Random | None = None,
) -> IPv4Network:
    """A subnet nobody holds: a preferred one when free, else a random free one."""
    taken = {lease.subnet for lease in leases if lease.subnet is not None}
    for subnet in prefer:
        if config.contains_subnet(subnet) and subnet not in taken:
            return subnet
    free = [subnet for subnet in config.subnets() if subnet not in taken]
    if not free:
        raise SubnetExhausted(
            f"network {config.network} is exhausted: all {config.subnet_count()} /{config.subnet_len} "
            f"subnets between {config.subnet_min} and {config.subnet_max} are leased or reserved; "
            "remove stale leases or grow the network"
        )
    return (rng or random.Random()).choice(free)
