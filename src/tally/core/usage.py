"""A user's usage per period, as a fold over UsageRecorded events.

The fold rule, stated once. Every store applies it: `fold_events` and `MemoryStore` here,
the projector's DuckDB store (its mirror through `Fold`, its balances and labels in SQL),
and tests/core/test_stores.py checks each store against `fold_events` on random streams.

1. An event counts once: the first with a given event_id wins, later copies are skipped.
2. Its counted tokens (budgets.yaml `counted_tokens`) are added to every period holding
   its `occurred_at`, one per period kind (`Calendar.windows_at`), keyed by the window's
   kind and start (UTC).
3. `last_event_at` is the latest `occurred_at` (UTC).
4. Each label (role, department, project) is the value stated by the latest event that
   states it, ordered by (occurred_at, event_id).

Sums and maxima commute, so the result depends neither on the order of the events nor on
how they are cut into batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Protocol, TypeVar

from tally.config.models import PerUserBudgets, TokenField
from tally.core.periods import Calendar, calendar_for
from tally.wire import PERIOD_NAMES, BalanceUpdated, PeriodName, UsageRecorded

__all__ = [
    "LABELS",
    "Fold",
    "MemoryStore",
    "Offsets",
    "PeriodUsage",
    "Periods",
    "Stamped",
    "UsageStore",
    "UserUsage",
    "counted_tokens",
    "fold_events",
    "from_balance",
    "to_balance",
    "with_labels",
]

LABELS = ("role", "department", "project")
Periods = Mapping[PeriodName, Mapping[datetime, int]]  # kind -> window start (UTC) -> tokens
Offsets = Mapping[tuple[str, int], int]  # (topic, partition) -> next offset to read


class PeriodUsage(Protocol):
    """Anything with tokens used per period kind and start: a user or a group."""

    @property
    def periods(self) -> Periods: ...


@dataclass(frozen=True, slots=True, order=True)
class Stamped:
    """A label's value and the (occurred_at, event_id) of the event that stated it."""

    at: datetime
    event_id: str
    value: str


@dataclass(frozen=True, slots=True)
class UserUsage:
    """Tokens used per period kind and start (UTC), for one user. Treat the mappings as
    read-only."""

    user_id: str
    periods: Periods = field(default_factory=dict)
    last_event_at: datetime | None = None
    labels: Mapping[str, Stamped] = field(default_factory=dict)

    @property
    def role(self) -> str | None:
        return self._label("role")

    @property
    def department(self) -> str | None:
        return self._label("department")

    @property
    def project(self) -> str | None:
        return self._label("project")

    def _label(self, name: str) -> str | None:
        stamped = self.labels.get(name)
        return None if stamped is None else stamped.value

    def used(self, kind: PeriodName, start: datetime) -> int:
        return self.periods.get(kind, {}).get(start, 0)


def counted_tokens(event: UsageRecorded, fields: Iterable[TokenField]) -> int:
    """The tokens of an event that count against budgets."""
    return sum(getattr(event, name) for name in fields)


class Fold:
    """The fold rule (rules 2-4 of the module doc) over many users: start from `initial`,
    `add` events, read the users they changed with `changed`. Mutable; the usages it
    returns are new objects, `initial` is left as it was."""

    def __init__(self, initial: Mapping[str, UserUsage] | None = None) -> None:
        self._initial = initial or {}
        self._users: dict[str, _Builder] = {}

    def add(self, user_id: str, event_id: str, at: datetime, tokens: int,
            starts: Iterable[tuple[PeriodName, datetime]],
            labels: Iterable[tuple[str, str | None]]) -> None:
        """One event, already reduced to what the rule reads: `at` in UTC, its counted
        tokens, the (kind, start) of each period holding it, its (label, value) pairs."""
        builder = self._users.get(user_id)
        if builder is None:
            prior = self._initial.get(user_id) or UserUsage(user_id)
            builder = self._users[user_id] = _Builder(prior)
        builder.add(at, event_id, tokens, starts, labels)

    def add_event(self, event: UsageRecorded, calendar: Calendar,
                  fields: Iterable[TokenField]) -> None:
        self.add(event.user_id, event.event_id, event.occurred_at.astimezone(UTC),
                 counted_tokens(event, fields),
                 [(window.kind, window.start) for window in calendar.windows_at(event.occurred_at)],
                 [(name, getattr(event, name)) for name in LABELS])

    def add_new(self, events: Iterable[UsageRecorded], calendar: Calendar,
                fields: Iterable[TokenField], seen: set[str]) -> None:
        """Rule 1: each event whose event_id is not in `seen` (which is updated in place)."""
        fields = tuple(fields)
        for event in events:
            if event.event_id not in seen:
                seen.add(event.event_id)
                self.add_event(event, calendar, fields)

    def changed(self) -> dict[str, UserUsage]:
        """The usage of every user an added event belongs to."""
        return {user_id: builder.build() for user_id, builder in self._users.items()}


def fold_events(
    events: Iterable[UsageRecorded],
    budgets: PerUserBudgets,
    initial: Mapping[str, UserUsage] | None = None,
    seen: set[str] | None = None,
) -> dict[str, UserUsage]:
    """Fold events into per-user usage, skipping any event_id already in `seen`.

    `seen` is updated in place when given, so a caller can fold batch after batch.
    The first event with a given event_id wins.
    """
    fold = Fold(initial)
    fold.add_new(events, calendar_for(budgets.reset_schedule), budgets.counted_tokens,
                 set() if seen is None else seen)
    return {**(initial or {}), **fold.changed()}


class _Builder:
    """The mutable side of one user's fold, frozen again by build()."""

    __slots__ = ("labels", "last_event_at", "periods", "user_id")

    def __init__(self, usage: UserUsage) -> None:
        self.user_id = usage.user_id
        self.periods = {kind: dict(totals) for kind, totals in usage.periods.items()}
        self.last_event_at = usage.last_event_at
        self.labels = dict(usage.labels)

    def add(self, at: datetime, event_id: str, tokens: int,
            starts: Iterable[tuple[PeriodName, datetime]],
            labels: Iterable[tuple[str, str | None]]) -> None:
        for kind, start in starts:
            totals = self.periods.get(kind)
            if totals is None:
                totals = self.periods[kind] = {}
            totals[start] = totals.get(start, 0) + tokens
        if self.last_event_at is None or at > self.last_event_at:
            self.last_event_at = at
        for name, value in labels:
            if value is not None:
                stamped = Stamped(at, event_id, value)
                current = self.labels.get(name)
                if current is None or stamped > current:
                    self.labels[name] = stamped

    def build(self) -> UserUsage:
        return UserUsage(self.user_id, self.periods, self.last_event_at, self.labels)


# stores ------------------------------------------------------------------------------------

Batch = TypeVar("Batch", contravariant=True)


class UsageStore(Protocol[Batch]):
    """Where the fold's results live: in memory (`MemoryStore`: `tally simulate`, the
    benchmarks' baselines) or in DuckDB (the projector's `DuckDBStore`, which takes decoded
    ledger rows). Both give the usages `fold_events` gives for the same events."""

    def apply(self, batch: Batch, offsets: Offsets) -> set[str]:
        """Fold the batch's events not seen before and store `offsets` with them, all or
        nothing; the users whose usage changed."""
        ...

    def load_offsets(self) -> dict[tuple[str, int], int]:
        """The offsets stored with the last batch of each (topic, partition)."""
        ...

    def load_usages(self) -> dict[str, UserUsage]:
        """Every user's usage as stored."""
        ...


class MemoryStore:
    """The fold in memory, over UsageRecorded events. A validated event cannot fail the
    fold halfway, so a batch is applied whole."""

    def __init__(self, budgets: PerUserBudgets) -> None:
        self._calendar = calendar_for(budgets.reset_schedule)
        self._fields = budgets.counted_tokens
        self._usages: dict[str, UserUsage] = {}
        self._seen: set[str] = set()
        self._offsets: dict[tuple[str, int], int] = {}

    def apply(self, batch: Iterable[UsageRecorded], offsets: Offsets) -> set[str]:
        fold = Fold(self._usages)
        fold.add_new(batch, self._calendar, self._fields, self._seen)
        changed = fold.changed()
        self._usages.update(changed)
        self._offsets.update(offsets)
        return set(changed)

    def load_offsets(self) -> dict[tuple[str, int], int]:
        return dict(self._offsets)

    def load_usages(self) -> dict[str, UserUsage]:
        return dict(self._usages)


def _is_a_usage_store(memory: MemoryStore) -> UsageStore[Iterable[UsageRecorded]]:
    return memory  # for mypy: MemoryStore keeps to the interface


# the wire ----------------------------------------------------------------------------------


def to_balance(usage: UserUsage, as_of: datetime,
               source: tuple[int, int] | None = None) -> BalanceUpdated:
    """The wire form of a user's usage: period starts as ISO 8601 UTC strings. `source`:
    the usage.events (partition, next offset) the usage was folded up to, which orders
    the balances of one user sent by different projector instances."""
    if usage.last_event_at is None:
        raise ValueError(f"user {usage.user_id!r} has no usage to publish")
    return BalanceUpdated(
        user_id=usage.user_id,
        role=usage.role,
        department=usage.department,
        project=usage.project,
        periods={kind: _encode(usage.periods.get(kind, {})) for kind in PERIOD_NAMES},
        last_event_at=usage.last_event_at,
        as_of=as_of,
        source_partition=source[0] if source else None,
        source_offset=source[1] if source else None,
    )


def from_balance(balance: BalanceUpdated) -> UserUsage:
    """Back from the wire; labels count as stated at last_event_at (later events win)."""
    at = balance.last_event_at.astimezone(UTC)
    labels = {
        name: Stamped(at, "", value)
        for name in LABELS
        if (value := getattr(balance, name)) is not None
    }
    return UserUsage(
        user_id=balance.user_id,
        periods={kind: _decode(totals) for kind, totals in balance.periods.items() if totals},
        last_event_at=at,
        labels=labels,
    )


def with_labels(usage: UserUsage, **values: str | None) -> UserUsage:
    """Usage whose labels are set (e.g. from users.yaml), stamped as authoritative; None
    removes one: a label users.yaml leaves empty is not taken from the events."""
    labels = dict(usage.labels)
    for name, value in values.items():
        if value is None:
            labels.pop(name, None)
        else:
            labels[name] = Stamped(datetime.max.replace(tzinfo=UTC), "", value)
    return replace(usage, labels=labels)


def _encode(periods: Mapping[datetime, int]) -> dict[str, int]:
    return {start.astimezone(UTC).isoformat(): periods[start] for start in sorted(periods)}


def _decode(periods: Mapping[str, int]) -> dict[datetime, int]:
    return {datetime.fromisoformat(key).astimezone(UTC): value for key, value in periods.items()}
