"""The policy: usage + limits + now -> BudgetDecided.

A period is over_limit when used >= limit (so a zero limit is over at once), warning when
percent_used reaches the lowest warning threshold, else ok. A budget's status is the worst
of its periods (every kind it has a limit for); on a tie the period with the higher
percent_used drives it, then the longer period. Department and project budgets are judged
the same way and the most restrictive budget wins (worse status, then higher percent_used,
then the user's own budget).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from tally.config.models import (
    HardStop,
    Limits,
    PerUserBudgets,
    ReducedPriority,
    SoftLimit,
    Warning,
)
from tally.core.limits import GroupUsage, base_limits, group_budgets, period_limit, used_in
from tally.core.periods import PERIODS, Calendar, Window, Windows, calendar_for
from tally.core.templates import render
from tally.core.usage import PeriodUsage, UserUsage
from tally.wire import (
    MAX_AMOUNT,
    ActionName,
    BudgetDecided,
    PeriodName,
    PeriodStatus,
    StatusName,
)

__all__ = [
    "SEVERITY",
    "Standing",
    "action_message",
    "action_notifies_admin",
    "crossed_warnings",
    "decide",
    "percent_used",
    "period_status",
    "standing",
    "standings",
    "template_values",
    "warning_message",
]

SEVERITY: Mapping[StatusName, int] = {"ok": 0, "warning": 1, "over_limit": 2}


@dataclass(frozen=True, slots=True)
class Standing:
    """One budget (the user's own, or a group's) against each period kind it has a limit
    for, shortest first."""

    budget: str
    periods: Mapping[PeriodName, PeriodStatus]

    @property
    def driving(self) -> PeriodStatus:
        return max(self.periods.values(), key=_period_rank)


def _period_rank(status: PeriodStatus) -> tuple[int, int, int]:
    return SEVERITY[status.status], status.percent_used, PERIODS.index(status.period)


def _standing_rank(standing: Standing) -> tuple[int, int]:
    driving = standing.driving
    return SEVERITY[driving.status], driving.percent_used


def percent_used(used: int, limit: int) -> int:
    """floor(100 * used / limit); 100 when the limit is 0; at most MAX_AMOUNT (the wire's
    range: a gateway keeps it in 64 bits)."""
    return 100 if limit == 0 else min(MAX_AMOUNT, (100 * used) // limit)


def period_status(
    window: Window, used: int, limit: int, warnings: tuple[Warning, ...], zone: ZoneInfo
) -> PeriodStatus:
    percent = percent_used(used, limit)
    return PeriodStatus(
        period=window.kind,
        period_start=window.start,
        tokens_used=used,
        tokens_limit=limit,
        tokens_remaining=max(0, limit - used),
        percent_used=percent,
        status=_status(used, limit, percent, warnings),
        reset_time=window.end.astimezone(zone).isoformat(),
    )


def _status(used: int, limit: int, percent: int, warnings: tuple[Warning, ...]) -> StatusName:
    if used >= limit:
        return "over_limit"
    if warnings and percent >= min(w.at_percent for w in warnings):
        return "warning"
    return "ok"


def crossed_warnings(warnings: tuple[Warning, ...], percent: int) -> list[Warning]:
    """The warnings reached at `percent`, lowest threshold first."""
    return sorted((w for w in warnings if percent >= w.at_percent), key=lambda w: w.at_percent)


def standing(
    budget: str,
    usage: PeriodUsage,
    limits: Limits,
    budgets: PerUserBudgets,
    windows: Windows,
    calendar: Calendar,
) -> Standing:
    """How one budget stands in `windows` (windows_at's), in each kind it has a limit for."""
    bases = limits.by_period()
    statuses = {}
    for window in windows:
        if window.kind in bases:
            limit = period_limit(bases[window.kind], budgets, usage, window, calendar)
            used = used_in(usage, window)
            statuses[window.kind] = period_status(window, used, limit, budgets.warnings,
                                                  calendar.zone)
    return Standing(budget, statuses)


def standings(
    usage: UserUsage,
    budgets: PerUserBudgets,
    now: datetime,
    groups: Mapping[str, GroupUsage] | None = None,
) -> list[Standing]:
    """The user's own standing first, then each department/project budget they are in.

    A group missing from `groups` is judged on this user's usage alone: a lower bound of
    the group's, as the user is a member.
    """
    calendar = calendar_for(budgets.reset_schedule)
    windows = calendar.windows_at(now)
    own = base_limits(budgets, usage.user_id, usage.role)
    found = [standing("user", usage, own, budgets, windows, calendar)]
    for name, limits in group_budgets(budgets, usage.department, usage.project):
        group: PeriodUsage = (groups or {}).get(name, usage)
        found.append(standing(name, group, limits, budgets, windows, calendar))
    return found


def decide(
    usage: UserUsage,
    budgets: PerUserBudgets,
    now: datetime,
    groups: Mapping[str, GroupUsage] | None = None,
) -> BudgetDecided:
    """What the gateway should do for this user at `now`.

    With budgets disabled the figures are still reported, but the decision is always to
    allow, with no message.
    """
    found = standings(usage, budgets, now, groups)
    chosen = max(found, key=_standing_rank)  # max keeps the first of equals: the user's own
    driving = chosen.driving
    values = template_values(driving)
    status: StatusName = driving.status if budgets.enabled else "ok"
    action = _action(status, budgets)
    footer = render(budgets.budget_footer, values) if budgets.include_budget_in_response else None
    # one keyword per period kind with a limit: daily=, monthly=, ...
    own: dict[str, Any] = {kind: status for kind, status in found[0].periods.items()}
    return BudgetDecided(
        user_id=usage.user_id,
        status=status,
        action=action,
        period=driving.period,
        budget=chosen.budget,
        percent_used=driving.percent_used,
        tokens_used=driving.tokens_used,
        tokens_limit=driving.tokens_limit,
        tokens_remaining=driving.tokens_remaining,
        reset_time=driving.reset_time,
        message=_message(status, driving, budgets, values),
        footer=footer if budgets.enabled else None,
        force_model=_force_model(action, budgets),
        status_code=_status_code(action, budgets),
        **own,
        as_of=now,
    )


def template_values(period: PeriodStatus) -> dict[str, object]:
    return {
        "percent_used": period.percent_used,
        "period": period.period,
        "tokens_used": period.tokens_used,
        "tokens_limit": period.tokens_limit,
        "tokens_remaining": period.tokens_remaining,
        "reset_time": period.reset_time,
    }


def _action(status: StatusName, budgets: PerUserBudgets) -> ActionName:
    if status == "ok":
        return "allow"
    if status == "warning":
        return "warn"
    return budgets.on_limit_exceeded.action


def _message(
    status: StatusName, driving: PeriodStatus, budgets: PerUserBudgets, values: dict[str, object]
) -> str | None:
    if status == "ok":
        return None
    if status == "over_limit":
        return render(action_message(budgets), values)
    crossed = crossed_warnings(budgets.warnings, driving.percent_used)
    return render(warning_message(crossed[-1] if crossed else None, budgets), values)


def warning_message(warning: Warning | None, budgets: PerUserBudgets) -> str:
    """A warning's own message; a blank one defers to on_approaching_limit's template."""
    if warning is not None and warning.message.strip():
        return warning.message
    return budgets.on_approaching_limit.message_template


def chosen_action(budgets: PerUserBudgets) -> SoftLimit | HardStop | ReducedPriority:
    """The settings of the configured on_limit_exceeded action."""
    exceeded = budgets.on_limit_exceeded
    choices: dict[str, SoftLimit | HardStop | ReducedPriority] = {
        "soft_limit": exceeded.soft_limit,
        "hard_stop": exceeded.hard_stop,
        "reduced_priority": exceeded.reduced_priority,
    }
    return choices[exceeded.action]


def action_message(budgets: PerUserBudgets) -> str:
    """The message template of the configured on_limit_exceeded action."""
    return chosen_action(budgets).message


def action_notifies_admin(budgets: PerUserBudgets) -> bool:
    return chosen_action(budgets).notify_admin


def _status_code(action: ActionName, budgets: PerUserBudgets) -> int | None:
    return budgets.on_limit_exceeded.hard_stop.status_code if action == "hard_stop" else None


def _force_model(action: ActionName, budgets: PerUserBudgets) -> str | None:
    if action != "reduced_priority":
        return None
    return budgets.on_limit_exceeded.reduced_priority.force_model
