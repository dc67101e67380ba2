"""A user's usage per period, as a fold over UsageRecorded events.

The fold adds each event's counted tokens to the daily and monthly periods containing its
`occurred_at`. Sums commute, and the labels (role, department, project) are taken from the
latest event that states them, ordered by (occurred_at, event_id), so the result does not
depend on the order of the events. `fold_events` skips an event_id it has already seen,
which makes replaying a stream with duplicates harmless.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from operator import attrgetter
from typing import Protocol, cast

from tally.config.models import PerUserBudgets, ResetSchedule, TokenField
from tally.core.periods import Calendar, calendar_for
from tally.wire import BalanceUpdated, PeriodName, UsageRecorded

__all__ = [
    "LABELS",
    "PeriodKey",
    "PeriodUsage",
    "Stamped",
    "UserUsage",
    "counted_tokens",
    "fold",
    "fold_events",
    "from_balance",
    "period_totals",
    "to_balance",
    "with_labels",
]

LABELS = ("role", "department", "project")
PeriodKey = tuple[str, PeriodName, datetime]  # (user_id, kind, window start in UTC)


class PeriodUsage(Protocol):
    """Anything with tokens used per period start, per period kind: a user or a group. A
    kind it holds nothing of is rolled up from its days (tally.core.limits.usage_in)."""

    @property
    def periods(self) -> Mapping[PeriodName, Mapping[datetime, int]]: ...


@dataclass(frozen=True, slots=True, order=True)
class Stamped:
    """A label's value and the (occurred_at, event_id) of the event that stated it."""

    at: datetime
    event_id: str
    value: str


@dataclass(frozen=True, slots=True)
class UserUsage:
    """Tokens used per period start (UTC), for one user. Treat the mappings as read-only."""

    user_id: str
    daily: Mapping[datetime, int] = field(default_factory=dict)
    monthly: Mapping[datetime, int] = field(default_factory=dict)
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

    @property
    def periods(self) -> Mapping[PeriodName, Mapping[datetime, int]]:
        """The kinds this fold keeps (the limits read every kind from the days: usage_in)."""
        return {"daily": self.daily, "monthly": self.monthly}

    def used(self, kind: PeriodName, start: datetime) -> int:
        return self.periods.get(kind, {}).get(start, 0)


def counted_tokens(event: UsageRecorded, fields: Iterable[TokenField]) -> int:
    """The tokens of an event that count against budgets."""
    return sum(getattr(event, name) for name in fields)


def fold(
    usage: UserUsage,
    event: UsageRecorded,
    schedule: ResetSchedule | Calendar,
    fields: Iterable[TokenField],
) -> UserUsage:
    """Add one event to a user's usage (no dedupe here: see fold_events)."""
    builder = _Builder(usage)
    builder.add(event, _calendar(schedule), tuple(fields))
    return builder.build()


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
    seen = set() if seen is None else seen
    builders: dict[str, _Builder] = {}
    calendar = calendar_for(budgets.reset_schedule)
    fields = budgets.counted_tokens
    start = dict(initial or {})
    for event in events:
        if event.event_id in seen:
            continue
        seen.add(event.event_id)
        builder = builders.get(event.user_id)
        if builder is None:
            prior = start.get(event.user_id) or UserUsage(event.user_id)
            builder = builders[event.user_id] = _Builder(prior)
        builder.add(event, calendar, fields)
    result = {user_id: usage for user_id, usage in start.items()}
    result.update({user_id: b.build() for user_id, b in builders.items()})
    return result


class _Builder:
    """The mutable side of one user's fold, frozen again by build()."""

    def __init__(self, usage: UserUsage) -> None:
        self.user_id = usage.user_id
        self.daily = dict(usage.daily)
        self.monthly = dict(usage.monthly)
        self.kept: dict[PeriodName, dict[datetime, int]] = {
            "daily": self.daily, "monthly": self.monthly}
        self.last_event_at = usage.last_event_at
        self.labels = dict(usage.labels)

    def add(self, event: UsageRecorded, calendar: Calendar, fields: Iterable[TokenField]) -> None:
        tokens = counted_tokens(event, fields)
        for window in calendar.windows_at(event.occurred_at):
            totals = self.kept.get(window.kind)
            if totals is not None:  # a kind not kept here is rolled up from days when read
                totals[window.start] = totals.get(window.start, 0) + tokens
        at = event.occurred_at.astimezone(UTC)
        if self.last_event_at is None or at > self.last_event_at:
            self.last_event_at = at
        for name in LABELS:
            value = getattr(event, name)
            if value is not None:
                self._label(name, Stamped(at, event.event_id, value))

    def _label(self, name: str, stamped: Stamped) -> None:
        current = self.labels.get(name)
        if current is None or stamped > current:
            self.labels[name] = stamped

    def build(self) -> UserUsage:
        return UserUsage(self.user_id, self.daily, self.monthly, self.last_event_at, self.labels)


def period_totals(
    events: Iterable[UsageRecorded],
    schedule: ResetSchedule | Calendar,
    fields: Iterable[TokenField],
) -> dict[PeriodKey, int]:
    """Counted tokens per (user_id, kind, window start): one batch, aggregated.

    No dedupe: the caller has already dropped events it has seen.
    """
    windows_at = _calendar(schedule).windows_at
    tokens_of = _token_counter(fields)
    totals: dict[PeriodKey, int] = {}
    for event in events:
        tokens = tokens_of(event)
        for window in windows_at(event.occurred_at):
            key: PeriodKey = (event.user_id, window.kind, window.start)
            totals[key] = totals.get(key, 0) + tokens
    return totals


def _token_counter(fields: Iterable[TokenField]) -> Callable[[UsageRecorded], int]:
    # The hot loop of the projector: one C-level attrgetter instead of a generator per event.
    names = tuple(fields)
    if len(names) == 1:
        return cast(Callable[[UsageRecorded], int], attrgetter(names[0]))
    getter = attrgetter(*names)
    return lambda event: sum(getter(event))


def to_balance(usage: UserUsage, as_of: datetime) -> BalanceUpdated:
    """The wire form of a user's usage: period starts as ISO 8601 UTC strings."""
    if usage.last_event_at is None:
        raise ValueError(f"user {usage.user_id!r} has no usage to publish")
    return BalanceUpdated(
        user_id=usage.user_id,
        role=usage.role,
        department=usage.department,
        project=usage.project,
        daily=_encode(usage.daily),
        monthly=_encode(usage.monthly),
        last_event_at=usage.last_event_at,
        as_of=as_of,
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
        daily=_decode(balance.daily),
        monthly=_decode(balance.monthly),
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


def _calendar(schedule: ResetSchedule | Calendar) -> Calendar:
    return schedule if isinstance(schedule, Calendar) else calendar_for(schedule)


def _encode(periods: Mapping[datetime, int]) -> dict[str, int]:
    return {start.astimezone(UTC).isoformat(): periods[start] for start in sorted(periods)}


def _decode(periods: Mapping[str, int]) -> dict[datetime, int]:
    return {datetime.fromisoformat(key).astimezone(UTC): value for key, value in periods.items()}
