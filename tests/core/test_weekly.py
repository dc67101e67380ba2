"""Weekly budgets through the core: limits, the policy, alerts and the report's row.

A weekly limit is optional: where none is set, decisions, alerts and rows are what they
were. 2026-05-10 is a Sunday; the UTC week holding it runs from Monday 2026-05-04.
"""

from __future__ import annotations

from typing import Any

from tally.config.models import Config, PerUserBudgets
from tally.core.alerts import new_alerts
from tally.core.limits import base_limits, group_usage
from tally.core.policy import decide
from tally.core.report import budget_row
from tally.core.usage import UserUsage, fold_events

from .corekit import budgets, event, utc  # budgets(): no weekly limit

NOW = utc(2026, 5, 10, 18)
MONDAY = utc(2026, 5, 4, 9)
WEEK = "2026-05-04T00:00:00+00:00"


def weekly(weekly_tokens: int = 1500, **fields: Any) -> PerUserBudgets:
    """Limits 1000 a day, `weekly_tokens` a week, 10000 a month, a warning at 75%."""
    fields.setdefault("warnings", [{"at_percent": 75, "message": "75% of your {period}"}])
    limits = {"daily_tokens": 1000, "weekly_tokens": weekly_tokens, "monthly_tokens": 10000}
    return PerUserBudgets.model_validate({"default_limits": limits, **fields})


def usage(cfg: PerUserBudgets, monday: int = 900, today: int = 700) -> UserUsage:
    events = [event("alice", MONDAY, monday), event("alice", NOW, today)]
    return fold_events(events, cfg)["alice"]


# limits -----------------------------------------------------------------------------------


def test_no_weekly_limit_unless_configured() -> None:
    assert base_limits(budgets(), "alice", None).weekly_tokens is None
    assert "weekly" not in base_limits(budgets(), "alice", None).by_period()


def test_weekly_limit_from_override_then_role_then_default() -> None:
    cfg = PerUserBudgets.model_validate({
        "default_limits": {"daily_tokens": 1000, "weekly_tokens": 5000, "monthly_tokens": 9000},
        "user_overrides": {"olga": {"weekly_tokens": 7}},
        "role_limits": {"dev": {"weekly_tokens": 3000}, "ops": 200},
    })
    assert base_limits(cfg, "olga", "dev").by_period() == {
        "daily": 1000, "weekly": 7, "monthly": 9000}
    assert base_limits(cfg, "rita", "dev").by_period() == {
        "daily": 1000, "weekly": 3000, "monthly": 9000}
    # the brief's bare number is a daily limit: the week comes from the default
    assert base_limits(cfg, "omar", "ops").by_period() == {
        "daily": 200, "weekly": 5000, "monthly": 9000}


# the policy -------------------------------------------------------------------------------


def test_without_a_weekly_limit_the_decision_has_no_week() -> None:
    cfg = budgets(1000, 10000)
    decision = decide(usage(cfg), cfg, NOW)
    assert decision.weekly is None and list(decision.periods) == ["daily", "monthly"]


def test_over_the_week_under_the_day_stops_for_the_week() -> None:
    cfg = weekly(on_limit_exceeded={"action": "hard_stop"})
    decision = decide(usage(cfg), cfg, NOW)
    assert decision.daily.status == "ok" and decision.weekly is not None
    assert (decision.weekly.tokens_used, decision.weekly.tokens_limit) == (1600, 1500)
    assert (decision.action, decision.period, decision.tokens_used) == ("hard_stop", "weekly", 1600)
    assert decision.reset_time == "2026-05-11T00:00:00+00:00"
    assert decision.message == "You've reached your weekly token limit. Your budget resets at " \
                               "2026-05-11T00:00:00+00:00."


def test_last_weeks_use_does_not_count_this_week() -> None:
    cfg = weekly()
    events = [event("alice", utc(2026, 5, 3, 23), 1400), event("alice", NOW, 100)]
    decision = decide(fold_events(events, cfg)["alice"], cfg, NOW)
    assert decision.weekly is not None and decision.weekly.tokens_used == 100


def test_weekly_rollover_carries_last_weeks_unused_tokens() -> None:
    cfg = weekly(rollover={"enabled": True, "max_rollover_tokens": 400})
    events = [event("alice", utc(2026, 4, 30), 1200), event("alice", NOW, 10)]
    decision = decide(fold_events(events, cfg)["alice"], cfg, NOW)
    assert decision.weekly is not None and decision.weekly.tokens_limit == 1500 + 300


def test_a_changed_weekly_reset_day_applies_at_once() -> None:
    cfg = weekly()
    folded = usage(cfg)  # folded while weeks began on Monday
    sunday = cfg.model_copy(update={"reset_schedule": cfg.reset_schedule.model_copy(
        update={"weekly_reset_day": "sunday"})})
    decision = decide(folded, sunday, NOW)
    assert decision.weekly is not None
    assert (decision.weekly.period_start, decision.weekly.tokens_used) == (utc(2026, 5, 10), 700)


def test_a_shared_weekly_budget_drives_a_user_without_one() -> None:
    cfg = budgets(1000, 10000, department_budgets={"research": {
        "daily_tokens": 5000, "weekly_tokens": 1000, "monthly_tokens": 50000}},
        on_limit_exceeded={"action": "hard_stop"})
    events = [event("alice", MONDAY, 600, department="research"),
              event("bob", NOW, 600, department="research")]
    usages = fold_events(events, cfg)
    decision = decide(usages["alice"], cfg, NOW, group_usage(usages.values()))
    assert decision.weekly is None  # alice has no weekly limit of her own
    assert (decision.budget, decision.period, decision.action) == (
        "department:research", "weekly", "hard_stop")
    [alert] = new_alerts(None, decision, cfg, set())
    assert alert.alert_id == f"alice|weekly|{WEEK}|limit|100|department:research"


# alerts -----------------------------------------------------------------------------------


def test_weekly_thresholds_alert_once_per_week() -> None:
    cfg = weekly()
    decision = decide(usage(cfg, monday=900, today=300), cfg, NOW)  # 1200 of 1500: 80%
    found = new_alerts(None, decision, cfg, set())
    assert [a.alert_id for a in found] == [f"alice|weekly|{WEEK}|warning|75"]
    assert found[0].message == "75% of your weekly"
    assert new_alerts(None, decision, cfg, {found[0].alert_id}) == []


def test_the_new_week_sends_a_reset() -> None:
    cfg = weekly(on_limit_exceeded={"action": "hard_stop"})
    over = decide(usage(cfg), cfg, NOW)
    monday = decide(usage(cfg), cfg, utc(2026, 5, 11, 9))
    [alert] = new_alerts(over, monday, cfg, set())
    assert alert.alert_id == "alice|weekly|2026-05-11T00:00:00+00:00|reset|0"
    assert alert.message == "Your weekly budget has reset."


# the report -------------------------------------------------------------------------------


def test_the_row_gains_weekly_figures_only_with_a_weekly_limit() -> None:
    plain = budgets(1000, 10000)
    row = budget_row(decide(usage(plain), plain, NOW))
    assert list(row) == ["user_id", "daily_used", "daily_limit", "daily_remaining",
                         "monthly_used", "monthly_limit", "status", "decision"]
    assert row["decision"]["weekly"] is None
    cfg = weekly(2000)
    row = budget_row(decide(usage(cfg), cfg, NOW))
    assert (row["weekly_used"], row["weekly_limit"], row["weekly_remaining"]) == (1600, 2000, 400)
    assert row["daily_used"] == 700 and row["monthly_used"] == 1600


def test_weekly_keys_in_the_config_files() -> None:
    config = Config.model_validate({"budgets": {"per_user_budgets": {
        "default_limits": {"daily_tokens": 1, "weekly_tokens": 5, "monthly_tokens": 20},
        "project_budgets": {"atlas": {"daily_tokens": 1, "weekly_tokens": 2,
                                      "monthly_tokens": 3}},
        "reset_schedule": {"weekly_reset_day": "friday"}}}})
    budgets_ = config.budgets.per_user_budgets
    assert budgets_.project_budgets["atlas"].by_period()["weekly"] == 2
    assert budgets_.reset_schedule.weekly_reset_day == "friday"
