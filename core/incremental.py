"""Incremental planning: diff only the kernel slots a change can have touched.

The reconciler's plan used to be ``plan.diff(desired_state(all peers), actual_state())`` on every
pass: correct, but proportional to the cluster.  Here the desired state is kept per peer and per
slot (a :class:`DesiredIndex`); when a lease changes, only that peer's objects are recomputed, and
the plan is the diff of desired versus actual **restricted to the slots that changed** — those
the changed peers occupied before or occupy now (from the lease cache), plus those the
kernel-state cache saw change (drift).  :func:`full_plan` stays the audit: the whole diff, run
rarely, and by construction the same answer (the property test in tests/test_incremental.py
checks that over random event sequences).

Contested slots: two peers may want one slot (two leases with the same VtepMAC want one FDB
slot).  The peer with the smallest key wins, which is the vxlan backend's rule ("first lease by
key wins": it walks leases sorted by key and keeps the first object per slot); when the winner
goes, the next claimant's object becomes desired, and that slot counts as touched.

The per-peer objects come from the backend's own pure ``desired_state(own, [lease])``, so no
backend needs new code as long as a peer's objects do not depend on the *other* peers — true of
vxlan and of any "one route per peer" backend.  A change that alters every peer's objects (our
own lease's subnet, the underlay's connected networks for DirectRouting) is a
:meth:`DesiredIndex.rebuild`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import Generic, Protocol, TypeVar

from .plan import Plan, Slotted, diff

T = TypeVar("T", bound=Slotted)
T_co = TypeVar("T_co", bound=Slotted, covariant=True)
Slot = Hashable


class SlotSource(Protocol[T_co]):
    """What the incremental diff reads from the actual state (``KernelCache`` provides it)."""

    def objects(self) -> frozenset[T_co]: ...

    def objects_in(self, slots: Iterable[Slot]) -> frozenset[T_co]: ...


class DesiredIndex(Generic[T]):
    """Desired kernel objects, per peer (lease key) and per slot."""

    def __init__(self) -> None:
        self._by_peer: dict[str, frozenset[T]] = {}
        self._claims: dict[Slot, dict[str, T]] = {}

    def __len__(self) -> int:
        return len(self._by_peer)

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(self._by_peer)

    def set_peer(self, peer: str, objects: Iterable[T]) -> frozenset[Slot]:
        """Record what *peer* wants now (nothing: forget it); returns the slots this touches."""
        new = frozenset(objects)
        old = self._by_peer.get(peer, frozenset())
        if new == old:
            return frozenset()
        for obj in old:
            claims = self._claims[obj.key]
            del claims[peer]
            if not claims:
                del self._claims[obj.key]
        for obj in new:
            self._claims.setdefault(obj.key, {})[peer] = obj
        if new:
            self._by_peer[peer] = new
        else:
            self._by_peer.pop(peer, None)
        return frozenset(obj.key for obj in old | new)

    def drop_peer(self, peer: str) -> frozenset[Slot]:
        return self.set_peer(peer, ())

    def rebuild(self, by_peer: Mapping[str, Iterable[T]]) -> frozenset[Slot]:
        """Replace everything; returns the slots whose desired content differs from before."""
        before = {slot: self._winner(slot) for slot in self._claims}
        self._by_peer, self._claims = {}, {}
        for peer, objects in by_peer.items():
            self.set_peer(peer, objects)
        slots = before.keys() | self._claims.keys()
        return frozenset(slot for slot in slots if before.get(slot) != self._winner(slot))

    def _winner(self, slot: Slot) -> T | None:
        claims = self._claims.get(slot)
        return claims[min(claims)] if claims else None

    def objects_in(self, slots: Iterable[Slot]) -> frozenset[T]:
        """The desired occupant of each of *slots* that has one."""
        out = []
        for slot in slots:
            winner = self._winner(slot)
            if winner is not None:
                out.append(winner)
        return frozenset(out)

    def objects(self) -> frozenset[T]:
        """The whole desired state (what ``Network.desired_state(own, peers)`` returns)."""
        return self.objects_in(self._claims)


def incremental_plan(desired: DesiredIndex[T], actual: SlotSource[T], slots: Iterable[Slot]) -> Plan[T]:
    """The plan for *slots* only: their desired occupants versus what the kernel holds there."""
    slots = frozenset(slots)
    return diff(desired.objects_in(slots), actual.objects_in(slots))


def full_plan(desired: DesiredIndex[T], actual: SlotSource[T]) -> Plan[T]:
    """The audit: the whole desired state versus the whole actual state."""
    return diff(desired.objects(), actual.objects())


class ChangeSource(SlotSource[T_co], Protocol[T_co]):
    """A ``SlotSource`` that also reports which slots changed (``KernelCache``)."""

    def take_changes(self) -> frozenset[Slot]: ...


class Reconciler(Generic[T]):
    """Incremental passes over a desired index and a kernel-state cache; the full diff on demand.

    The daemon tells it which peers changed (:meth:`set_peers`) and calls :meth:`run`; a pass
    diffs the slots those peers touched plus the slots the cache saw change, and applies the
    plan with *apply* (``Network.apply``).  Slots stay pending when *apply* raises, so the next
    pass retries them.  The kernel echoes our own changes back to the cache; the pass after an
    apply re-checks those slots and finds nothing to do.
    """

    def __init__(self, actual: ChangeSource[T], apply: Callable[[Plan[T]], None]) -> None:
        self.desired: DesiredIndex[T] = DesiredIndex()
        self._actual = actual
        self._apply = apply
        self._pending: set[Slot] = set()

    def set_peers(self, objects: Mapping[str, Iterable[T]]) -> frozenset[Slot]:
        """What each changed peer wants now (an empty iterable for a peer that is gone or invalid);
        returns the slots whose desired content this may have changed."""
        touched: set[Slot] = set()
        for peer, objs in objects.items():
            touched |= self.desired.set_peer(peer, objs)
        self._pending |= touched
        return frozenset(touched)

    def rebuild(self, objects: Mapping[str, Iterable[T]]) -> None:
        """Every peer's objects afresh (our own lease or the host changed): touched = what differs."""
        self._pending |= self.desired.rebuild(objects)

    def run(self, *, full: bool = False) -> Plan[T]:
        """One pass: the pending and drifted slots (every slot when *full*); returns what was applied."""
        self._pending |= self._actual.take_changes()
        change = (
            full_plan(self.desired, self._actual)
            if full
            else incremental_plan(self.desired, self._actual, self._pending)
        )
        if not change.empty:
            self._apply(change)
        self._pending.clear()
        return change


class SlotSet(Generic[T]):
    """A plain set of kernel objects with the ``SlotSource`` interface (tests, offline planning)."""

    def __init__(self, objects: Iterable[T] = ()) -> None:
        self._slots: dict[Slot, set[T]] = {}
        for obj in objects:
            self._slots.setdefault(obj.key, set()).add(obj)

    def objects(self) -> frozenset[T]:
        return frozenset(obj for objs in self._slots.values() for obj in objs)

    def objects_in(self, slots: Iterable[Slot]) -> frozenset[T]:
        return frozenset(obj for slot in slots for obj in self._slots.get(slot, ()))
