"""The lease cache: the store's leases kept in memory from one listing plus the watch events after it.

This is client-go's *informer* (list, then watch from the listed revision) in the daemon's
single-threaded style: no thread of its own, the daemon's loop calls :meth:`LeaseCache.poll`, which
blocks in the store's ``wait_for_events`` for at most the given timeout and applies what arrives.
A pass of the reconciler then reads :attr:`LeaseCache.leases` (never the store) and asks
:meth:`LeaseCache.take_changes` which keys changed since it last asked, so it diffs only those.

When the cache lists again (and why):

* **lost history** (``HistoryGone``: etcd compacted, the embedded store trimmed its event log):
  the events in between are gone, only a listing can tell what changed;
* **after the store was unreachable** (``StoreUnavailable``): the watch may have missed a
  compaction, and a listing is the one answer that is right whatever happened meanwhile
  (client-go re-lists on a broken watch for the same reason);
* **a slow periodic audit** (``audit_period``, minutes): a bug or a skipped event (a store skips a
  garbled value on the watch but drops it from a listing) never outlives one period.

A re-list does not reset what the consumer sees: the keys whose lease differs between the old and
the new snapshot are added to the changed set, so after a re-list a pass still diffs only what
changed.  Our own writes (renewals) come back as events like anyone else's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType

from .errors import HistoryGone, StoreUnavailable
from .model import EventKind, Lease, LeaseList, subnet_to_key
from .plugin import Store

log = logging.getLogger(__name__)

#: How often the cache lists the store even when the watch says nothing happened.
DEFAULT_AUDIT_PERIOD = 300.0


class NetworkConfigMissing(StoreUnavailable):
    """The store answers but holds no network config: its data was lost; not a desired state."""


class LeaseCache:
    """Every lease in the store, by key, at :attr:`revision`; kept current by :meth:`poll`."""

    def __init__(
        self,
        store: Store,
        *,
        audit_period: float = DEFAULT_AUDIT_PERIOD,
        clock: Callable[[], float] = time.monotonic,
        require_config: bool = False,
        hold_after_reset: float = 0.0,
    ) -> None:
        self._store = store
        self.require_config = require_config
        self.hold_after_reset = hold_after_reset
        self._reset = False  # the config was seen missing since the last trusted listing
        self._held: dict[str, Lease] = {}  # leases kept through a store reset (see the module note)
        self._hold_until = float("inf")
        self._clock = clock
        self.audit_period = audit_period
        self._leases: dict[str, Lease] = {}
        self._changed: set[str] = set()
        self._revision = 0
        self._listed_at: float | None = None  # None: must list before anything else
        #: How many listings were taken (the first one included); for logs, tests and benches.
        self.listings = 0

    # -- what a pass reads ----------------------------------------------------------------------

    @property
    def leases(self) -> Mapping[str, Lease]:
        """key -> lease, read-only; valid as of :attr:`revision`."""
        return MappingProxyType(self._leases)

    @property
    def revision(self) -> int:
        return self._revision

    @property
    def synced(self) -> bool:
        """True once a listing succeeded and no re-list is pending."""
        return self._listed_at is not None

    def snapshot(self) -> LeaseList:
        """The cache as a ``LeaseList`` (what ``Store.list_leases`` would have returned)."""
        return LeaseList(tuple(self._leases[k] for k in sorted(self._leases)), self._revision)

    @property
    def held(self) -> frozenset[str]:
        """Keys kept in :attr:`leases` through a store reset although the store lacks them."""
        return frozenset(self._held)

    def take_changes(self) -> frozenset[str]:
        """Keys whose lease was added, changed or removed since the last call (then forgets them)."""
        changed, self._changed = frozenset(self._changed), set()
        return changed

    # -- keeping it current ---------------------------------------------------------------------

    def invalidate(self) -> None:
        """List again at the next :meth:`poll` (e.g. after the store connection was replaced)."""
        self._listed_at = None

    def audit_due(self) -> bool:
        return self._listed_at is None or self._clock() - self._listed_at >= self.audit_period

    def relist(self) -> bool:
        """List the store now and record what differs from the cache; True when something did."""
        expired = self._expire_held()
        if self.require_config and self._store.get_config() is None:
            if not self._reset:
                log.warning(
                    "the store holds no network config (its data was lost?): keeping the %d known leases "
                    "and the datapath until the config is back",
                    len(self._leases),
                )
            self._reset = True
            raise NetworkConfigMissing("the store holds no network config; put it back (overlayd network init)")
        snapshot = self._store.list_leases()
        fresh = {lease.key: lease for lease in snapshot.leases}
        reset = self._reset or (self.listings > 0 and snapshot.revision < self._revision)
        self._reset = False
        if reset and self.hold_after_reset > 0:
            gone = {key: self._leases[key] for key in self._leases.keys() - fresh.keys()}
            self._held.update(gone)
            self._hold_until = self._clock() + self.hold_after_reset
            log.warning(
                "the store was reset (revision %d, was %d): holding %d leases it lacks for up to %g s "
                "while their hosts re-create them",
                snapshot.revision,
                self._revision,
                len(gone),
                self.hold_after_reset,
            )
        held = self._still_held(fresh)
        fresh.update(held)
        before = len(self._changed)
        if reset:  # revisions of two stores are not comparable: every listed lease may be new
            self._changed.update(fresh.keys() - held.keys())
        for key in self._leases.keys() - fresh.keys():
            self._changed.add(key)
        for key, lease in fresh.items():
            if not _same(self._leases.get(key), lease):
                self._changed.add(key)
        changed = len(self._changed) != before
        self._leases = fresh
        self._revision = snapshot.revision
        self._listed_at = self._clock()
        self.listings += 1
        log.debug("listed %d leases at revision %d", len(fresh), snapshot.revision)
        return changed or expired

    def poll(self, timeout: float) -> bool:
        """Bring the cache up to date, waiting up to *timeout* seconds for the next change.

        Lists when no listing is current (first call, after ``HistoryGone`` or ``StoreUnavailable``)
        or the audit is due; otherwise waits for events after :attr:`revision` and applies them.
        Returns True when the cache changed.  ``StoreUnavailable`` propagates (the caller backs
        off) and leaves the cache as it was, marked to re-list on the next call.
        """
        try:
            if self.audit_due():
                return self.relist()
            try:
                result = self._store.wait_for_events(self._revision, timeout)
            except HistoryGone:
                log.info("store history after revision %d is gone; listing again", self._revision)
                return self.relist()
        except StoreUnavailable:
            self._listed_at = None
            raise
        changed = self._expire_held()
        for event in result.events:
            key = subnet_to_key(event.subnet)
            if event.kind is EventKind.ADDED and event.lease is not None:
                if self._held:
                    self._drop_held_like(key, event.lease)
                if not _same(self._leases.get(key), event.lease):
                    self._leases[key] = event.lease
                    self._changed.add(key)
                    changed = True
            else:
                self._held.pop(key, None)
                if self._leases.pop(key, None) is not None:
                    self._changed.add(key)
                    changed = True
        self._revision = max(self._revision, result.revision)
        return changed

    # -- leases held through a store reset ------------------------------------------------------

    def _still_held(self, fresh: Mapping[str, Lease]) -> dict[str, Lease]:
        """The held leases a listing *fresh* does not replace (by key or by public IP)."""
        ips = {lease.attrs.public_ip for lease in fresh.values()}
        self._held = {k: v for k, v in self._held.items() if k not in fresh and v.attrs.public_ip not in ips}
        return dict(self._held)

    def _drop_held_like(self, key: str, lease: Lease) -> None:
        for other in [k for k, v in self._held.items() if k == key or v.attrs.public_ip == lease.attrs.public_ip]:
            del self._held[other]
            if other != key and self._leases.pop(other, None) is not None:
                self._changed.add(other)

    def _expire_held(self) -> bool:
        if not self._held or self._clock() < self._hold_until:
            return False
        log.warning(
            "%d leases did not come back within %g s of the store reset; their peers are removed",
            len(self._held),
            self.hold_after_reset,
        )
        for key in self._held:
            if self._leases.pop(key, None) is not None:
                self._changed.add(key)
        self._held = {}
        return True


def _same(old: Lease | None, new: Lease) -> bool:
    """One stored version of a lease?  By revision when the store gives one: a listing recomputes
    ``expiration`` from the remaining TTL (etcd), which would make every lease look changed."""
    if old is None:
        return False
    if old.revision and new.revision:
        return old.revision == new.revision
    return old == new
