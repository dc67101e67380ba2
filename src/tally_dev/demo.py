"""A sample usage history for the demo, placed relative to `now` (pure: no clock, no I/O).

The picture is the same whatever day the demo runs: each user has the same steady use on
each of the HISTORY_DAYS (29) daily periods before today (a rolling window, across month ends)
and the same share of today's limit, so the daily column, every status and every alert
are the same on any day, also a minute after midnight or on the 1st of the month. Alice
is warned, bob is stopped, the others are fine, and an unknown identity is recorded under
its own name with default limits. The monthly column counts this month so far: the earlier
days that fall in this month plus today (on the 1st it equals the daily column).

Today's calls are spread over [today's start, now), so a run a minute after midnight puts
them all in that minute. Event ids derive from the day and the part of the plan, so
feeding the history twice on one day counts it once.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from tally.config.models import Config
from tally.core import base_limits, calendar_for, last_days

__all__ = ["HISTORY_DAYS", "PLAN", "TODAY_SHARE", "sample_history"]

HISTORY_DAYS = 29  # earlier days: with today, the 30 days the dashboard charts
# (gateway identity as OpenClaw reports it, tokens on each earlier day, share of today's
# limit). The order by use is the same on every day and for today: alice, dave, bob, carol.
PLAN: dict[str, tuple[str, int, float]] = {
    "user_alice": ("openai-user:alice", 30_000, 0.80),
    "user_bob": ("openai-user:bob", 15_000, 1.04),
    "user_carol": ("user_carol", 10_000, 0.10),
    "user_dave": ("user_dave", 20_000, 0.60),
}
GUEST = ("openai-user:guest", 2_000, 12_000)
MODELS = ("anthropic/claude-sonnet-4", "openai/gpt-4.1", "anthropic/claude-3-haiku")
CALL_TOKENS = 2_500
TODAY_SHARE = {user: share for user, (_, _, share) in PLAN.items()}


def sample_history(config: Config, now: datetime) -> list[dict[str, Any]]:
    """Raw usage events (usage.raw's shape): HISTORY_DAYS earlier days, then today to `now`."""
    budgets = config.budgets.per_user_budgets
    calendar = calendar_for(budgets.reset_schedule)
    *earlier, today_window = last_days(calendar, now, HISTORY_DAYS + 1)
    today = today_window.start
    days = [(day.start, day.end) for day in earlier]
    roles = {u.id: u.role for u in config.users.user_identification.users}
    events: list[dict[str, Any]] = []
    for user_id, (identity, per_day, share) in PLAN.items():
        if user_id not in roles:
            continue
        limit = base_limits(budgets, user_id, roles[user_id]).daily_tokens
        events += _days(identity, per_day, days)
        events += _calls(identity, int(limit * share), today, now, "t")
    identity, per_day, today_tokens = GUEST
    events += _days(identity, per_day, days)
    events += _calls(identity, today_tokens, today, now, "t")
    return sorted(events, key=lambda e: str(e["occurred_at"]))


def _days(identity: str, per_day: int,
          days: list[tuple[datetime, datetime]]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for start, end in days:
        found += _calls(identity, per_day, start, min(start + timedelta(hours=20), end), "d")
    return found


def _calls(identity: str, tokens: int, start: datetime, end: datetime,
           part: str) -> list[dict[str, Any]]:
    """`tokens` split into calls of about CALL_TOKENS, spread evenly over [start, end)
    (all at `start` when the span is empty: a run at the very instant of a reset)."""
    count = max(1, -(-tokens // CALL_TOKENS))
    step = max(end - start, timedelta(0)) / (count + 1)
    calls = []
    for i in range(count):
        size = tokens // count + (1 if i < tokens % count else 0)
        calls.append(_event(identity, start, start + step * (i + 1), size, f"{part}{i}"))
    return calls


def _event(identity: str, day: datetime, at: datetime, tokens: int,
           index: str) -> dict[str, Any]:
    output = tokens // 4
    model = MODELS[int(index[1:]) % len(MODELS)]
    return {
        "event_id": f"demo-{identity}-{day:%Y%m%d}-{index}",
        "occurred_at": at.isoformat(),
        "user_id": identity,
        "model": model,
        "provider": model.split("/")[0],
        "input_tokens": tokens - output,
        "output_tokens": output,
        "source": "tally-demo",
    }
