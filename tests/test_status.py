"""`tally status`'s table: one column per period kind some user has a limit for."""

from __future__ import annotations

from tally.config.models import Config
from tally.core import decide, fold_events
from tally.status import format_table
from tally.wire import BudgetDecided
from tests.core.corekit import event, utc

NOW = utc(2026, 5, 10, 12)  # a Sunday: the week resets on Monday the 11th


def decisions(limits: dict[str, int]) -> list[BudgetDecided]:
    config = Config.model_validate({"budgets": {"per_user_budgets": {
        "default_limits": limits, "on_limit_exceeded": {"action": "hard_stop"}}}})
    budgets = config.budgets.per_user_budgets
    usages = fold_events([event("alice", NOW, 1200), event("bob", NOW, 10)], budgets)
    return [decide(usage, budgets, NOW) for usage in usages.values()]


def test_without_weekly_limits_the_table_is_the_day_and_the_month() -> None:
    table = format_table(decisions({"daily_tokens": 5000, "monthly_tokens": 100000}))
    lines = table.splitlines()
    assert lines[0].startswith("(tokens used/limit this day and month;")
    assert lines[1].split() == ["user", "status", "action", "daily", "used/limit", "monthly",
                                "used/limit", "decided", "by"]
    assert "weekly" not in table
    assert lines[4] == ("the day resets at 2026-05-11T00:00:00+00:00, "
                        "the month at 2026-06-01T00:00:00+00:00")


def test_a_weekly_limit_adds_its_column_and_its_reset() -> None:
    table = format_table(decisions({"daily_tokens": 5000, "weekly_tokens": 1000,
                                    "monthly_tokens": 100000}))
    lines = table.splitlines()
    assert lines[0].startswith("(tokens used/limit this day, week and month;")
    assert "weekly used/limit" in lines[1]
    assert lines[2].split() == ["alice", "over_limit", "hard_stop", "1,200/5,000",
                                "1,200/1,000", "1,200/100,000", "weekly", "user"]
    assert lines[4] == ("the day resets at 2026-05-11T00:00:00+00:00, the week at "
                        "2026-05-11T00:00:00+00:00, the month at 2026-06-01T00:00:00+00:00")
