"""Desired versus actual: the pure diff at the heart of the reconciler.

State is a frozenset of frozen, hashable kernel objects (routes, neighbours, FDB entries...).
Each object has a ``key`` naming the kernel slot it occupies (a route's destination, a
neighbour's address): when desired and actual disagree on a slot, the plan *replaces* it
rather than deleting first, so traffic never sees a gap.  :func:`simulate` computes what
applying a plan yields (no IO; :func:`overlayd.netlink.apply_plan` is the real thing); property
tests check that it always yields the desired state and that a second diff is empty.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, Protocol, TypeVar

import attrs


class Slotted(Protocol, Hashable):
    """Anything a plan can hold: hashable, with the key of the slot it occupies."""

    @property
    def key(self) -> Hashable:
        """The kernel slot this object occupies; two objects with one key cannot coexist."""


T = TypeVar("T", bound=Slotted)


@attrs.frozen
class Plan(Generic[T]):
    """Objects to add (or replace in place) and objects to remove."""

    add: frozenset[T] = frozenset()
    remove: frozenset[T] = frozenset()

    @property
    def empty(self) -> bool:
        return not self.add and not self.remove

    def removals(self) -> frozenset[T]:
        """Objects to delete outright: those whose slot is not refilled by an addition."""
        refilled = {obj.key for obj in self.add}
        return frozenset(obj for obj in self.remove if obj.key not in refilled)

    def __len__(self) -> int:
        return len(self.add) + len(self.remove)


def diff(desired: frozenset[T], actual: frozenset[T]) -> Plan[T]:
    """The plan that turns *actual* into *desired*."""
    return Plan(add=desired - actual, remove=actual - desired)


def simulate(actual: frozenset[T], plan: Plan[T]) -> frozenset[T]:
    """What *actual* becomes after applying the plan (pure): additions replace whatever holds their slot."""
    slots = {obj.key: obj for obj in actual if obj not in plan.remove}
    for obj in plan.add:
        slots[obj.key] = obj
    return frozenset(slots.values())
