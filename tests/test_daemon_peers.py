"""The daemon keeps its valid peers by key, re-checking only the leases that changed
(``Daemon._update_valid_peers``); this holds it to ``overlayd.peers.valid_peers`` over the whole
set after every step of random histories with contested VtepMACs, stale leases of this host,
garbled data and reservations — and checks that it reports exactly the keys whose valid lease
changed.  Pure: a planning-only vxlan network, no kernel, no store."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest
from overlayd.daemon import Daemon, DaemonSettings
from overlayd.model import Lease, LeaseAttrs
from overlayd.peers import valid_peers

from tests.test_peers import CONFIG, OWN, OWN_MAC, lease, vxlan

MACS = [OWN_MAC, "0a:00:00:00:00:01", "0a:00:00:00:00:02", "0a:00:00:00:00:03", "not-a-mac"]


def random_lease(rng: random.Random, index: int, revision: int) -> Lease:
    ip = rng.choice(["198.51.100.7", "198.51.100.8", "192.0.2.1", "127.0.0.1", f"203.0.113.{index + 1}"])
    made = lease(f"10.44.{index + 2}.0/24", ip, rng.choice(MACS), created=rng.randint(1, 50), revision=revision)
    if rng.random() < 0.1:  # a reservation whose owner has not started yet
        return Lease(made.subnet, LeaseAttrs(IPv4Address(ip), ""), None, revision=revision)
    return made


@pytest.mark.parametrize("seed", range(40))
def test_incremental_validity_equals_valid_peers_over_the_whole_set(seed: int) -> None:
    rng = random.Random(seed)
    daemon = Daemon(DaemonSettings())
    daemon.config, daemon.network, daemon.lease = CONFIG, vxlan(), OWN
    store: dict[str, Lease] = {OWN.key: OWN}
    daemon._update_valid_peers(store, None)
    revision = 100
    for _ in range(60):
        changed_keys = set()
        for _ in range(rng.randint(1, 3)):
            index = rng.randrange(8)
            key = lease(f"10.44.{index + 2}.0/24", "198.51.100.1").key
            revision += 1
            if rng.random() < 0.3:
                store.pop(key, None)
            else:
                store[key] = random_lease(rng, index, revision)
            changed_keys.add(key)
        before = dict(daemon.valid_peer_leases)
        full = rng.random() < 0.1
        reported = daemon._update_valid_peers(store, None if full else changed_keys)
        want = {p.key: p for p in valid_peers(CONFIG, daemon.network, OWN, list(store.values()), lambda *a: None)}
        assert daemon.valid_peer_leases == want
        assert reported == {k for k in before.keys() | want.keys() if before.get(k) != want.get(k)}


def test_the_firewall_hears_of_address_changes_only() -> None:
    """The cached loop refreshes the firewall's peer set only when a valid peer's public address
    came, went or moved: a renewal (a new revision, same address) costs it nothing."""
    daemon = Daemon(DaemonSettings())

    def valid(ip: str, revision: int) -> Lease:
        return Lease(IPv4Network("10.244.7.0/24"), LeaseAttrs(IPv4Address(ip), "vxlan"), None, revision=revision)

    daemon.valid_peer_leases = {"a": valid("198.51.100.7", 1)}
    assert daemon._peer_addresses_changed({"a"})  # joined
    daemon.valid_peer_leases = {"a": valid("198.51.100.7", 2)}
    assert not daemon._peer_addresses_changed({"a"})  # renewed
    daemon.valid_peer_leases = {"a": valid("198.51.100.8", 3)}
    assert daemon._peer_addresses_changed({"a"})  # moved
    daemon.valid_peer_leases = {}
    assert daemon._peer_addresses_changed({"a"})  # gone
    assert not daemon._peer_addresses_changed({"a"})
