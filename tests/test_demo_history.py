"""The demo's history is a pure function of `now` that shows the same picture any day:
the same statuses, daily figures and event count, also a minute after midnight, at the
last second of a day, on the 1st of a month and on 29 February."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from tally.config.loader import load_config
from tally.core.report import budgets_report
from tally.core.usage import fold_events
from tally.wire import UsageRecorded
from tally_dev.demo import GUEST, HISTORY_DAYS, PLAN, sample_history
from tests.paths import project_root

CONFIG = load_config(project_root() / "config")
# identity -> users.yaml id, as the ingest resolves them (the claimed identities)
USER_OF = {identity: user for user, (identity, _, _) in PLAN.items()}

EDGES = [
    datetime(2026, 12, 15, 12, 0, tzinfo=UTC),     # mid-month
    datetime(2026, 12, 2, 0, 0, 30, tzinfo=UTC),   # half a minute after midnight
    datetime(2026, 12, 2, 23, 59, 59, tzinfo=UTC),  # the last second of a day
    datetime(2026, 12, 1, 0, 1, tzinfo=UTC),       # the 1st of the month, just after reset
    datetime(2026, 12, 1, 0, 0, tzinfo=UTC),       # the very instant of the reset
    datetime(2028, 3, 1, 9, 0, tzinfo=UTC),        # the 1st after a 29 February
    datetime(2026, 12, 31, 23, 59, tzinfo=UTC),    # the last minute of the year
]


def report_at(now: datetime) -> dict[str, dict[str, Any]]:
    events = [UsageRecorded.model_validate({**e, "user_id": USER_OF.get(e["user_id"],
                                                                        e["user_id"])})
              for e in sample_history(CONFIG, now)]
    budgets = CONFIG.budgets.per_user_budgets
    usages = fold_events(events, budgets)
    return {row["user_id"]: dict(row)
            for row in budgets_report(usages, CONFIG, now)["users"]}  # type: ignore[index]


@pytest.mark.parametrize("now", EDGES, ids=lambda now: now.isoformat())
def test_the_same_picture_any_day(now: datetime) -> None:
    rows = report_at(now)
    picture = {user: (row["status"], row["daily_used"], row["daily_limit"])
               for user, row in rows.items()}
    assert picture == {
        "user_alice": ("warning", 80_000, 100_000),
        "user_bob": ("over_limit", 26_000, 25_000),
        "user_carol": ("ok", 20_000, 200_000),
        "user_dave": ("ok", 60_000, 100_000),
        "openai-user:guest": ("ok", 12_000, 50_000),
        "gateway_openclaw": ("ok", 0, 200_000),
    }


@pytest.mark.parametrize("now", EDGES, ids=lambda now: now.isoformat())
def test_every_event_is_at_or_before_now_and_as_many_any_day(now: datetime) -> None:
    events = sample_history(CONFIG, now)
    assert len(events) == len(sample_history(CONFIG, EDGES[0]))
    assert all(datetime.fromisoformat(e["occurred_at"]) <= now for e in events)
    assert len({e["event_id"] for e in events}) == len(events)


def test_the_month_counts_the_earlier_days_of_this_month_only() -> None:
    on_the_15th = report_at(datetime(2026, 12, 15, 12, 0, tzinfo=UTC))
    assert on_the_15th["user_alice"]["monthly_used"] == 14 * 30_000 + 80_000
    on_the_1st = report_at(datetime(2026, 12, 1, 0, 1, tzinfo=UTC))
    assert {u: r["monthly_used"] for u, r in on_the_1st.items()} == {
        u: r["daily_used"] for u, r in on_the_1st.items()}


def test_twenty_nine_earlier_days_of_steady_use() -> None:
    now = datetime(2026, 12, 2, 0, 0, 30, tzinfo=UTC)
    per_day: dict[str, dict[str, int]] = {}
    for e in sample_history(CONFIG, now):
        day = e["occurred_at"][:10]
        tokens = e["input_tokens"] + e["output_tokens"]
        per_day.setdefault(e["user_id"], {}).setdefault(day, 0)
        per_day[e["user_id"]][day] += tokens
    guest = per_day[GUEST[0]]
    assert len(guest) == HISTORY_DAYS + 1
    assert min(guest) == "2026-11-03"
    assert {tokens for day, tokens in guest.items() if day != "2026-12-02"} == {GUEST[1]}
