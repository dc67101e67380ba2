"""The policy: status, action, driving period and budget, messages, footer, reset time."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from tally.config.models import PerUserBudgets, ResetSchedule
from tally.core.limits import group_usage
from tally.core.periods import Calendar
from tally.core.policy import decide, percent_used, period_status
from tally.core.usage import UserUsage, fold_events
from tally.wire import BudgetDecided

from .corekit import budgets, event, utc

NOW = utc(2026, 5, 10, 18)
WARNINGS = [
    {"at_percent": 75, "message": "75% of your {period} budget used"},
    {"at_percent": 90, "message": "90%: {tokens_remaining} left until {reset_time}"},
]


def usage_of(daily: int, monthly: int | None, config: PerUserBudgets) -> UserUsage:
    """alice with `daily` tokens today and `monthly` this month (default: the same)."""
    events = [event("alice", NOW, daily)]
    if monthly is not None and monthly > daily:
        events.append(event("alice", utc(2026, 5, 2), monthly - daily))
    return fold_events(events, config)["alice"]


def decision(
    daily: int = 0, monthly: int | None = None, now: datetime = NOW, **fields: Any
) -> BudgetDecided:
    """alice's decision under limits 1000/10000 (and WARNINGS unless given)."""
    fields.setdefault("warnings", WARNINGS)
    config = budgets(1000, 10000, **fields)
    return decide(usage_of(daily, monthly, config), config, now)


# arithmetic -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("used", "limit", "percent"),
    [
        (0, 1000, 0),
        (749, 1000, 74),
        (750, 1000, 75),
        (999, 1000, 99),
        (1000, 1000, 100),
        (2501, 1000, 250),
        (1, 3, 33),
        (2, 3, 66),
        (0, 0, 100),
        (5, 0, 100),
    ],
)
def test_percent_used_floors(used: int, limit: int, percent: int) -> None:
    assert percent_used(used, limit) == percent


def test_period_status_fields() -> None:
    cal = Calendar(ResetSchedule(timezone="America/New_York"))
    window = cal.daily_window(NOW)
    status = period_status(window, 1200, 1000, (), cal.zone)
    assert status.tokens_remaining == 0
    assert status.period_start == window.start
    assert status.reset_time == "2026-05-11T00:00:00-04:00"


# status -----------------------------------------------------------------------------------


def test_no_usage_is_ok_and_allowed() -> None:
    d = decision(0)
    assert (d.status, d.action, d.message) == ("ok", "allow", None)


def test_below_lowest_warning_is_ok() -> None:
    assert decision(749).status == "ok"


def test_lowest_warning_reached_is_warning() -> None:
    d = decision(750)
    assert (d.status, d.action, d.percent_used) == ("warning", "warn", 75)


def test_limit_reached_exactly_is_over_limit() -> None:
    d = decision(1000)
    assert (d.status, d.tokens_remaining, d.percent_used) == ("over_limit", 0, 100)


def test_past_limit_is_over_limit() -> None:
    d = decision(1500)
    assert (d.status, d.percent_used, d.tokens_remaining) == ("over_limit", 150, 0)


def test_without_warnings_no_warning_status() -> None:
    assert decision(999, warnings=[]).status == "ok"


def test_zero_limit_and_no_use_is_over_limit() -> None:
    d = decide(UserUsage("alice"), budgets(0, 10000), NOW)
    assert (d.status, d.percent_used, d.tokens_limit) == ("over_limit", 100, 0)


def test_remaining_is_limit_minus_used() -> None:
    d = decision(300)
    assert (d.tokens_used, d.tokens_limit, d.tokens_remaining) == (300, 1000, 700)


# driving period ---------------------------------------------------------------------------


def test_monthly_over_limit_beats_daily_ok() -> None:
    d = decision(10, 10000)
    assert (d.status, d.period, d.tokens_used) == ("over_limit", "monthly", 10000)


def test_daily_warning_beats_monthly_ok() -> None:
    d = decision(800, 900)
    assert (d.status, d.period) == ("warning", "daily")


def test_worse_status_beats_higher_percent() -> None:
    # daily 80% (warning) vs monthly over limit at 100%: monthly; and daily over limit at 100%
    # beats monthly warning at 95%
    assert decision(800, 10000).period == "monthly"
    assert decision(1000, 9500).period == "daily"


def test_tie_on_status_goes_to_higher_percent() -> None:
    d = decision(760, 9500)  # both warning: daily 76%, monthly 95%
    assert (d.period, d.percent_used) == ("monthly", 95)
    d = decision(950, 7600)  # both warning: daily 95%, monthly 76%
    assert (d.period, d.percent_used) == ("daily", 95)


def test_full_tie_goes_to_monthly() -> None:
    d = decision(100, 1000)  # both ok at 10%
    assert d.period == "monthly"
    d = decision(0)
    assert d.period == "monthly"


def test_daily_and_monthly_statuses_reported() -> None:
    d = decision(800, 2000)
    assert (d.daily.status, d.daily.percent_used, d.daily.tokens_used) == ("warning", 80, 800)
    assert (d.monthly.status, d.monthly.percent_used, d.monthly.tokens_used) == ("ok", 20, 2000)
    assert d.daily.period_start == utc(2026, 5, 10) and d.monthly.period_start == utc(2026, 5, 1)


def test_usage_of_other_periods_does_not_count() -> None:
    d = decision(500, now=utc(2026, 5, 11, 1))
    assert (d.daily.tokens_used, d.monthly.tokens_used) == (0, 500)
    d = decision(500, now=utc(2026, 6, 1, 1))
    assert d.monthly.tokens_used == 0


def test_as_of_is_now() -> None:
    assert decision(1).as_of == NOW


# actions ----------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["soft_limit", "hard_stop", "reduced_priority"])
def test_over_limit_action_is_configured_action(action: str) -> None:
    d = decision(1000, on_limit_exceeded={"action": action})
    assert d.action == action


def test_hard_stop_carries_status_code_and_no_model() -> None:
    d = decision(1000, on_limit_exceeded={"action": "hard_stop", "hard_stop": {"status_code": 402}})
    assert (d.status_code, d.force_model) == (402, None)


def test_reduced_priority_forces_model() -> None:
    exceeded = {"action": "reduced_priority", "reduced_priority": {"force_model": "cheap/model"}}
    d = decision(1000, on_limit_exceeded=exceeded)
    assert (d.force_model, d.status_code) == ("cheap/model", None)


def test_soft_limit_has_neither() -> None:
    d = decision(1000)
    assert (d.action, d.force_model, d.status_code) == ("soft_limit", None, None)


def test_hard_stop_config_ignored_below_limit() -> None:
    d = decision(800, on_limit_exceeded={"action": "hard_stop"})
    assert (d.action, d.status_code) == ("warn", None)


# messages ---------------------------------------------------------------------------------


def test_warning_message_is_highest_crossed() -> None:
    assert decision(800).message == "75% of your daily budget used"
    assert decision(900).message == "90%: 100 left until 2026-05-11T00:00:00+00:00"


def test_warning_message_order_in_config_does_not_matter() -> None:
    assert decision(950, warnings=list(reversed(WARNINGS))).message.startswith("90%")  # type: ignore[union-attr]


def test_blank_warning_message_uses_on_approaching_template() -> None:
    d = decision(
        800,
        warnings=[{"at_percent": 75, "message": " "}],
        on_approaching_limit={
            "message_template": "{percent_used}% of {period}, {tokens_remaining} left"
        },
    )
    assert d.message == "80% of daily, 200 left"


def test_over_limit_message_is_action_message() -> None:
    exceeded = {
        "action": "hard_stop",
        "hard_stop": {"message": "Limit reached. Resets at {reset_time}.\n"},
    }
    d = decision(1200, on_limit_exceeded=exceeded)
    assert d.message == "Limit reached. Resets at 2026-05-11T00:00:00+00:00.\n"


def test_soft_limit_message_rendered() -> None:
    exceeded = {
        "soft_limit": {"message": "Over your {period} budget: {tokens_used}/{tokens_limit}"}
    }
    assert (
        decision(10, 10000, on_limit_exceeded=exceeded).message
        == "Over your monthly budget: 10000/10000"
    )


def test_reduced_priority_message() -> None:
    exceeded = {"action": "reduced_priority", "reduced_priority": {"message": "Routing to Haiku."}}
    assert decision(1000, on_limit_exceeded=exceeded).message == "Routing to Haiku."


def test_footer_when_included() -> None:
    d = decision(
        300,
        include_budget_in_response=True,
        budget_footer="Your usage: {tokens_used}/{tokens_limit} tokens ({percent_used}%)",
    )
    assert d.footer == "Your usage: 300/1000 tokens (30%)"  # both ok: daily's 30% beats 3%


def test_footer_follows_driving_period() -> None:
    d = decision(800, include_budget_in_response=True, budget_footer="{period} {percent_used}")
    assert d.footer == "daily 80"


def test_no_footer_unless_included() -> None:
    assert decision(300).footer is None


# reset time -------------------------------------------------------------------------------


def test_reset_time_is_end_of_driving_period_in_configured_zone() -> None:
    ny = ResetSchedule(timezone="America/New_York")
    d = decision(800, reset_schedule=ny)
    assert d.period == "daily" and d.reset_time == "2026-05-11T00:00:00-04:00"


def test_monthly_reset_time() -> None:
    d = decision(
        10, 9500, reset_schedule=ResetSchedule(timezone="Europe/Berlin", monthly_reset_day=31)
    )
    assert (d.period, d.reset_time) == ("monthly", "2026-05-31T00:00:00+02:00")


def test_reset_time_across_spring_forward() -> None:
    ny = ResetSchedule(timezone="America/New_York", daily_reset_time="02:30")
    config = budgets(1000, 10000, reset_schedule=ny, warnings=WARNINGS)
    usage = fold_events([event(at=utc(2026, 3, 7, 12), tokens=900)], config)["alice"]
    d = decide(usage, config, utc(2026, 3, 7, 12))
    assert d.reset_time == "2026-03-08T03:00:00-04:00"


# limits in the decision -------------------------------------------------------------------


def test_override_and_role_limits_apply() -> None:
    config = budgets(
        1000, 10000, user_overrides={"alice": {"monthly_tokens": 50}}, role_limits={"admin": 5000}
    )
    usage = fold_events([event(at=NOW, tokens=10, role="admin")], budgets())["alice"]
    d = decide(usage, config, NOW)
    assert (d.daily.tokens_limit, d.monthly.tokens_limit) == (5000, 50)


def test_rollover_raises_todays_limit() -> None:
    events = [event(at=utc(2026, 5, 9, 12), tokens=400), event(at=NOW, tokens=1200)]
    usage = fold_events(events, budgets())["alice"]
    rolled = budgets(1000, 10000, rollover={"enabled": True, "max_rollover_tokens": 500})
    d = decide(usage, rolled, NOW)
    assert (d.daily.tokens_limit, d.daily.status, d.daily.tokens_remaining) == (1500, "ok", 300)


def test_disabled_budgets_always_allow() -> None:
    d = decision(5000, enabled=False, include_budget_in_response=True)
    assert (d.status, d.action, d.message, d.footer) == ("ok", "allow", None, None)
    assert d.daily.status == "over_limit"  # the figures are still honest


# shared budgets ---------------------------------------------------------------------------

SHARED = {
    "department_budgets": {"research": {"daily_tokens": 2000, "monthly_tokens": 100000}},
    "project_budgets": {"atlas": {"daily_tokens": 100000, "monthly_tokens": 3000}},
    "warnings": WARNINGS,
}


def team(*members: tuple[str, int, dict[str, str]]) -> dict[str, UserUsage]:
    events = [event(user, NOW, tokens, **labels) for user, tokens, labels in members]
    return fold_events(events, budgets())


def test_department_budget_drives_when_more_restrictive() -> None:
    users = team(
        ("alice", 500, {"department": "research"}), ("bob", 1500, {"department": "research"})
    )
    d = decide(users["alice"], budgets(1000, 10000, **SHARED), NOW, group_usage(users.values()))
    assert (d.budget, d.status, d.tokens_used, d.tokens_limit) == (
        "department:research",
        "over_limit",
        2000,
        2000,
    )
    assert d.daily.tokens_used == 500  # the user's own figures stay the user's


def test_project_budget_monthly() -> None:
    users = team(("alice", 100, {"project": "atlas"}), ("bob", 2300, {"project": "atlas"}))
    d = decide(users["alice"], budgets(1000, 10000, **SHARED), NOW, group_usage(users.values()))
    assert (d.budget, d.period, d.status, d.percent_used) == (
        "project:atlas",
        "monthly",
        "warning",
        80,
    )
    assert d.message == "75% of your monthly budget used"


def test_user_budget_wins_when_more_restrictive() -> None:
    users = team(("alice", 950, {"department": "research"}))
    d = decide(users["alice"], budgets(1000, 10000, **SHARED), NOW, group_usage(users.values()))
    assert (d.budget, d.percent_used) == ("user", 95)


def test_tie_between_budgets_goes_to_higher_percent_then_user() -> None:
    config = budgets(
        1000,
        100000,
        **{
            **SHARED,
            "department_budgets": {"research": {"daily_tokens": 1000, "monthly_tokens": 100000}},
        },
    )
    users = team(("alice", 800, {"department": "research"}))
    d = decide(users["alice"], config, NOW, group_usage(users.values()))
    assert (d.budget, d.percent_used) == ("user", 80)
    users = team(
        ("alice", 800, {"department": "research"}), ("bob", 100, {"department": "research"})
    )
    d = decide(users["alice"], config, NOW, group_usage(users.values()))
    assert (d.budget, d.percent_used) == ("department:research", 90)


def test_group_not_given_is_judged_on_the_user_alone() -> None:
    users = team(("alice", 1900, {"department": "research"}))
    config = budgets(5000, 100000, **SHARED)
    d = decide(users["alice"], config, NOW)
    assert (d.budget, d.percent_used) == ("department:research", 95)


def test_member_of_unbudgeted_group_has_only_own_budget() -> None:
    users = team(("alice", 10, {"department": "sales"}))
    d = decide(users["alice"], budgets(1000, 10000, **SHARED), NOW, group_usage(users.values()))
    assert d.budget == "user"
