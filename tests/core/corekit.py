"""Builders shared by the core tests: budgets, events and usage in a line each."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

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
