"""The pure desired-vs-actual diff, property-tested."""

from __future__ import annotations

import attrs
from hypothesis import given
from hypothesis import strategies as st
from overlayd.plan import Plan, diff, simulate


@attrs.frozen
class Slot:
    slot: int
    value: int

    @property
    def key(self) -> int:
        return self.slot


def states() -> st.SearchStrategy[frozenset[Slot]]:
    """Kernel-like states: at most one object per slot."""
    return st.dictionaries(st.integers(0, 20), st.integers(0, 3), max_size=15).map(
        lambda d: frozenset(Slot(k, v) for k, v in d.items())
    )


@given(states(), states())
def test_applying_the_plan_yields_desired(desired: frozenset[Slot], actual: frozenset[Slot]) -> None:
    plan = diff(desired, actual)
    assert simulate(actual, plan) == desired


@given(states(), states())
def test_second_plan_is_empty(desired: frozenset[Slot], actual: frozenset[Slot]) -> None:
    after = simulate(actual, diff(desired, actual))
    assert diff(desired, after).empty


@given(states(), states())
def test_replacements_are_not_deleted_first(desired: frozenset[Slot], actual: frozenset[Slot]) -> None:
    plan = diff(desired, actual)
    refilled = {obj.key for obj in plan.add}
    assert all(obj.key not in refilled for obj in plan.removals())
    assert plan.removals() <= plan.remove


def test_no_change_is_an_empty_plan() -> None:
    state = frozenset({Slot(1, 1)})
    assert diff(state, state) == Plan()
    assert len(diff(state, frozenset())) == 1
