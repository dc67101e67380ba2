"""A sample usage history for the demo, made relative to `now` (pure: no clock, no I/O).

Each configured user gets steady use on every earlier day of the month and a chosen share
of today's limit, so the demo shows every status at once: alice warned, bob stopped, the
others fine, and an unknown identity recorded under its own name with default limits.
Event ids derive from the day, so feeding the history twice counts it once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from tally.config.models import Config
from tally.core import base_limits, calendar_for

__all__ = ["TODAY_SHARE", "sample_history"]

# (gateway identity as OpenClaw reports it, tokens per earlier day, share of today's limit)
PLAN: dict[str, tuple[str, int, float]] = {
    "user_alice": ("openai-user:alice", 30_000, 0.80),
    "user_bob": ("openai-user:bob", 15_000, 1.04),
    "user_carol": ("user_carol", 20_000, 0.10),
    "user_dave": ("user_dave", 10_000, 0.60),
}
GUEST = ("openai-user:guest", 2_000, 12_000)
MODELS = ("anthropic/claude-sonnet-4", "openai/gpt-4.1", "anthropic/claude-3-haiku")
CALL_TOKENS = 2_500
TODAY_SHARE = {user: share for user, (_, _, share) in PLAN.items()}


def sample_history(config: Config, now: datetime) -> list[dict[str, Any]]:
    """Raw usage events (usage.raw's shape) from the start of the month up to `now`."""
    budgets = config.budgets.per_user_budgets
    calendar = calendar_for(budgets.reset_schedule)
    today, month = calendar.windows_at(now)
    events: list[dict[str, Any]] = []
    roles = {u.id: u.role for u in config.users.user_identification.users}
    for user_id, (identity, per_day, share) in PLAN.items():
        if user_id not in roles:
            continue
        limit = base_limits(budgets, user_id, roles[user_id]).daily_tokens
        events += _days(identity, per_day, month.start, today.start)
        events += _calls(identity, int(limit * share), today.start, now)
    identity, per_day, today_tokens = GUEST
    events += _days(identity, per_day, month.start, today.start)
    events += _calls(identity, today_tokens, today.start, now)
    return sorted(events, key=lambda e: str(e["occurred_at"]))


def _days(identity: str, per_day: int, start: datetime, end: datetime) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    day = start
    while day < end:
        found += _calls(identity, per_day, day, min(day + timedelta(hours=20), end))
        day += timedelta(days=1)
    return found


def _calls(identity: str, tokens: int, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """`tokens` split into calls of about CALL_TOKENS, spread evenly over [start, end)."""
    count = max(1, -(-tokens // CALL_TOKENS))
    step = (end - start) / (count + 1)
    calls = []
    for i in range(count):
        size = tokens // count + (1 if i < tokens % count else 0)
        calls.append(_event(identity, start + step * (i + 1), size, i))
    return calls


def _event(identity: str, at: datetime, tokens: int, index: int) -> dict[str, Any]:
    output = tokens // 4
    return {
        "event_id": f"demo-{identity}-{at:%Y%m%d}-{index}",
        "occurred_at": at.isoformat(),
        "user_id": identity,
        "model": MODELS[index % len(MODELS)],
        "provider": MODELS[index % len(MODELS)].split("/")[0],
        "input_tokens": tokens - output,
        "output_tokens": output,
        "source": "tally-demo",
    }
