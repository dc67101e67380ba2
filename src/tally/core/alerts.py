"""Alerts: threshold crossings, each sent once per user, period and threshold.

Every warning threshold reached, the limit itself (threshold 100) and the return to ok in
a new period (threshold 0) make one alert each. The alert_id is the dedupe key; callers
keep the ids they have sent and pass them back in, so a replayed decision alerts nobody.
"""

from __future__ import annotations

from collections.abc import Iterator, Set

from tally.config.models import PerUserBudgets
from tally.core.periods import calendar_for
from tally.core.policy import (
    action_message,
    action_notifies_admin,
    crossed_warnings,
    template_values,
    warning_message,
)
from tally.core.templates import render
from tally.wire import AlertKind, BudgetAlerted, BudgetDecided, PeriodStatus

__all__ = ["RESET_MESSAGE", "alert_id", "new_alerts"]

RESET_MESSAGE = "Your {period} budget has reset."


def alert_id(
    user_id: str, status: PeriodStatus, kind: AlertKind, threshold: int, budget: str = "user"
) -> str:
    """user_id|period|period_start|kind|threshold, plus |budget for a shared budget."""
    key = f"{user_id}|{status.period}|{status.period_start.isoformat()}|{kind}|{threshold}"
    return key if budget == "user" else f"{key}|{budget}"


def new_alerts(
    previous: BudgetDecided | None,
    current: BudgetDecided,
    budgets: PerUserBudgets,
    sent_ids: Set[str],
) -> list[BudgetAlerted]:
    """The alerts `current` calls for that are not in `sent_ids` (nor repeated here)."""
    if not budgets.enabled:
        return []
    found: list[BudgetAlerted] = []
    seen = set(sent_ids)
    for alert in _candidates(previous, current, budgets):
        if alert.alert_id not in seen:
            seen.add(alert.alert_id)
            found.append(alert)
    return found


def _candidates(
    previous: BudgetDecided | None, current: BudgetDecided, budgets: PerUserBudgets
) -> Iterator[BudgetAlerted]:
    for budget, status in _judged(current, budgets):
        yield from _crossings(current, budget, status, budgets)
    if previous is not None:
        yield from _reset(previous, current)


def _judged(decision: BudgetDecided, budgets: PerUserBudgets) -> list[tuple[str, PeriodStatus]]:
    """The user's own periods, and the shared budget's period when one drove it."""
    own = [("user", status) for status in decision.periods.values()]
    if decision.budget == "user":
        return own
    return [*own, (decision.budget, _driving(decision, budgets))]


def _driving(decision: BudgetDecided, budgets: PerUserBudgets) -> PeriodStatus:
    # A shared budget runs on the same calendar as the user's (who may have no limit of
    # that kind, and so no status of it in the decision).
    window = calendar_for(budgets.reset_schedule).window(decision.period, decision.as_of)
    return PeriodStatus(
        period=decision.period,
        period_start=window.start,
        tokens_used=decision.tokens_used,
        tokens_limit=decision.tokens_limit,
        tokens_remaining=decision.tokens_remaining,
        percent_used=decision.percent_used,
        status=decision.status,
        reset_time=decision.reset_time,
    )


def _crossings(
    decision: BudgetDecided, budget: str, status: PeriodStatus, budgets: PerUserBudgets
) -> Iterator[BudgetAlerted]:
    values = template_values(status)
    for warning in crossed_warnings(budgets.warnings, status.percent_used):
        message = render(warning_message(warning, budgets), values)
        yield _alert(decision, budget, status, "warning", warning.at_percent, message, False)
    if status.status == "over_limit":
        message = render(action_message(budgets), values)
        notify = action_notifies_admin(budgets)
        yield _alert(decision, budget, status, "limit", 100, message, notify)


def _reset(previous: BudgetDecided, current: BudgetDecided) -> Iterator[BudgetAlerted]:
    if previous.status == "ok" or current.status != "ok":
        return
    before = previous.periods.get(previous.period)
    now = current.periods.get(previous.period)  # None: that period's limit was taken away
    if before is not None and now is not None and now.period_start != before.period_start:
        message = render(RESET_MESSAGE, template_values(now))
        yield _alert(current, previous.budget, now, "reset", 0, message, False)


def _alert(
    decision: BudgetDecided,
    budget: str,
    status: PeriodStatus,
    kind: AlertKind,
    threshold: int,
    message: str,
    notify_admin: bool,
) -> BudgetAlerted:
    return BudgetAlerted(
        alert_id=alert_id(decision.user_id, status, kind, threshold, budget),
        user_id=decision.user_id,
        kind=kind,
        period=status.period,
        period_start=status.period_start,
        threshold=threshold,
        percent_used=status.percent_used,
        tokens_used=status.tokens_used,
        tokens_limit=status.tokens_limit,
        budget=budget,
        message=message,
        notify_admin=notify_admin,
        as_of=decision.as_of,
    )
