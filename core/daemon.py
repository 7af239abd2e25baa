"""The overlayd daemon: a level-triggered reconciler from store leases to kernel state.

Start-up: check what can be checked locally (the subnet file's path, the health server's
address) before anything else, so a typo costs no lease and no kernel state; pick the underlay
interface, load or create the network config, pick the options of the backend the config names,
let the backend prepare its device (so BackendData such as the VTEP MAC is known), acquire or
reuse a lease carrying that data, finish the backend setup, then write the subnet file.

Then one loop, single-threaded on purpose, level-triggered at event-driven cost.  For a backend
whose network answers ``kernel_cache()`` (vxlan and every ``RouteNetwork``) the loop keeps two
caches and reads only them: the leases (:class:`overlayd.leasecache.LeaseCache`: one listing, then
the store's watch) and our kernel objects (:class:`overlayd.kernelcache.KernelCache`: one read,
then netlink notifications).  A pass re-validates only the leases that changed, recomputes only
those peers' kernel objects (:class:`overlayd.incremental.Reconciler`) and diffs only the slots
they or the kernel's notifications touched; so one event costs the same at 10 peers or 5000, and
an entry deleted by hand is back within a wait slice (half a second).  Every resync period (the
audit, minutes) it re-lists the store, re-reads the kernel and diffs everything; lost history
(``HistoryGone``) re-lists, a netlink overrun (``ENOBUFS``) re-reads the kernel and runs a full
diff.  A backend without a kernel cache (alloc, third-party ones) keeps the original loop: each
pass lists every lease (a snapshot, never a replay of events), computes the desired state, reads
the actual state from the kernel and applies the difference, at least every
``UNCACHED_RESYNC_CAP`` seconds.  In both, the store's event stream only decides *when* the next
pass runs, our own lease is renewed when due, a store outage leaves the datapath untouched (the
last desired state keeps being enforced, so kernel drift is still repaired) and is retried with
jittered exponential backoff capped at ``RETRY_CAP`` (one second: a failed call to a store that
is down costs a refused connection, so this is cheap, and the daemon is back within about a
second of the store answering again instead of at a retry up to 30 s away).  A store that
answers but holds **no network config** has lost its data (a wiped etcd): that is an outage
too, never an order to remove every peer — see ``overlayd.leasecache`` for when a listing is
trusted and how the leases of a reset store are held while their hosts re-create them.  A lost
lease is re-acquired, preferring the same subnet, instead of exiting (after a wipe: once the
config is back).  The subnet file is desired state too: every
pass compares it with what it should say and rewrites it when someone deleted or edited it.
So are the firewall rules (masquerade, forward, the overlay-port allow-list; ``overlayd.firewall``):
read back when the peers or the lease change and once per resync period, replaced in one
transaction when they differ, never flushed on a restart.

The daemon owns no process-wide state: no signal handlers, no logging config.  ``run()`` returns
when the given ``threading.Event`` is set; the CLI owns the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import random
import select
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from ipaddress import IPv4Network, IPv6Network
from typing import Any

import attrs

from . import _loader, plan
from .config import DEFAULT_BACKEND_TYPE, NetworkConfig
from .errors import HistoryGone, KernelError, LeaseLost, OverlaydError, StoreCorrupted, TransientError, UserError
from .firewall import Firewall, NoFirewall, RuleSet, desired_ruleset, open_firewall
from .health import DaemonStatus, HealthServer
from .hostiface import select_host
from .incremental import Reconciler
from .kernelcache import KernelCache
from .leasecache import LeaseCache
from .metrics import Metrics, drifted, kind_of
from .model import Lease, LeaseAttrs, LeaseList
from .peers import invalid_reason, public_ip_problem, resolve_claims, valid_peers
from .plugin import Backend, HostInfo, Network, Store
from .probe import CANNOT_RUN, ping
from .subnetfile import SubnetFile, check_writable, previous_subnets, read_bounded, write_subnet_file

log = logging.getLogger(__name__)

WAIT_SLICE = 0.5  # longest a single store wait may block, so a stop is seen quickly
DEBOUNCE = 0.005  # after a change, wait this long for its siblings before reconciling
MIN_RENEW_INTERVAL = 1.0  # renewals never follow each other faster, whatever the clocks say
DEFAULT_RESYNC_PERIOD = 300.0  # the audit: store re-list, kernel read-back, full diff
UNCACHED_RESYNC_CAP = 10.0  # a backend without a kernel cache still gets a full pass this often
RETRY_CAP = 1.0  # the longest wait between two tries of a failing store (see the module note)


@attrs.frozen
class DaemonSettings:
    """Everything the daemon needs, already validated (the CLI builds this from flags)."""

    store: str = "embedded"
    store_options: Mapping[str, Any] = attrs.field(factory=dict)
    backend: str | None = None  # None: the stored config's Backend.Type
    backend_options: Mapping[str, Any] = attrs.field(factory=dict)  # for whichever backend is in force
    #: Options given for any installed backend, keyed by plugin name (what the CLI collects from
    #: flags, env vars and TOML); the daemon uses those of the backend in force and warns about
    #: the others.  ``backend_options`` wins over these.
    plugin_options: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    network: IPv4Network | None = None
    subnet_len: int | None = None
    ifaces: tuple[str, ...] = ()
    iface_regex: tuple[str, ...] = ()
    iface_can_reach: str | None = None
    public_ip: str | None = None
    public_ipv6: str | None = None
    subnet_file: str = "/run/flannel/subnet.env"
    ip_masq: bool = False
    #: ``nftables``, ``iptables`` or ``none``.  The CLI's default is nftables; the library's is
    #: none, so a program embedding the daemon never changes a host's firewall unasked.
    firewall: str = "none"
    forward_rules: bool = True
    #: None: on for a backend with an overlay UDP port (vxlan, udp), off otherwise.
    restrict_overlay_port: bool | None = None
    healthz_ip: str = "127.0.0.1"
    healthz_port: int = 0
    resync_period: float = DEFAULT_RESYNC_PERIOD
    release_on_exit: bool = False
    #: Seconds between ICMP probes of every peer's overlay address (0: off); see ``Prober``.
    probe_interval: float = 0.0
    #: Export ``overlayd_peer_reachable{peer=...}``: one series per peer, so off by default.
    probe_per_peer: bool = False


TRIM_AFTER = 500  # a pass that changed this many peers returns freed heap to the system afterwards


def _trim_heap() -> None:
    """Give freed heap back to the system (glibc ``malloc_trim``; a no-op elsewhere).

    A bulk change (thousands of leases decoded from the store at once, a full kernel read) peaks
    well above the steady state, and glibc keeps the freed memory mapped; trimming after such a
    pass keeps the idle RSS near what the caches hold."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return
    trim(0)


def run(settings: DaemonSettings, stop: threading.Event) -> None:
    """Run the daemon in this process until *stop* is set (the library form of ``overlayd run``).

    Installs no signal handlers and configures no logging; set *stop* from wherever you like.
    """
    Daemon(settings).run(stop)


class Backoff:
    """Capped exponential backoff with full jitter."""

    def __init__(self, initial: float = 0.5, cap: float = RETRY_CAP, rng: random.Random | None = None) -> None:
        self.initial, self.cap, self._attempt = initial, cap, 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.initial * (2**self._attempt))
        self._attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempt = 0


def resolve_network_config(
    store: Store, network: IPv4Network | None, backend: str | None, subnet_len: int | None = None
) -> NetworkConfig:
    """The stored config; created from the flags when absent; a contradiction is a UserError."""
    raw = store.get_config()
    if raw is None:
        if network is None:
            raise UserError(
                "the store has no network config; pass --network CIDR (e.g. 10.244.0.0/16) "
                "or run 'overlayd network init'"
            )
        doc: dict[str, Any] = {"Network": str(network), "Backend": {"Type": backend or DEFAULT_BACKEND_TYPE}}
        if subnet_len:
            doc["SubnetLen"] = subnet_len
        store.put_config(NetworkConfig.from_dict(doc).to_json(), only_if_absent=True)
        raw = store.get_config()
        assert raw is not None
    config = NetworkConfig.from_json(raw)
    if backend and backend != config.backend_type:
        raise UserError(
            f"--backend {backend} contradicts the stored network config (Backend.Type {config.backend_type}); "
            "drop the flag or change the config with 'overlayd network init --force'"
        )
    if network is not None and network != config.network:
        raise UserError(
            f"--network {network} contradicts the stored network config (Network {config.network}); "
            "drop the flag or change the config with 'overlayd network init --force'"
        )
    return config


def backend_options_in_force(settings: DaemonSettings, backend: str) -> dict[str, Any]:
    """The options for *backend* (the one the network config names): ``plugin_options[backend]``
    under ``backend_options``.  Options given for any other backend are ignored with a warning
    that names both, since they usually mean the operator expected another backend."""
    for name, values in sorted(settings.plugin_options.items()):
        given = sorted(key for key, value in values.items() if value is not None)
        if name != backend and given:
            log.warning(
                "ignoring option(s) %s of backend %s: the backend in force is %s",
                ", ".join(f"--{name}-{key.replace('_', '-')}" for key in given),
                name,
                backend,
            )
    chosen = {k: v for k, v in settings.plugin_options.get(backend, {}).items() if v is not None}
    chosen.update(settings.backend_options)
    return chosen


def host_for_families(host: HostInfo, config: NetworkConfig) -> HostInfo:
    """*host* with a public address for every family the network carries, and none for the
    others (an IPv6-only lease publishes ``PublicIP`` null, as flannel's does).

    ``UserError`` naming the flag when a family has no usable address: checked once the config
    is known and before any lease is written or kernel object made."""
    chosen: dict[int, Any] = {}
    for version in (4, 6):
        ip = host.public_ip if version == 4 else host.public_ipv6
        if version not in config.families:
            chosen[version] = None
            continue
        flag = "--public-ip" if version == 4 else "--public-ipv6"
        if ip is None:
            what = "IPv4" if version == 4 else "global IPv6"
            raise UserError(
                f"the network carries IPv{version} but interface {host.iface} has no {what} address; "
                f"pass {flag} or choose another --iface"
            )
        problem = public_ip_problem(ip, config.network_of(version))
        if problem is not None:
            raise UserError(f"public IP {ip} {problem}; pass {flag} or --iface")
        chosen[version] = ip
    return attrs.evolve(host, public_ip=chosen[4], public_ipv6=chosen[6])


class Daemon:
    def __init__(self, settings: DaemonSettings, *, store: Store | None = None, backend: Backend | None = None) -> None:
        self.settings = settings
        # passes run at least every UNCACHED_RESYNC_CAP seconds (the cached loop: every wait slice),
        # so liveness is judged against that, not against the (minutes-long) audit period
        self.status = DaemonStatus(resync_period=min(settings.resync_period, UNCACHED_RESYNC_CAP))
        self._store = store
        self._backend = backend
        self._owns_store = store is None
        self.config: NetworkConfig | None = None
        self.host: HostInfo | None = None
        self.network: Network | None = None
        self.lease: Lease | None = None
        self._snapshot: LeaseList | None = None
        #: The valid peer leases by key, kept incrementally by the cached loop (see
        #: ``_update_valid_peers``); host-level state that depends on the whole peer set is
        #: refreshed only in a pass where this changed.
        self.valid_peer_leases: dict[str, Lease] = {}
        #: the public addresses of the valid peers, by key, as the firewall rules last saw them
        self._peer_addresses: dict[str, tuple[Any, Any]] = {}
        self._candidates: dict[str, Lease] = {}  # leases that passed the per-lease checks
        self._claimants: dict[tuple[str, str], set[str]] = {}  # exclusive claim -> candidate keys
        self._claims_of: dict[str, frozenset[tuple[str, str]]] = {}
        self._skipped_by_key: dict[str, str] = {}  # why each invalid lease is skipped (metrics)
        #: The caches of the cached loop (None in the un-cached loop); for tests and benches.
        self.lease_cache: LeaseCache | None = None
        self.kernel_cache: KernelCache | None = None
        self._reported: set[tuple[str, int]] = set()
        self._subnet_file_text: str | None = None  # what this daemon last wrote there
        self._health: HealthServer | None = None
        self.firewall: Firewall = NoFirewall()
        self._peers: list[Lease] = []  # the valid peers of the last pass, for the firewall
        self._peers_changed = True  # did the last pass see another peer set than the one before?
        self._rules_for: tuple[Any, ...] | None = None  # (lease subnets, host IPs) of the last ensure
        self._rules_ensured: tuple[RuleSet, ...] | None = None  # what the firewall last held
        self._rules_checked = float("-inf")  # monotonic time of the last read-back
        #: Prometheus metrics of this daemon (its own registry); recorded at the "# metrics:" lines.
        self.metrics = Metrics()
        self._desired: frozenset[Any] | None = None  # the previous pass's desired state (drift)
        self._skipped: list[str] = []  # reasons for the leases skipped by the current pass
        self._probe_targets: dict[str, Any] = {}  # peer subnet (each family) -> overlay address
        self._probe_address: Any = None  # the backend's probe_address (classmethod)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Start, reconcile until *stop* is set, then shut down (keeping state unless asked)."""
        try:
            self._start_health()
            if not self.start(stop):
                return
            if self.settings.probe_interval > 0:
                threading.Thread(target=self._probe_loop, args=(stop,), name="overlayd-probe", daemon=True).start()
            self.loop(stop)
            if self.settings.release_on_exit:
                self.release()
        finally:
            self.close()

    def start(self, stop: threading.Event) -> bool:
        """Bring the host up (see the module note).  Transient store errors are retried; False
        if stopped meanwhile."""
        settings = self.settings
        backoff = Backoff()
        check_writable(settings.subnet_file)
        self.host = select_host(
            settings.ifaces, settings.iface_regex, settings.iface_can_reach, settings.public_ip, settings.public_ipv6
        )
        while True:
            try:
                store = self.store
                self.metrics.store_source = self._garbled_skipped  # metrics: read at scrape time
                self.config = resolve_network_config(store, settings.network, settings.backend, settings.subnet_len)
                break
            except TransientError as exc:
                self._note_error(exc)
                if stop.wait(backoff.next()):
                    return False
        assert self.config is not None
        self.host = host_for_families(self.host, self.config)
        self.firewall = open_firewall(settings.firewall)
        self.status.rules_installed = isinstance(self.firewall, NoFirewall)
        backend = self._backend or _loader.new_backend(
            self.config.backend_type, backend_options_in_force(settings, self.config.backend_type)
        )
        self.network = backend.prepare(self.config, self.host)
        self.metrics.counters_source = self.network.counters  # metrics: forwarder counters at scrape time
        self._probe_address = type(backend).probe_address
        try:
            lease = self._acquire_until_done(stop)
            if lease is None:
                return False
            self._adopt(lease)
        except BaseException:
            if self.network.created:
                log.error("start-up failed; removing what this start created")
                self.network.teardown()
            raise
        log.info(
            "host %s (%s) holds %s; backend %s, MTU %d",
            " ".join(str(ip) for ip in (self.host.public_ip, self.host.public_ipv6) if ip is not None),
            self.host.iface,
            " ".join(str(lease.subnet_of(v)) for v in lease.families),
            self.config.backend_type,
            self.network.mtu,
        )
        return True

    def _acquire_until_done(self, stop: threading.Event) -> Lease | None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                return self._acquire(prefer_current=True)
            except TransientError as exc:
                self._note_error(exc)
                stop.wait(backoff.next())
        return None

    def _acquire(self, prefer_current: bool) -> Lease:
        assert self.config and self.host and self.network
        prefer: list[IPv4Network | IPv6Network] = []
        if prefer_current and self.lease is not None:
            prefer += [s for s in (self.lease.subnet, self.lease.ipv6_subnet) if s is not None]
        prefer += previous_subnets(self.settings.subnet_file)
        v6_data = self.network.backend_v6_data
        lease_attrs = LeaseAttrs(
            public_ip=self.host.public_ip,
            public_ipv6=self.host.public_ipv6,
            backend_type=self.config.backend_type,
            backend_data=dict(self.network.backend_data),
            backend_v6_data=dict(v6_data) if v6_data is not None and 6 in self.config.families else None,
        )
        lease = self.store.acquire_lease(self.config, lease_attrs, prefer=prefer)
        self.status.store_healthy = True
        self.metrics.store_up(True)  # metrics
        return lease

    def _adopt(self, lease: Lease) -> None:
        """Make *lease* ours: finish the backend setup and (re)write the subnet file."""
        assert self.config and self.network
        changed = self.lease is None or self.lease.keys != lease.keys
        self.lease = lease
        self.status.lease_subnet = " ".join(str(lease.subnet_of(v)) for v in lease.families)
        self.status.lease_expiration = lease.expiration.isoformat() if lease.expiration else None
        self.metrics.lease(lease.expiration)  # metrics
        if changed:
            self.network.activate(lease)
            self._subnet_file_text = None  # whatever is there now was for another subnet
            self._keep_subnet_file()
            self.store.mark_ready(lease)

    def _desired_subnet_file(self) -> str:
        assert self.config and self.network and self.lease
        return SubnetFile(
            network=self.config.network,
            subnet=self.lease.subnet,
            mtu=self.network.mtu,
            ip_masq=self.masquerades,
            ipv6_network=self.config.ipv6_network,
            ipv6_subnet=self.lease.ipv6_subnet,
        ).render()

    @property
    def masquerades(self) -> bool:
        """True when this daemon installs the masquerade rules.  The subnet file says
        ``FLANNEL_IPMASQ=true`` only then: the flannel CNI convention reads it as "the daemon does
        NAT" and turns the bridge plugin's own masquerade off."""
        return self.settings.ip_masq and not isinstance(self.firewall, NoFirewall)

    def _keep_subnet_file(self) -> None:
        """Make the subnet file say what it should: written at start, repaired when someone
        deleted or edited it (one stat and one bounded read per pass)."""
        want = self._desired_subnet_file()
        path = self.settings.subnet_file
        have = read_bounded(path)
        if have == want.encode():
            self.status.subnet_file_written = True
            return
        if self._subnet_file_text == want:
            log.warning("subnet file %s was %s; rewriting it", path, "removed" if have is None else "changed")
        try:
            write_subnet_file(path, want)
        except OSError as exc:
            self.status.subnet_file_written = False
            raise KernelError(f"cannot write the subnet file {path}: {exc.strerror or exc}") from exc
        self._subnet_file_text = want
        self.status.subnet_file_written = True

    def release(self) -> None:
        """``--release-on-exit``: give the lease back and remove what overlayd made."""
        if self.lease is not None:
            try:
                self.store.release_lease(self.lease)
            except OverlaydError as exc:
                log.warning("could not release lease %s: %s", " ".join(self.lease.keys), exc)
        if self.network is not None:
            self.network.teardown()
        try:
            self.firewall.remove()
        except OverlaydError as exc:
            log.warning("could not remove the firewall rules: %s", exc)
        try:
            os.unlink(self.settings.subnet_file)
        except FileNotFoundError:
            pass

    def close(self) -> None:
        if self._health is not None:
            self._health.stop()
            self._health = None
        if self._store is not None and self._owns_store:
            self._store.close()
            self._store = None

    def _garbled_skipped(self) -> int:
        return self._store.garbled_skipped if self._store is not None else 0

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = _loader.new_store(self.settings.store, self.settings.store_options)
        return self._store

    def _start_health(self) -> None:
        if self.settings.healthz_port:
            self._health = HealthServer(
                self.settings.healthz_ip, self.settings.healthz_port, lambda: self.status, metrics=self.metrics
            )
            self._health.start()

    # -- the loop ----------------------------------------------------------------------------

    def loop(self, stop: threading.Event) -> None:
        """Reconcile until *stop* is set: the cached loop when the network offers a kernel cache."""
        assert self.network is not None
        scope = self.network.kernel_cache()
        if scope is None:
            self._loop_uncached(stop)
            return
        kernel = KernelCache(scope.devices, protocol=scope.protocol, table=scope.table, audit_period=float("inf"))
        self.kernel_cache = kernel
        try:
            self._loop_cached(stop, kernel)
        finally:
            kernel.close()
            self.kernel_cache = None

    # -- the cached loop -----------------------------------------------------------------------

    def _loop_cached(self, stop: threading.Event, kernel: KernelCache) -> None:
        assert self.network is not None
        # the daemon times the audit; a store without config is an outage; a reset store's missing
        # leases are held for one resync period while their hosts re-create them
        leases = LeaseCache(
            self.store, audit_period=float("inf"), require_config=True, hold_after_reset=self.settings.resync_period
        )
        self.lease_cache = leases
        rec: Reconciler[Any] = Reconciler(kernel, self.network.apply)
        backoff = Backoff()
        built_for: Any = None  # (key, subnet, attrs) of the own lease the desired index was built for
        next_audit = float("-inf")
        listings = 0
        retry = False  # the last pass failed and has been backed off from: run the next one at once
        while not stop.is_set():
            try:
                fresh = kernel.fileno_or_none() is None
                if fresh:
                    kernel.open()  # subscribes, then reads the kernel fully
                    built_for = None
                audit = time.monotonic() >= next_audit
                if audit:
                    leases.invalidate()  # the next poll lists the store
                started = time.monotonic()
                if leases.poll(0.0 if audit or retry else self._poll_timeout()) and not audit:
                    stop.wait(DEBOUNCE)  # let a burst of writes land in one pass
                    leases.poll(0.0)
                polled = time.monotonic()
                self.status.store_healthy = True
                self.metrics.store_up(True)  # metrics
                if leases.listings > listings and not audit:
                    self.metrics.relisted()  # metrics: lost history (or a reconnect) made the cache list again
                listings = leases.listings
                self._keep_lease_cached(leases)
                assert self.lease is not None
                kernel.drain()
                own = (self.lease.keys, self.lease.attrs)
                rebuild = built_for != own  # our lease or host changed: every peer's objects may differ
                if audit or kernel.needs_resync:
                    if not audit:
                        log.info("the kernel cache may have missed changes; re-reading the kernel, diffing everything")
                    if not fresh or kernel.needs_resync:  # open() has just read it
                        kernel.resync()
                    audit = True
                    next_audit = time.monotonic() + self.settings.resync_period
                elif rebuild and not fresh:
                    kernel.resync()  # activating another subnet may have flushed routes silently
                full = audit or rebuild
                keys = leases.take_changes()
                # the audit re-checks every lease's validity too; the peers whose valid lease
                # differs (a re-list reports what changed) get their objects recomputed
                changed = self._update_valid_peers(leases.leases, None if full else keys)
                peer_slots: frozenset[Any] | None = None  # None: every slot may have a new desired content
                if rebuild:
                    rec.rebuild({key: self._peer_objects(lease) for key, lease in self.valid_peer_leases.items()})
                    built_for = own
                else:
                    peer_slots = rec.set_peers(
                        {key: self._peer_objects(self.valid_peer_leases.get(key)) for key in changed}
                    )
                try:
                    change = rec.run(full=full)
                except OverlaydError:
                    self.metrics.pass_failed()  # metrics
                    raise
                self._pass_metrics(leases, kernel, rec, change, peer_slots, changed, audit, polled)
                self._keep_subnet_file()
                # ---- FIREWALL HOOK: host-level state over the whole peer set, once per pass ----------
                # changed: a valid peer's public address came, went or moved in this pass (a renewal
                # does not count: the rules hold addresses only); full: an audit or a rebuild.  The
                # peers are passed as a view: _keep_firewall reads them only when it acts.
                self._keep_firewall(
                    self.valid_peer_leases.values(), changed=self._peer_addresses_changed(changed) or full
                )
                # -----------------------------------------------------------------------------------
                if audit or len(changed) >= TRIM_AFTER:
                    _trim_heap()
                if audit:
                    log.debug(
                        "audit at revision %d: %d valid peers, list %.1f ms, pass %.1f ms",
                        leases.revision,
                        len(self.valid_peer_leases),
                        (polled - started) * 1000,
                        (time.monotonic() - polled) * 1000,
                    )
                self.status.first_reconcile_done = True
                self.status.last_reconcile = time.monotonic()
                self.status.peers_programmed = len(self.valid_peer_leases)
                backoff.reset()
                retry = False
            except TransientError as exc:
                self._note_error(exc)
                self.status.store_healthy = False
                self.metrics.store_up(False)  # metrics
                self.metrics.watch_restarted()  # metrics: the cache lists and watches afresh
                self._enforce_while_waiting(kernel, rec, backoff.next(), stop, enforce=leases.listings > 0)
            except OverlaydError as exc:
                # e.g. the kernel refused one change: keep running, the next pass retries those slots
                self._note_error(exc)
                if isinstance(exc, StoreCorrupted):
                    self.status.store_healthy = False
                    self.metrics.store_up(False)  # metrics
                self._back_off_from_kernel(kernel, backoff.next(), stop)
                retry = True

    def _back_off_from_kernel(self, kernel: KernelCache, seconds: float, stop: threading.Event) -> None:
        """Wait *seconds* after a failed pass, or less when a device that our objects went
        through comes back up (host-gw's routes while the underlay was down: retry at once)."""
        back = kernel.devices_back
        deadline = time.monotonic() + seconds
        while not stop.is_set() and (remaining := deadline - time.monotonic()) > 0:
            fileno = kernel.fileno_or_none()
            if fileno is None:
                stop.wait(remaining)
                return
            select.select([fileno], [], [], min(remaining, WAIT_SLICE))
            kernel.drain()
            if kernel.devices_back != back:
                return

    _tally_at = float("-inf")  # when the kernel-entry gauges were last counted in full
    _tally_due = True
    _kernel_counts: Counter[str] = Counter()  # our kernel objects by kind (metrics)

    def _pass_metrics(
        self,
        leases: LeaseCache,
        kernel: KernelCache,
        rec: Reconciler[Any],
        change: plan.Plan[Any],
        peer_slots: frozenset[Any] | None,
        changed: set[str],
        audit: bool,
        started: float,
    ) -> None:
        """The cached pass's metrics and log line, at a cost that does not grow with N except
        where the figure itself is a count over everything (at most once a second)."""
        assert self.lease is not None
        removals = change.removals()
        now = time.monotonic()
        if audit or (self._tally_due and now - self._tally_at >= 1.0):
            # metrics: a full count from the cache (which has not yet heard of this pass's apply:
            # the difference below adds it), at most once a second and at each audit
            self._kernel_counts = Counter(kind_of(obj) for obj in kernel.objects())
            self._tally_at, self._tally_due = now, False
            self.metrics.kernel_entry_counts(self._kernel_counts)
        if not change.empty:
            # drift: what a pass repairs in slots no lease change touched (a rebuild counts none)
            repaired: list[Any] = []
            if peer_slots is not None:
                repaired = [obj for obj in change.add if obj.key not in peer_slots]
                repaired.extend(
                    obj for obj in removals if obj.key not in peer_slots and not rec.desired.objects_in([obj.key])
                )
            self.metrics.drift_repaired(repaired)  # metrics
            log.info(
                "reconciled: %d added or replaced, %d removed",
                len(change.add),
                len(removals),
                extra={"added": len(change.add), "removed": len(removals), "drift": len(repaired)},
            )
            # metrics: the kernel entries after this apply, by difference over the touched slots
            # (the cache hears our own changes only at the next drain); recounted in full later
            slots = {obj.key for obj in change.add} | {obj.key for obj in change.remove}
            before = kernel.objects_in(slots)
            self._kernel_counts.update(kind_of(obj) for obj in plan.simulate(before, change))
            self._kernel_counts.subtract(kind_of(obj) for obj in before)
            self.metrics.kernel_entry_counts(self._kernel_counts)
            self._tally_due = True
        if changed or audit or not change.empty:
            known = len(leases.leases) - sum(key in leases.leases for key in self.lease.keys)
            self.metrics.peers(known, len(self.valid_peer_leases), self._skipped_by_key.values())  # metrics
            self._set_probe_targets(self.valid_peer_leases.values())
        self.metrics.pass_done(time.monotonic() - started, len(change.add), len(removals))  # metrics

    def _enforce_while_waiting(
        self, kernel: KernelCache, rec: Reconciler[Any], seconds: float, stop: threading.Event, *, enforce: bool
    ) -> None:
        """Back off from the store for *seconds*, still repairing kernel drift as it is notified
        (the last desired state keeps being enforced while the store is away).  Nothing is
        enforced before the first listing: an empty desired state is not a known one."""
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            try:
                if enforce and kernel.fileno_or_none() is not None:
                    kernel.drain()
                    if kernel.needs_resync:
                        kernel.resync()
                    rec.run()
                    self.status.last_reconcile = time.monotonic()
            except OverlaydError as exc:
                log.warning("reconcile from the last desired state failed: %s", exc)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            fileno = kernel.fileno_or_none()
            if fileno is None:
                stop.wait(min(remaining, WAIT_SLICE))
            else:
                select.select([fileno], [], [], min(remaining, WAIT_SLICE))

    def _poll_timeout(self) -> float:
        renew_at = self._renew_due_in()
        return WAIT_SLICE if renew_at is None else max(0.0, min(WAIT_SLICE, renew_at))

    def _keep_lease_cached(self, leases: LeaseCache) -> None:
        assert self.lease is not None
        mine = [leases.leases.get(key) for key in self.lease.keys if key not in leases.held]
        self._keep_lease(LeaseList(tuple(x for x in mine if x is not None), leases.revision))

    def _peer_objects(self, lease: Lease | None) -> frozenset[Any]:
        """The kernel objects for one valid peer (none for a peer that is gone or invalid)."""
        assert self.network is not None and self.lease is not None
        return frozenset() if lease is None else self.network.desired_state(self.lease, [lease])

    def _peer_addresses_changed(self, changed: Iterable[str]) -> bool:
        """Whether the public addresses of the valid peers *changed* (keys) differ from what they
        were, keeping the record up to date: O(changed), so a renewal costs the firewall nothing."""
        moved = False
        for key in changed:
            lease = self.valid_peer_leases.get(key)
            now = (lease.attrs.public_ip, lease.attrs.public_ipv6) if lease is not None else None
            if self._peer_addresses.get(key) != now:
                moved = True
                if now is None:
                    del self._peer_addresses[key]
                else:
                    self._peer_addresses[key] = now
        return moved

    def _update_valid_peers(self, leases: Mapping[str, Lease], keys: Iterable[str] | None) -> set[str]:
        """Bring ``valid_peer_leases`` up to date for the leases *keys* (None: all of them);
        returns the keys whose valid lease changed (appeared, went, or is another version).

        Validity is :func:`overlayd.peers.valid_peers`'s, computed piecewise: the per-lease checks
        for each changed key, then the exclusive claims re-resolved only among the leases that
        share a claim (transitively) with a changed one — the answer ``valid_peers`` gives over
        the whole set, since unconnected leases cannot affect each other's claims.
        """
        assert self.config is not None and self.network is not None and self.lease is not None
        own = self.lease
        host = self.host
        addresses = (host.public_ip, host.iface_addr, host.public_ipv6) if host is not None else ()
        if keys is None:
            self._candidates, self._claimants, self._claims_of, self._skipped_by_key = {}, {}, {}, {}
            todo: set[str] = set(leases) | set(self.valid_peer_leases)
        else:
            todo = set(keys)
        touched: set[tuple[str, str]] = set()
        for key in todo:
            for claim in self._claims_of.pop(key, frozenset()):
                touched.add(claim)
                holders = self._claimants.get(claim)
                if holders is not None:
                    holders.discard(key)
                    if not holders:
                        del self._claimants[claim]
            self._candidates.pop(key, None)
            self._skipped_by_key.pop(key, None)
            lease = leases.get(key)
            if lease is None or key in own.keys or (lease.is_reservation and not lease.attrs.backend_type):
                continue
            reason = invalid_reason(self.config, self.network, own, lease, addresses)
            if reason is not None:
                self._report_invalid(key, lease.revision, reason)
                self._skipped_by_key[key] = reason
                continue
            self._candidates[key] = lease
            claims = self.network.exclusive_claims(lease)
            self._claims_of[key] = claims
            for claim in claims:
                touched.add(claim)
                self._claimants.setdefault(claim, set()).add(key)
        # every candidate connected to a touched claim competes again
        group: set[str] = {key for key in todo if key in self._candidates}
        frontier = list(touched)
        seen: set[tuple[str, str]] = set()
        while frontier:
            claim = frontier.pop()
            if claim in seen:
                continue
            seen.add(claim)
            for key in self._claimants.get(claim, ()):
                if key not in group:
                    group.add(key)
                    frontier.extend(self._claims_of.get(key, ()))
        winners, losers = resolve_claims(own, [self._candidates[key] for key in group], self.network.exclusive_claims)
        won = {lease.key: lease for lease in winners}
        for key in group:
            self._skipped_by_key.pop(key, None)
        for lease, reason in losers:
            self._report_invalid(lease.key, lease.revision, reason)
            self._skipped_by_key[lease.key] = reason
        changed: set[str] = set()
        for key in todo | group:
            old, new = self.valid_peer_leases.get(key), won.get(key)
            if old is not new and old != new:
                changed.add(key)
            if new is None:
                self.valid_peer_leases.pop(key, None)
            else:
                self.valid_peer_leases[key] = new
        return changed

    # -- the un-cached loop (backends without a kernel cache) ----------------------------------

    def _loop_uncached(self, stop: threading.Event) -> None:
        backoff = Backoff()
        # each pass lists through a lease cache only for its trust rules (no config: an outage;
        # a reset store's missing leases held one resync period); see overlayd.leasecache
        cache = LeaseCache(
            self.store, audit_period=0.0, require_config=True, hold_after_reset=self.settings.resync_period
        )
        while not stop.is_set():
            try:
                started = time.monotonic()
                cache.relist()
                cache.take_changes()
                snapshot = cache.snapshot()
                held = set(self.lease.keys if self.lease is not None else ()) & set(cache.held)
                if held:  # ours is re-created, never held
                    snapshot = LeaseList(tuple(x for x in snapshot.leases if x.key not in held), snapshot.revision)
                listed = time.monotonic()
                self._snapshot = snapshot
                self.status.store_healthy = True
                self.metrics.store_up(True)  # metrics
                self._keep_lease(snapshot)
                self.reconcile(snapshot)
                self._keep_subnet_file()
                self._keep_firewall(self._peers, changed=self._peers_changed)
                log.debug(
                    "pass at revision %d: list %.1f ms, reconcile %.1f ms",
                    snapshot.revision,
                    (listed - started) * 1000,
                    (time.monotonic() - listed) * 1000,
                )
                backoff.reset()
                self._wait_for_change(snapshot.revision, stop)
            except HistoryGone:
                self.metrics.relisted()  # metrics: the next pass lists every lease again
                continue
            except TransientError as exc:
                self._note_error(exc)
                self.status.store_healthy = False
                self.metrics.store_up(False)  # metrics
                self.metrics.watch_restarted()  # metrics: the next pass lists and watches afresh
                if self._snapshot is not None:
                    self._reconcile_quietly(self._snapshot)
                stop.wait(backoff.next())
            except OverlaydError as exc:
                # e.g. the kernel refused one change: keep running, the next pass tries again
                self._note_error(exc)
                if isinstance(exc, StoreCorrupted):  # the datapath stays; status shows the store is not fine
                    self.status.store_healthy = False
                    self.metrics.store_up(False)  # metrics
                stop.wait(backoff.next())

    def _set_probe_targets(self, peers: Iterable[Lease]) -> None:
        """``--probe-interval``'s targets: each family's subnet (CIDR, the metric's ``peer`` label)
        of every peer -> that family's overlay address, so a dual-stack peer is probed twice."""
        if self.settings.probe_interval > 0 and self._probe_address is not None:
            targets = {str(p.subnet_of(v)): self._probe_address(p.only(v)) for p in peers for v in p.families}
            self._probe_targets = {subnet: address for subnet, address in targets.items() if address is not None}

    def _probe_loop(self, stop: threading.Event) -> None:
        """``--probe-interval``: ping every programmed peer's overlay address, all at once, and
        export how many answered (and, with ``--probe-per-peer``, which).  Its own thread, so a
        dead peer's timeout never delays a reconcile pass; it reads only the target list the
        last pass left."""
        warned = False
        with ThreadPoolExecutor(max_workers=32, thread_name_prefix="overlayd-probe") as pool:
            while not stop.wait(self.settings.probe_interval):
                targets = dict(self._probe_targets)
                probes = dict(zip(targets, pool.map(lambda ip: ping(ip, count=1, timeout=1.0), targets.values()),
                                  strict=True))  # fmt: skip
                answers = {subnet: probe.ok for subnet, probe in probes.items()}
                broken = next((p.detail for p in probes.values() if p.detail.startswith(CANNOT_RUN)), None)
                if broken is not None and not warned:
                    log.warning("probe: %s", broken)  # once: e.g. run without CAP_NET_RAW
                warned = warned or broken is not None
                self.metrics.peers_reachable(sum(answers.values()))  # metrics
                if self.settings.probe_per_peer:
                    self.metrics.peer_reachable(answers)  # metrics
                log.debug("probe: %d of %d peers answered", sum(answers.values()), len(answers))

    def _wait_for_change(self, revision: int, stop: threading.Event) -> None:
        deadline = time.monotonic() + min(self.settings.resync_period, UNCACHED_RESYNC_CAP)
        renew_at = self._renew_due_in()
        if renew_at is not None:
            deadline = min(deadline, time.monotonic() + renew_at)
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            result = self.store.wait_for_events(revision, min(WAIT_SLICE, remaining))
            if result.events:
                stop.wait(DEBOUNCE)
                return
            revision = result.revision

    _last_renewal = float("-inf")  # monotonic time of our last renewal

    def _renew_due_in(self) -> float | None:
        """Seconds until our lease needs renewing (None for a reservation); never less than
        ``MIN_RENEW_INTERVAL`` after a renewal, so a wrong clock or margin cannot make a storm."""
        if self.lease is None or self.lease.expiration is None:
            return None
        due = self.lease.expiration - self.store.renew_margin
        floor = self._last_renewal + MIN_RENEW_INTERVAL - time.monotonic()
        return max(0.0, (due - datetime.now(UTC)).total_seconds(), floor)

    def _keep_lease(self, snapshot: LeaseList) -> None:
        """Renew our lease when due, every key of it (one per family); re-acquire it (same
        subnets preferred) when any key is gone or now names another host."""
        assert self.lease is not None
        own = self.lease
        current = {x.key: x for x in snapshot.leases if x.key in own.keys}
        for version in own.families:
            found = current.get(own.only(version).key)
            if found is None or found.attrs.public_ip_of(version) != own.attrs.public_ip_of(version):
                log.warning("lease %s is gone from the store; acquiring again", own.subnet_of(version))
                self._reacquire()
                return
        due = self._renew_due_in()
        if due is not None and due <= 0:
            try:
                self._last_renewal = time.monotonic()
                self.lease = self.store.renew_lease(own)
                self.status.lease_expiration = self.lease.expiration.isoformat() if self.lease.expiration else None
                self.metrics.lease(self.lease.expiration)  # metrics
                log.debug("renewed lease %s until %s", self.lease.subnet, self.lease.expiration)
            except LeaseLost:
                self._reacquire()

    def _reacquire(self) -> None:
        lease = self._acquire(prefer_current=True)
        if self.lease is not None:
            for version in lease.families:
                now, was = lease.subnet_of(version), self.lease.subnet_of(version)
                if was is not None and now != was:
                    log.warning("re-acquired a different subnet %s (was %s)", now, was)
        self._adopt(lease)

    def reconcile(self, snapshot: LeaseList) -> plan.Plan[Any]:
        """One pass: desired (from *snapshot*) versus actual (from the kernel); apply the difference."""
        assert self.network is not None and self.lease is not None
        started = time.monotonic()
        self._skipped = []
        peers = self.valid_peers(snapshot.leases)
        self._peers_changed, self._peers = peers != self._peers, peers
        desired = self.network.desired_state(self.lease, peers)
        actual = self.network.actual_state()
        change = plan.diff(desired, actual)
        removals = change.removals()
        if not change.empty:
            try:
                self.network.apply(change)
            except OverlaydError:
                self.metrics.pass_failed()  # metrics
                raise
            repaired = drifted(self._desired, change.add, removals)
            self.metrics.drift_repaired(repaired)  # metrics
            log.info(
                "reconciled: %d added or replaced, %d removed",
                len(change.add),
                len(removals),
                extra={"added": len(change.add), "removed": len(removals), "drift": len(repaired)},
            )
        self._desired = desired
        self.status.first_reconcile_done = True
        self.status.last_reconcile = time.monotonic()
        self.status.peers_programmed = len(peers)
        # metrics: one pass, its peers and the kernel state it leaves (actual + plan, no re-read)
        known = sum(1 for lease in snapshot.leases if lease.key not in self.lease.keys)
        self._set_probe_targets(peers)
        self.metrics.peers(known, len(peers), self._skipped)
        self.metrics.kernel_entries(plan.simulate(actual, change))
        self.metrics.pass_done(time.monotonic() - started, len(change.add), len(removals))
        return change

    def desired_rules(self, peers: Iterable[Lease]) -> tuple[RuleSet, ...]:
        """The firewall rule sets for this host, one per address family the network has."""
        assert self.config is not None and self.network is not None and self.lease is not None
        settings, host, config, lease = self.settings, self.host, self.config, self.lease
        restrict = settings.restrict_overlay_port
        port = self.network.overlay_port if restrict is None or restrict else None
        peers = tuple(peers)
        families = [
            (config.network, lease.subnet, host.public_ip if host else None),
            (config.ipv6_network, lease.ipv6_subnet, host.public_ipv6 if host else None),
        ]
        return tuple(
            desired_ruleset(
                network,
                subnet,
                ip_masq=settings.ip_masq,
                forward=settings.forward_rules,
                overlay_port=port,
                leases=peers,
                own_public_ip=own_ip,
            )
            for network, subnet, own_ip in families
            if network is not None and subnet is not None
        )

    def _keep_firewall(self, peers: Iterable[Lease], changed: bool) -> None:
        """Keep our firewall rules equal to the desired ones (masquerade, forward, allow-list).

        The desired rules are built and ``Firewall.ensure`` reads the kernel's back and replaces
        them when they differ: when *changed* says the peer set changed, when this host's lease
        (subnet) or addresses changed, and otherwise once per resync period, as the audit that puts
        hand edits back.  Any other call returns at once without touching *peers* (O(1)), so an
        event-driven loop may call it on every event.  A write replaces our table (or chains) in
        one transaction, so there is never a moment without NAT.
        """
        if isinstance(self.firewall, NoFirewall):
            return
        assert self.lease is not None
        host = self.host
        key = (self.lease.subnet, self.lease.ipv6_subnet, host.public_ip if host else None)
        now = time.monotonic()
        due = now - self._rules_checked >= self.settings.resync_period
        if not (changed or due or key != self._rules_for):
            return
        want = self.desired_rules(peers)
        try:
            for ruleset in want:
                if not self.firewall.ensure(ruleset):
                    continue
                self.metrics.firewall_resync()  # metrics
                if self._rules_ensured is not None:
                    if self._rules_ensured == want:
                        log.warning(
                            "firewall rules of %s (%s) were changed by hand; put back",
                            self.firewall.name,
                            ruleset.family,
                        )
                    else:
                        log.info("firewall rules of %s (%s) updated", self.firewall.name, ruleset.family)
        except OverlaydError:
            self.status.rules_installed = False
            self._rules_ensured = self._rules_for = None
            raise
        self._rules_ensured, self._rules_for = want, key
        self._rules_checked = now
        self.status.rules_installed = True

    def _reconcile_quietly(self, snapshot: LeaseList) -> None:
        try:
            self.reconcile(snapshot)
        except OverlaydError as exc:
            log.warning("reconcile from the last snapshot failed: %s", exc)

    def valid_peers(self, leases: Sequence[Lease]) -> list[Lease]:
        assert self.config is not None and self.network is not None and self.lease is not None
        host = self.host
        addresses = (host.public_ip, host.iface_addr, host.public_ipv6) if host is not None else ()
        mine = set(self.lease.keys)  # a dual-stack host's own lease is one key per family
        others = [lease for lease in leases if lease.key not in mine]
        return valid_peers(self.config, self.network, self.lease, others, self._report_invalid, addresses)

    def _report_invalid(self, key: str, revision: int, reason: str) -> None:
        self._skipped.append(reason)
        if (key, revision) not in self._reported:
            self._reported.add((key, revision))
            log.warning("skipping lease %s (revision %d): %s", key, revision, reason)

    def _note_error(self, exc: OverlaydError) -> None:
        self.metrics.error(exc)  # metrics
        text = str(exc)
        if text != self.status.last_error:
            log.warning("%s; retrying", text)
        self.status.last_error = text
