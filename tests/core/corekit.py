"""Builders shared by the core tests: budgets, events and usage in a line each."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import strategies as st

from tally.config.models import Limits, PerUserBudgets
from tally.wire import UsageRecorded

_counter = iter(range(10**9))


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[arg-type,misc]


def budgets(daily: int = 1000, monthly: int = 10000, **fields: Any) -> PerUserBudgets:
    """PerUserBudgets with the given default limits; any other field by keyword."""
    return PerUserBudgets.model_validate(
        {"default_limits": Limits(daily_tokens=daily, monthly_tokens=monthly), **fields}
    )


def event(
    user_id: str = "alice",
    at: datetime | None = None,
    tokens: int = 100,
    event_id: str | None = None,
    **fields: Any,
) -> UsageRecorded:
    """A usage event with `tokens` input tokens (and no others unless given)."""
    return UsageRecorded(
        event_id=event_id or f"e{next(_counter)}",
        occurred_at=at or utc(2026, 5, 10, 12),
        user_id=user_id,
        model="test-model",
        input_tokens=tokens,
        output_tokens=fields.pop("output_tokens", 0),
        **fields,
    )


USERS = ["alice", "bob", "carol"]
ROLES = [None, "admin", "developer"]


@st.composite
def event_lists(draw: st.DrawFn, ids: int | None = None) -> list[UsageRecorded]:
    """Up to 30 events over 40 days from 25 Feb 2026 (a month end, both DST changes of
    2026's spring), in no time order; with `ids`, event ids drawn from that many, so an id
    may come again with other contents."""
    count = draw(st.integers(0, 30))
    base = utc(2026, 2, 25)
    events = []
    for index in range(count):
        minutes = draw(st.integers(0, 60 * 24 * 40))
        number = index if ids is None else draw(st.integers(0, ids - 1))
        events.append(
            UsageRecorded(
                event_id=f"ev{number}",
                occurred_at=base + timedelta(minutes=minutes),
                user_id=draw(st.sampled_from(USERS)),
                model="m",
                input_tokens=draw(st.integers(0, 5000)),
                output_tokens=draw(st.integers(0, 5000)),
                cache_read_tokens=draw(st.integers(0, 100)),
                role=draw(st.sampled_from(ROLES)),
                department=draw(st.sampled_from([None, "research", "ops"])),
                project=draw(st.sampled_from([None, "atlas"])),
            )
        )
    return events
