"""``overlayd check``: is every peer reachable from here, and if not, why?

Design note.  A check answers an operator's first question after "pods cannot talk" and must
name the layer that is broken, so each peer gets two kinds of evidence:

* **This host's kernel** against the leases: the backend's desired state for that one peer
  and family (``Network.desired_state`` of a planning-only ``Backend.offline`` network, the
  same function the daemon uses) compared slot by slot with what the kernel holds.  A missing or different
  object is "peer not programmed here"; a neighbour or FDB entry with another MAC than the
  lease's VtepMAC is "VTEP MAC mismatch between lease and kernel".  This needs no traffic and
  is exact, so it comes first.
* **Probes**: ICMP echo to the peer's underlay address of the family (PublicIP, or PublicIPv6
  for the IPv6 overlay, which is carried over the IPv6 underlay) and to its overlay address
  (``Backend.probe_address``: vxlan's ``<subnet>.0`` VTEP address, else the subnet's ``.1``),
  plus one echo of full overlay MTU with Don't Fragment set.  Underlay answers but overlay does
  not: the overlay's port is blocked.  Small overlay packets pass but full-size ones do not: an
  MTU blackhole.

A dual-stack peer is checked once per family, with the family as the parameter of one code
path (``Lease.families``): its IPv4 and IPv6 datapaths are separate devices, routes and FDB
entries, so one can break while the other works, and each row names its family.  This host's
own lease is the merge of its subnet file's subnets of both families, as the daemon holds it.

Probes use the system ``ping`` (iputils) rather than raw sockets: it is installed wherever
overlayd's tests run, handles DF (``-M do``), timeouts and the ICMP errors a raw socket would
have to parse by hand, and works under the same privileges an operator has.  Every probe of every
peer runs at once (bounded thread pool), so a check of many peers with dead ones takes about
one timeout, not one per peer.

The check reads the store and the kernel and sends pings; it changes nothing.  Classification is
pure (:func:`kernel_problem`, :func:`diagnose`) and unit-tested; the e2e test sabotages a real
cluster.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

import attrs

from . import _loader
from .config import NetworkConfig
from .daemon import DaemonSettings, backend_options_in_force, host_for_families
from .errors import PermanentError, UserError
from .hostiface import select_host
from .kernel import FdbEntry, Neighbour
from .model import Lease
from .peers import valid_peers
from .plugin import Network, merge_leases
from .probe import Pinger, Probe, ping
from .subnetfile import previous_subnets

Address = IPv4Address | IPv6Address

OK = "ok"
NOT_PROGRAMMED = "peer not programmed here"
MAC_MISMATCH = "VTEP MAC mismatch between lease and kernel"
PORT_BLOCKED = "overlay port blocked: underlay reachable, overlay not"
MTU_BLACKHOLE = "MTU blackhole: small packets pass, full-size do not"
UNREACHABLE = "host unreachable: neither underlay nor overlay answers"

#: IP header + ICMP echo header per family: ``ping -s MTU-overhead`` fills the MTU exactly.
ICMP_OVERHEAD = {4: 20 + 8, 6: 40 + 8}
MAX_WORKERS = 32


@attrs.frozen
class PeerCheck:
    """What ``check`` found about one peer's subnet of one family."""

    family: int  # 4 or 6: the overlay family (and the underlay family it is carried over)
    subnet: str
    public_ip: str
    overlay_address: str | None
    overlay: Probe | None
    underlay: Probe
    full_size: Probe | None
    kernel: str | None  # None: the kernel matches the lease; else the problem
    diagnosis: str
    ok: bool

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class CheckResult:
    peers: tuple[PeerCheck, ...]
    skipped: tuple[tuple[str, str], ...]  # (lease key, why it is not a peer here)
    mtu: int

    @property
    def failed(self) -> list[PeerCheck]:
        return [peer for peer in self.peers if not peer.ok]

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": not self.failed,
            "mtu": self.mtu,
            "peers": [peer.as_dict() for peer in self.peers],
            "skipped": [{"lease": key, "reason": why} for key, why in self.skipped],
        }


# -- pure classification ---------------------------------------------------------------------------


def kernel_problem(desired: Iterable[Any], actual: Iterable[Any]) -> str | None:
    """How the kernel differs from *desired* (one peer's objects), or None when it matches."""
    actual = frozenset(actual)
    by_key = {obj.key: obj for obj in actual}
    wrong: list[str] = []
    for want in sorted(desired, key=str):
        have = by_key.get(want.key)
        if have == want:
            continue
        if isinstance(want, Neighbour) and isinstance(have, Neighbour) and have.lladdr != want.lladdr:
            return f"{MAC_MISMATCH}: neighbour {want.dst} is {have.lladdr}, the lease says {want.lladdr}"
        if isinstance(want, FdbEntry) and have is None:
            other = sorted(
                str(obj.lladdr)
                for obj in actual
                if isinstance(obj, FdbEntry) and obj.dev == want.dev and obj.dst == want.dst
            )
            if other:
                return f"{MAC_MISMATCH}: the FDB sends {', '.join(other)} to {want.dst}, the lease says {want.lladdr}"
        kind = type(want).__name__.lower()
        wrong.append(f"{kind} {want} missing" if have is None else f"{kind} is '{have}', want '{want}'")
    return f"{NOT_PROGRAMMED}: {'; '.join(wrong)}" if wrong else None


def diagnose(kernel: str | None, underlay: Probe, overlay: Probe | None, full_size: Probe | None) -> tuple[bool, str]:
    """(ok, diagnosis) from the kernel comparison and the probes."""
    if kernel is not None:
        return False, kernel
    if overlay is None:
        return underlay.ok, OK if underlay.ok else "underlay unreachable (this backend has no overlay address to probe)"
    if overlay.ok:
        if full_size is not None and not full_size.ok:
            return False, MTU_BLACKHOLE
        return True, OK
    if underlay.ok:
        return False, PORT_BLOCKED
    return False, UNREACHABLE


# -- probes ------------------------------------------------------------------------------------


# -- the check -----------------------------------------------------------------------------------


def run_check(
    settings: DaemonSettings, *, count: int = 3, timeout: float = 1.0, pinger: Pinger | None = None
) -> CheckResult:
    """Check every peer of this host (the one *settings* describe, as the daemon would see it)."""
    if pinger is None:
        if shutil.which("ping") is None:
            raise UserError("overlayd check needs the ping command; install iputils-ping")
        pinger = ping
    own_subnets = previous_subnets(settings.subnet_file)
    if not own_subnets:
        raise UserError(
            f"no subnet file at {settings.subnet_file}: is overlayd running on this host? "
            "pass the --subnet-file it writes"
        )
    store = _loader.new_store(settings.store, settings.store_options)
    try:
        raw = store.get_config()
        if raw is None:
            raise UserError("the store has no network config; is --store the one the daemon uses?")
        config = NetworkConfig.from_json(raw)
        leases = store.list_leases().leases
    finally:
        store.close()
    own = own_lease(leases, own_subnets, settings.subnet_file)
    host = select_host(
        settings.ifaces, settings.iface_regex, settings.iface_can_reach, settings.public_ip, settings.public_ipv6
    )
    host = host_for_families(host, config)
    backend = _loader.new_backend(config.backend_type, backend_options_in_force(settings, config.backend_type))
    network: Network | None
    try:
        network = backend.offline(config, host, own)
    except PermanentError:
        network = None  # no dry runs for this backend: probes only
    skipped: list[tuple[str, str]] = []
    if network is not None:
        peers = valid_peers(config, network, own, leases, lambda key, _rev, why: skipped.append((key, why)),
                            (host.public_ip, host.iface_addr, host.public_ipv6))  # fmt: skip
        actual = network.actual_state()
    else:
        peers = [lease for lease in leases if lease.key not in own.keys]
        actual = frozenset()
    mtu = network.mtu if network is not None else host.iface_mtu

    def one(peer: Lease, family: int, pool: ThreadPoolExecutor) -> PeerCheck:
        kernel = kernel_problem(network.desired_state(own, [peer]), actual) if network is not None else None
        target = backend.probe_address(peer)
        public_ip = peer.attrs.public_ip_of(family)
        assert public_ip is not None  # valid_peers (or the filter below) saw to it
        size = mtu - ICMP_OVERHEAD[family]
        underlay_f = pool.submit(pinger, public_ip, count=count, timeout=timeout)
        overlay_f = pool.submit(pinger, target, count=count, timeout=timeout) if target else None
        full_f = pool.submit(pinger, target, count=2, timeout=timeout, size=size, df=True) if target else None
        underlay = underlay_f.result()
        overlay = overlay_f.result() if overlay_f else None
        full = full_f.result() if full_f else None
        ok, diagnosis = diagnose(kernel, underlay, overlay, full)
        return PeerCheck(
            family=family,
            subnet=str(peer.subnet_of(family)),
            public_ip=str(public_ip),
            overlay_address=str(target) if target else None,
            overlay=overlay,
            underlay=underlay,
            full_size=full,
            kernel=kernel,
            diagnosis=diagnosis,
            ok=ok,
        )

    # One row per family of each peer: a peer lease read from one store key holds one family,
    # a Kubernetes Node's may hold both, and each family is a datapath of its own.
    work = sorted(
        (
            (family, peer.only(family))
            for peer in peers
            for family in peer.families
            if family in config.families and peer.attrs.public_ip_of(family) is not None
        ),
        key=lambda item: (item[0], item[1].key),
    )
    with ThreadPoolExecutor(max_workers=MAX_WORKERS) as probes, ThreadPoolExecutor(max_workers=8) as outer:
        results = list(outer.map(lambda item: one(item[1], item[0], probes), work))
    return CheckResult(tuple(results), tuple(skipped), mtu)


def own_lease(leases: Sequence[Lease], subnets: Sequence[IPv4Network | IPv6Network], path: str) -> Lease:
    """This host's lease, merged from its store key of each family the subnet file names (as the
    daemon holds it); ``UserError`` naming the subnet the store has no lease for."""
    parts: list[Lease] = []
    for subnet in subnets:
        found = next((lease for lease in leases if lease.subnet_of(subnet.version) == subnet), None)
        if found is None:
            raise UserError(f"the store has no lease for this host's subnet {subnet} (from {path})")
        if found not in parts:
            parts.append(found)
    return merge_leases(parts)


def table(result: CheckResult) -> list[str]:
    """The human form: one row per peer."""
    rows: list[Sequence[str]] = [
        ("FAMILY", "PEER", "PUBLIC IP", "OVERLAY", "UNDERLAY", f"MTU {result.mtu}", "DIAGNOSIS")
    ]
    for peer in result.peers:
        overlay = f"{peer.overlay_address} {peer.overlay.shown()}" if peer.overlay else "-"
        full = peer.full_size.shown().split(" ")[0] if peer.full_size and peer.overlay and peer.overlay.ok else "-"
        underlay = peer.underlay.shown()
        rows.append((f"IPv{peer.family}", peer.subnet, peer.public_ip, overlay, underlay, full, peer.diagnosis))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)), row[-1]]) for row in rows]
    lines.extend(f"skipped {key}: {why}" for key, why in result.skipped)
    return lines
