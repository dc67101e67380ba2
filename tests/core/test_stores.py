"""Every store of the fold gives the usages `fold_events` gives, whatever the stream.

Parametrized over the stores, as state stores are tested over every backend: the core's
`MemoryStore`, and the projector's `DuckDBStore` fed the way the projector feeds it
(records decoded by its Decoder, each batch begun, its new rows folded into the in-memory
mirror with `with_rows`, then finished), whose SQL sums and labels must agree with the
core's rule. Streams hold copies of event ids (with other contents: the first wins),
labels, times out of order across a month end and DST changes, and arbitrary batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import pairwise
from typing import Protocol

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.config.models import PerUserBudgets, ResetSchedule
from tally.core.usage import MemoryStore, Offsets, UserUsage, fold_events
from tally.kafka import Record
from tally.services.projector import store
from tally.services.projector.decode import Decoder
from tally.wire import UsageRecorded

from .corekit import budgets, event_lists

TOPIC = "t.usage.events"


class Store(Protocol):
    """A store under test: it takes UsageRecorded events, whatever its own batches are."""

    def apply(self, events: list[UsageRecorded], offsets: Offsets) -> set[str]: ...
    def load_offsets(self) -> dict[tuple[str, int], int]: ...
    def load_usages(self) -> dict[str, UserUsage]: ...


class Memory:
    def __init__(self, config: PerUserBudgets) -> None:
        self.store = MemoryStore(config)
        self.load_offsets, self.load_usages = self.store.load_offsets, self.store.load_usages

    def apply(self, events: list[UsageRecorded], offsets: Offsets) -> set[str]:
        return self.store.apply(events, offsets)


class DuckDB:
    """The projector's path: decode, begin, fold the mirror, finish; the mirror is checked
    against what a restart would load from the file."""

    def __init__(self, config: PerUserBudgets) -> None:
        self.store = store.DuckDBStore(store.connect(":memory:"))
        self.decoder = Decoder.of(config)
        self.mirror: dict[str, UserUsage] = {}
        self.next_offset = 0

    def apply(self, events: list[UsageRecorded], offsets: Offsets) -> set[str]:
        records = [Record(TOPIC, 0, self.next_offset + i, None, e.model_dump_json().encode(), 0)
                   for i, e in enumerate(events)]
        self.next_offset += len(events)
        table, skipped = self.decoder.events(records)
        assert not skipped
        applied = self.store.begin(table)
        self.mirror.update(store.with_rows(self.mirror, applied.new))
        self.store.finish(applied, offsets)
        return applied.users

    def load_offsets(self) -> dict[tuple[str, int], int]:
        return self.store.load_offsets()

    def load_usages(self) -> dict[str, UserUsage]:
        stored = self.store.load_usages()
        assert stored == self.mirror  # a restart's mirror is the live one
        return stored


STORES: dict[str, Callable[[PerUserBudgets], Store]] = {"memory": Memory, "duckdb": DuckDB}
SCHEDULES = [
    ResetSchedule(timezone="Europe/Berlin", monthly_reset_day=31),
    ResetSchedule(timezone="America/New_York", daily_reset_time="02:30", monthly_reset_day=15),
]
COUNTED = [("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"),
           ("output_tokens",)]
configs = st.builds(lambda schedule, counted: budgets(reset_schedule=schedule,
                                                      counted_tokens=counted),
                    st.sampled_from(SCHEDULES), st.sampled_from(COUNTED))


def batches(events: list[UsageRecorded], cuts: Iterable[int]) -> list[list[UsageRecorded]]:
    edges = sorted({0, len(events), *(c % (len(events) + 1) for c in cuts)})
    return [events[a:b] for a, b in pairwise(edges)]


def applied(make: Callable[[PerUserBudgets], Store], config: PerUserBudgets,
            parts: list[list[UsageRecorded]]) -> Store:
    under_test, end = make(config), 0
    for part in parts:
        end += len(part)
        changed = under_test.apply(part, {(TOPIC, 0): end})
        assert changed <= {e.user_id for e in part}
    return under_test


@pytest.mark.parametrize("make", STORES.values(), ids=STORES.keys())
@settings(max_examples=40, deadline=None)
@given(event_lists(ids=12), st.lists(st.integers(0, 30), max_size=4), configs)
def test_a_store_equals_the_fold(make: Callable[[PerUserBudgets], Store],
                                 events: list[UsageRecorded], cuts: list[int],
                                 config: PerUserBudgets) -> None:
    """Copies of an id with other contents included: the first in the stream wins."""
    under_test = applied(make, config, batches(events, cuts))
    assert under_test.load_usages() == fold_events(events, config)
    assert under_test.load_offsets() == ({(TOPIC, 0): len(events)} if events else {})


@pytest.mark.parametrize("make", STORES.values(), ids=STORES.keys())
@settings(max_examples=30, deadline=None)
@given(event_lists(), st.data(), configs)
def test_a_store_is_independent_of_order_copies_and_batches(
        make: Callable[[PerUserBudgets], Store], events: list[UsageRecorded],
        data: st.DataObject, config: PerUserBudgets) -> None:
    repeats = data.draw(st.lists(st.sampled_from(events), max_size=10)) if events else []
    replayed = data.draw(st.permutations(events + repeats + events))
    cuts = data.draw(st.lists(st.integers(0, 70), max_size=4))
    under_test = applied(make, config, batches(replayed, cuts))
    assert under_test.load_usages() == fold_events(events, config)
