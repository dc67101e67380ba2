"""`tally status`'s table: one column per period kind some user has a limit for."""

from __future__ import annotations

from tally.config.models import Config
from tally.core import decide, fold_events
from tally.status import format_table
from tally.wire import BudgetDecided
from tests.core.corekit import event, utc

NOW = utc(2026, 5, 10, 12)


def decisions(limits: dict[str, int]) -> list[BudgetDecided]:
    config = Config.model_validate({"budgets": {"per_user_budgets": {
        "default_limits": limits, "on_limit_exceeded": {"action": "hard_stop"}}}})
    budgets = config.budgets.per_user_budgets
    usages = fold_events([event("alice", NOW, 1200), event("bob", NOW, 10)], budgets)
    return [decide(usage, budgets, NOW) for usage in usages.values()]


def test_the_table_shows_the_day_and_the_month() -> None:
    table = format_table(decisions({"daily_tokens": 5000, "monthly_tokens": 100000}))
    lines = table.splitlines()
    assert lines[0].startswith("(tokens used/limit this day and month;")
    assert lines[1].split() == ["user", "status", "action", "daily", "used/limit", "monthly",
                                "used/limit", "decided", "by"]
    assert lines[4] == ("the day resets at 2026-05-11T00:00:00+00:00, "
                        "the month at 2026-06-01T00:00:00+00:00")
