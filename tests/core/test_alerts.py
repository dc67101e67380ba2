"""Alerts: every threshold crossed, the limit, the reset; once per user, period and threshold."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from tally.config.models import PerUserBudgets
from tally.core.alerts import new_alerts
from tally.core.limits import group_usage
from tally.core.policy import decide
from tally.core.usage import fold_events
from tally.wire import BudgetAlerted, BudgetDecided

from .corekit import budgets, event, utc

NOW = utc(2026, 5, 10, 18)
TOMORROW = utc(2026, 5, 11, 9)
WARNINGS = [
    {"at_percent": 75, "message": "75% of your {period} budget"},
    {"at_percent": 90, "message": "90%: {tokens_remaining} left"},
]


def config(**fields: Any) -> PerUserBudgets:
    fields.setdefault("warnings", WARNINGS)
    return budgets(1000, 10000, **fields)


def decided(tokens: int, now: datetime = NOW, cfg: PerUserBudgets | None = None) -> BudgetDecided:
    cfg = cfg or config()
    usage = fold_events([event("alice", NOW, tokens)], cfg)["alice"]
    return decide(usage, cfg, now)


def alerts(
    current: BudgetDecided,
    previous: BudgetDecided | None = None,
    sent: set[str] | None = None,
    cfg: PerUserBudgets | None = None,
) -> list[BudgetAlerted]:
    return new_alerts(previous, current, cfg or config(), sent or set())


def keys(found: list[BudgetAlerted]) -> list[tuple[str, str, int]]:
    return [(a.period, a.kind, a.threshold) for a in found]


# crossings --------------------------------------------------------------------------------


def test_no_alert_below_thresholds() -> None:
    assert alerts(decided(749)) == []


def test_warning_alert_at_threshold() -> None:
    [alert] = alerts(decided(750))
    assert (alert.kind, alert.period, alert.threshold, alert.percent_used) == (
        "warning",
        "daily",
        75,
        75,
    )
    assert alert.message == "75% of your daily budget"
    assert (alert.notify_admin, alert.budget, alert.user_id) == (False, "user", "alice")
    assert (alert.tokens_used, alert.tokens_limit, alert.as_of) == (750, 1000, NOW)


def test_alert_id_is_the_dedupe_key() -> None:
    [alert] = alerts(decided(750))
    assert alert.alert_id == "alice|daily|2026-05-10T00:00:00+00:00|warning|75"
    assert alert.period_start == utc(2026, 5, 10)


def test_jump_past_two_thresholds_sends_both() -> None:
    found = alerts(decided(950))
    assert keys(found) == [("daily", "warning", 75), ("daily", "warning", 90)]
    assert found[1].message == "90%: 50 left"


def test_already_sent_is_not_sent_again() -> None:
    first = alerts(decided(800))
    later = alerts(decided(950), sent={a.alert_id for a in first})
    assert keys(later) == [("daily", "warning", 90)]


def test_same_decision_twice_alerts_once() -> None:
    sent: set[str] = set()
    for _ in range(3):
        sent |= {a.alert_id for a in alerts(decided(800), sent=sent)}
    assert len(sent) == 1


def test_limit_alert_with_action_message_and_admin_flag() -> None:
    cfg = config(
        on_limit_exceeded={"soft_limit": {"message": "Over {period}!", "notify_admin": True}}
    )
    found = alerts(decided(1000, cfg=cfg), cfg=cfg)
    assert keys(found) == [
        ("daily", "warning", 75),
        ("daily", "warning", 90),
        ("daily", "limit", 100),
    ]
    limit = found[-1]
    assert (limit.message, limit.notify_admin, limit.percent_used) == ("Over daily!", True, 100)
    assert [a.notify_admin for a in found[:2]] == [False, False]


def test_limit_alert_notify_admin_follows_the_configured_action() -> None:
    exceeded = {
        "action": "hard_stop",
        "soft_limit": {"notify_admin": True},
        "hard_stop": {"notify_admin": False, "message": "Stopped until {reset_time}"},
    }
    cfg = config(on_limit_exceeded=exceeded)
    limit = alerts(decided(1200, cfg=cfg), cfg=cfg)[-1]
    assert (limit.kind, limit.notify_admin) == ("limit", False)
    assert limit.message == "Stopped until 2026-05-11T00:00:00+00:00"


def test_reduced_priority_notify_admin() -> None:
    exceeded = {"action": "reduced_priority", "reduced_priority": {"notify_admin": True}}
    cfg = config(on_limit_exceeded=exceeded)
    assert alerts(decided(1000, cfg=cfg), cfg=cfg)[-1].notify_admin is True


def test_zero_limit_alerts_at_once() -> None:
    cfg = budgets(0, 10000, warnings=WARNINGS)
    assert ("daily", "limit", 100) in keys(alerts(decided(0, cfg=cfg), cfg=cfg))


def test_monthly_thresholds_alert_on_their_own() -> None:
    cfg = config(default_limits={"daily_tokens": 100000, "monthly_tokens": 1000})
    found = alerts(decided(900, cfg=cfg), cfg=cfg)
    assert keys(found) == [("monthly", "warning", 75), ("monthly", "warning", 90)]
    assert found[0].alert_id == "alice|monthly|2026-05-01T00:00:00+00:00|warning|75"


def test_both_periods_alert() -> None:
    cfg = config(default_limits={"daily_tokens": 1000, "monthly_tokens": 1000})
    found = alerts(decided(800, cfg=cfg), cfg=cfg)
    assert keys(found) == [("daily", "warning", 75), ("monthly", "warning", 75)]


def test_new_period_alerts_again() -> None:
    cfg = config()
    day1 = alerts(decided(800, cfg=cfg), cfg=cfg)
    usage = fold_events([event("alice", NOW, 800), event("alice", TOMORROW, 800)], cfg)["alice"]
    day2 = alerts(decide(usage, cfg, TOMORROW), sent={a.alert_id for a in day1}, cfg=cfg)
    assert [a.alert_id for a in day2] == ["alice|daily|2026-05-11T00:00:00+00:00|warning|75"]


def test_no_alerts_when_budgets_disabled() -> None:
    cfg = config(enabled=False)
    assert alerts(decided(5000, cfg=cfg), cfg=cfg) == []


def test_blank_warning_message_uses_template() -> None:
    cfg = config(
        warnings=[{"at_percent": 50, "message": ""}],
        on_approaching_limit={"message_template": "{percent_used}% used"},
    )
    assert alerts(decided(600, cfg=cfg), cfg=cfg)[0].message == "60% used"


# reset ------------------------------------------------------------------------------------


def test_reset_when_warned_user_is_ok_in_a_new_period() -> None:
    before = decided(800)
    after = decided(800, now=TOMORROW)
    [alert] = alerts(after, previous=before)
    assert (alert.kind, alert.threshold, alert.period) == ("reset", 0, "daily")
    assert alert.alert_id == "alice|daily|2026-05-11T00:00:00+00:00|reset|0"
    assert alert.message == "Your daily budget has reset."
    assert (alert.tokens_used, alert.notify_admin) == (0, False)


def test_reset_after_over_limit() -> None:
    assert keys(alerts(decided(800, now=TOMORROW), previous=decided(1500))) == [
        ("daily", "reset", 0)
    ]


def test_no_reset_when_previous_was_ok() -> None:
    assert alerts(decided(100, now=TOMORROW), previous=decided(100)) == []


def test_no_reset_within_the_same_period() -> None:
    raised = config(default_limits={"daily_tokens": 5000, "monthly_tokens": 10000})
    after = decided(800, cfg=raised)
    assert alerts(after, previous=decided(800), cfg=raised) == []


def test_no_reset_while_still_not_ok() -> None:
    cfg = config(default_limits={"daily_tokens": 1000, "monthly_tokens": 1000})
    before = decided(1000, cfg=cfg)
    after = decided(1000, now=TOMORROW, cfg=cfg)  # daily reset, monthly still over
    assert "reset" not in [a.kind for a in alerts(after, previous=before, cfg=cfg)]


def test_reset_sent_once() -> None:
    before, after = decided(800), decided(800, now=TOMORROW)
    sent = {a.alert_id for a in alerts(after, previous=before)}
    assert alerts(after, previous=before, sent=sent) == []


def test_monthly_reset() -> None:
    cfg = config(default_limits={"daily_tokens": 100000, "monthly_tokens": 1000})
    before = decided(900, cfg=cfg)
    after = decided(900, now=utc(2026, 6, 1, 9), cfg=cfg)
    [alert] = alerts(after, previous=before, cfg=cfg)
    assert alert.alert_id == "alice|monthly|2026-06-01T00:00:00+00:00|reset|0"
    assert alert.message == "Your monthly budget has reset."


# shared budgets ---------------------------------------------------------------------------


def test_shared_budget_alerts_name_the_budget() -> None:
    cfg = config(department_budgets={"research": {"daily_tokens": 1000, "monthly_tokens": 100000}})
    events = [
        event("alice", NOW, 100, department="research"),
        event("bob", NOW, 700, department="research"),
    ]
    usages = fold_events(events, cfg)
    current = decide(usages["alice"], cfg, NOW, group_usage(usages.values()))
    [alert] = alerts(current, cfg=cfg)
    assert (alert.budget, alert.threshold, alert.tokens_used) == ("department:research", 75, 800)
    assert alert.alert_id == "alice|daily|2026-05-10T00:00:00+00:00|warning|75|department:research"
