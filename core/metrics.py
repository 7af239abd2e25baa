"""Prometheus metrics of one daemon: what it knows, what it did, what went wrong.

Design note.  Every ``Metrics`` owns its own ``CollectorRegistry`` instead of using
prometheus_client's process-global default one: a test or an embedding tool may run several
daemons in one process, and with the global registry their metrics would clash (the second
``Counter("overlayd_...")`` raises "Duplicated timeseries").  The health server exposes the
registry of the daemon it serves.

The daemon records through a few small methods (``pass_done``, ``drift_repaired``,
``store_up``...) called at clearly marked places, so the loop stays readable and another loop
(the cached, incremental one) can make the same calls.  Figures that other objects already keep
are read at scrape time instead of being copied: the store's ``garbled_skipped``, a backend's
``Network.counters()`` (the udp forwarder's packet counters), this host's lease expiry.

Names follow Prometheus' conventions: an ``overlayd_`` prefix, ``_total`` for counters,
``_seconds`` for durations.  Labels are bounded by construction: object kinds (route, neigh,
fdb), error classes from :mod:`overlayd.errors`, a short list of skip reasons; never a peer,
subnet or address.  docs/operations.md lists every metric; ``tests/test_metrics.py`` checks that
list against the registry.
"""

from __future__ import annotations

import importlib.metadata
import math
import re
import sys
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from . import errors

PREFIX = "overlayd"

#: Kinds of kernel objects, as ``type(obj).__name__`` maps to a label (bounded: these or "other").
KINDS = {"Route": "route", "Neighbour": "neigh", "FdbEntry": "fdb"}

#: Reasons a peer lease is skipped, matched on the text :mod:`overlayd.peers` reports; the label
#: is one of these keys (or "other"), never the lease.
SKIP_REASONS: tuple[tuple[str, str], ...] = (
    ("outside_network", "outside network"),
    ("no_public_ip", "has no PublicIP"),
    ("bad_public_ip", "PublicIP"),
    ("backend_type", "backend type"),
    ("own_address", "names this host's address"),
    ("claim_taken", "claimed"),
    ("backend_data", "BackendData"),
)

#: Error kinds: the overlayd error classes a daemon meets (most specific first), else "other".
ERROR_KINDS: tuple[tuple[type[errors.OverlaydError], str], ...] = (
    (errors.HistoryGone, "history_gone"),
    (errors.LeaseLost, "lease_lost"),
    (errors.LeaseConflict, "lease_conflict"),
    (errors.StoreUnavailable, "store_unavailable"),
    (errors.StoreCorrupted, "store_corrupted"),
    (errors.KernelError, "kernel"),
    (errors.GarbledLease, "garbled_lease"),
    (errors.SubnetExhausted, "subnet_exhausted"),
    (errors.UserError, "config"),
    (errors.TransientError, "transient"),
)

PLAN_SIZE_BUCKETS = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
PASS_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_COUNTER_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def error_kind(exc: BaseException) -> str:
    """The bounded label for *exc*: see ``ERROR_KINDS``."""
    for cls, kind in ERROR_KINDS:
        if isinstance(exc, cls):
            return kind
    return "other"


def skip_reason(text: str) -> str:
    """The bounded label for a skip reason reported by :func:`overlayd.peers.valid_peers`."""
    for label, needle in SKIP_REASONS:
        if needle in text:
            return label
    return "other"


def kind_of(obj: object) -> str:
    return KINDS.get(type(obj).__name__, "other")


class _Scraped(Collector):
    """Figures read from other objects when Prometheus scrapes (see the module note)."""

    def __init__(self, owner: Metrics) -> None:
        self._owner = owner

    def describe(self) -> Iterable[Any]:
        return []  # dynamic: the forwarder's counters are whatever the backend reports

    def collect(self) -> Iterator[Any]:
        owner = self._owner
        garbled = CounterMetricFamily(
            f"{PREFIX}_store_garbled_leases_skipped",
            "Garbled lease entries the store skipped (each is logged once per key and revision).",
        )
        garbled.add_metric([], _number(owner.store_source))
        yield garbled
        expiry = GaugeMetricFamily(
            f"{PREFIX}_lease_expiry_seconds",
            "Seconds until this host's lease expires (+Inf for a reservation; absent before a lease).",
        )
        seconds = owner.lease_expiry_seconds()
        if seconds is not None:
            expiry.add_metric([], seconds)
        yield expiry
        for name, value in sorted(owner.forwarder_counters().items()):
            family = CounterMetricFamily(
                f"{PREFIX}_forwarder_{name}", f"Backend forwarder counter {name!r} (Network.counters())."
            )
            family.add_metric([], value)
            yield family


def _number(source: Callable[[], object] | None) -> float:
    if source is None:
        return 0.0
    try:
        value = source()
    except Exception:  # a scrape must never fail because a store is closing
        return 0.0
    return float(value) if isinstance(value, int | float) else 0.0


class Metrics:
    """The metrics of one daemon, in a registry of its own (see the module note)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r, p = self.registry, PREFIX
        self._lock = threading.Lock()
        self.store_source: Callable[[], object] | None = None
        self.counters_source: Callable[[], Mapping[str, int]] | None = None
        self._expiration: datetime | None = None
        self._has_lease = False

        Info(f"{p}_build", "overlayd version and Python version.", registry=r).info(
            {"version": _version(), "python": ".".join(map(str, sys.version_info[:3]))}
        )
        self._peers_known = Gauge(f"{p}_peers_known", "Peer leases in the store (other hosts').", registry=r)
        self._peers_programmed = Gauge(
            f"{p}_peers_programmed", "Peer leases that passed validation and are programmed.", registry=r
        )
        self._peers_skipped = Gauge(
            f"{p}_peers_skipped", "Peer leases skipped at the last pass, by reason.", ["reason"], registry=r
        )
        self._kernel_entries = Gauge(
            f"{p}_kernel_entries", "Kernel objects overlayd owns, by kind (route, neigh, fdb).", ["kind"], registry=r
        )
        self._passes = Counter(
            f"{p}_reconcile_passes", "Reconcile passes, by result (ok, error).", ["result"], registry=r
        )
        self._pass_seconds = Histogram(
            f"{p}_reconcile_pass_duration_seconds",
            "Duration of a reconcile pass (desired state, kernel read, apply).",
            buckets=PASS_SECONDS_BUCKETS,
            registry=r,
        )
        self._plan_size = Histogram(
            f"{p}_reconcile_plan_size",
            "Kernel changes per reconcile pass (0 for an unchanged pass).",
            buckets=PLAN_SIZE_BUCKETS,
            registry=r,
        )
        self._plan_changes = Counter(
            f"{p}_reconcile_changes", "Kernel objects added or replaced (op=add) and removed (op=remove).",
            ["op"], registry=r,
        )  # fmt: skip
        self._last_pass = Gauge(
            f"{p}_reconcile_last_success_timestamp_seconds", "Unix time of the last successful pass.", registry=r
        )
        self._drift = Counter(
            f"{p}_drift_repaired",
            "Kernel objects put back after they were deleted or changed behind overlayd's back, by kind.",
            ["kind"],
            registry=r,
        )
        self._errors = Counter(f"{p}_errors", "Errors the daemon met and retried, by kind.", ["kind"], registry=r)
        self._store_up = Gauge(f"{p}_store_up", "1 when the last store call succeeded, else 0.", registry=r)
        self._watch_restarts = Counter(
            f"{p}_store_watch_restarts", "Watches of the store restarted after an error.", registry=r
        )
        self._relists = Counter(
            f"{p}_store_relists", "Full re-lists of the leases after the store lost the history.", registry=r
        )
        self._firewall_resyncs = Counter(
            f"{p}_firewall_resyncs", "Firewall rule sets found changed and installed again.", registry=r
        )
        self._probe_reachable: Gauge | None = None  # registered by the first probe round only
        self._peer_reachable: Gauge | None = None  # only with --probe-per-peer (one series per peer)
        self._peer_labels: set[str] = set()
        for label in ("ok", "error"):
            self._passes.labels(label)
        for kind in ("route", "neigh", "fdb"):
            self._drift.labels(kind)
            self._kernel_entries.labels(kind)
        for op in ("add", "remove"):
            self._plan_changes.labels(op)
        self._store_up.set(0)
        r.register(_Scraped(self))

    # -- recording: call these from the daemon ---------------------------------------------------

    def pass_done(self, duration: float, added: int, removed: int) -> None:
        """A successful reconcile pass that took *duration* seconds and changed this much."""
        self._passes.labels("ok").inc()
        self._pass_seconds.observe(duration)
        self._plan_size.observe(added + removed)
        self._plan_changes.labels("add").inc(added)
        self._plan_changes.labels("remove").inc(removed)
        self._last_pass.set_to_current_time()

    def pass_failed(self) -> None:
        self._passes.labels("error").inc()

    def drift_repaired(self, objects: Iterable[object]) -> None:
        """Count *objects* (kernel objects put back) by kind."""
        for kind, n in Tally(kind_of(obj) for obj in objects).items():
            self._drift.labels(kind).inc(n)

    def peers(self, known: int, programmed: int, skipped_reasons: Iterable[str]) -> None:
        """Peer counts of the last pass; *skipped_reasons* are the reasons' texts (one per lease)."""
        self._peers_known.set(known)
        self._peers_programmed.set(programmed)
        tally = Tally(skip_reason(text) for text in skipped_reasons)
        with self._lock:
            for label in (*(label for label, _ in SKIP_REASONS), "other"):
                self._peers_skipped.labels(label).set(tally.get(label, 0))

    def kernel_entries(self, objects: Iterable[object]) -> None:
        """The kernel objects overlayd owns now (the actual state read by a pass, or a cache's)."""
        self.kernel_entry_counts(Tally(kind_of(obj) for obj in objects))

    def kernel_entry_counts(self, tally: Mapping[str, int]) -> None:
        """The same from counts by kind (the cached loop keeps them up to date by difference)."""
        for kind in ("route", "neigh", "fdb", *tally):
            self._kernel_entries.labels(kind).set(tally.get(kind, 0))

    def error(self, exc: BaseException) -> None:
        self._errors.labels(error_kind(exc)).inc()

    def store_up(self, up: bool) -> None:
        self._store_up.set(1 if up else 0)

    def relisted(self) -> None:
        self._relists.inc()

    def watch_restarted(self) -> None:
        self._watch_restarts.inc()

    def firewall_resync(self) -> None:
        self._firewall_resyncs.inc()

    def lease(self, expiration: datetime | None) -> None:
        """This host's lease now expires at *expiration* (None: a reservation, never)."""
        self._expiration, self._has_lease = expiration, True

    def peers_reachable(self, n: int) -> None:
        """Peers that answered the last periodic probe (``--probe-interval``); the gauge exists
        only once probing runs, so an absent figure never reads as "none reachable"."""
        with self._lock:
            if self._probe_reachable is None:
                self._probe_reachable = Gauge(
                    f"{PREFIX}_peers_reachable",
                    "Peers answering the last periodic overlay probe (--probe-interval).",
                    registry=self.registry,
                )
        self._probe_reachable.set(n)

    def peer_reachable(self, answers: Mapping[str, bool]) -> None:
        """Per peer (its subnet as the label): 1 when it answered the last probe.  Opt-in
        (``--probe-per-peer``) because the labels grow with the cluster; departed peers' series
        are removed."""
        with self._lock:
            if self._peer_reachable is None:
                self._peer_reachable = Gauge(
                    f"{PREFIX}_peer_reachable",
                    "1 when the peer (by subnet) answered the last overlay probe (--probe-per-peer).",
                    ["peer"],
                    registry=self.registry,
                )
            for gone in self._peer_labels - set(answers):
                self._peer_reachable.remove(gone)
            for peer, ok in answers.items():
                self._peer_reachable.labels(peer).set(1 if ok else 0)
            self._peer_labels = set(answers)

    # -- reading --------------------------------------------------------------------------------

    def lease_expiry_seconds(self) -> float | None:
        if not self._has_lease:
            return None
        if self._expiration is None:
            return math.inf
        return (self._expiration - datetime.now(UTC)).total_seconds()

    def forwarder_counters(self) -> dict[str, float]:
        if self.counters_source is None:
            return {}
        try:
            raw = self.counters_source()
        except Exception:  # a scrape must never fail because the backend is stopping
            return {}
        out = {}
        for name, value in raw.items():
            if _COUNTER_NAME.match(name) and isinstance(value, int | float) and not isinstance(value, bool):
                out[name.removesuffix("_total")] = float(value)
        return out

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)


def _version() -> str:
    try:
        return importlib.metadata.version("overlayd")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def drifted(previous_desired: frozenset[Any] | None, add: Iterable[Any], removals: Iterable[Any]) -> list[Any]:
    """The part of a plan that repairs drift rather than following a lease change (pure).

    An object to add that was already desired at the previous pass was in the kernel after that
    pass's apply, so someone deleted or changed it; an object to remove whose slot was not desired
    either is a stray object in our space (our route protocol, our device).  Nothing counts on the
    first pass (*previous_desired* None): the kernel then holds what an earlier run left.
    """
    if previous_desired is None:
        return []
    wanted_slots = {obj.key for obj in previous_desired}
    out = [obj for obj in add if obj in previous_desired]
    out.extend(obj for obj in removals if obj.key not in wanted_slots)
    return out
