"""Limits: base limits per user, the rollover chain, and department/project budgets.

Base limits are chosen field by field: the user's override, else (daily only) the limit of
the user's role, else the default. With rollover enabled, a period's limit is its base
limit plus min(max_rollover_tokens, max(0, previous limit - previous use)), where the
previous period is the one just before, of the same kind; the chain starts at the first
period with usage, into which nothing rolls. The chain is evaluated with today's base
limits, so a config change re-prices the past as well.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from tally.config.models import Limits, PerUserBudgets, Rollover
from tally.core.periods import Calendar, Window
from tally.core.usage import PeriodUsage, UserUsage
from tally.wire import PeriodName

__all__ = [
    "GroupUsage",
    "base_limits",
    "group_budgets",
    "group_usage",
    "period_limit",
    "rolled_limit",
]


@dataclass(frozen=True, slots=True)
class GroupUsage:
    """A department's or project's usage: the sum of its members' usage per period."""

    name: str  # "department:research", "project:atlas"
    periods: Mapping[PeriodName, Mapping[datetime, int]] = field(default_factory=dict)


def base_limits(budgets: PerUserBudgets, user_id: str, role: str | None) -> Limits:
    """Override > role (daily only) > default, each limit on its own."""
    override = budgets.user_overrides.get(user_id)
    daily = override.daily_tokens if override else None
    if daily is None and role is not None:
        daily = budgets.role_limits.get(role)
    if daily is None:
        daily = budgets.default_limits.daily_tokens
    monthly = override.monthly_tokens if override else None
    if monthly is None:
        monthly = budgets.default_limits.monthly_tokens
    return Limits(daily_tokens=daily, monthly_tokens=monthly)


def rolled_limit(
    base: int,
    rollover: Rollover,
    used: Mapping[datetime, int],
    window: Window,
    calendar: Calendar,
) -> int:
    """The limit of `window` once unused tokens of earlier periods have rolled in."""
    if not rollover.enabled:
        return base
    starts = sorted(start for start, tokens in used.items() if tokens > 0 and start < window.start)
    if not starts:
        return base
    cap = rollover.max_rollover_tokens
    current, limit = calendar.window(window.kind, starts[0]), base
    while current.start < window.start:
        spent = used.get(current.start, 0)
        following = base + min(cap, max(0, limit - spent))
        if spent == 0 and following == limit:
            # A fixed point: every empty period from here on has this same limit, so skip
            # straight to the next period with usage.
            later = bisect_right(starts, current.start)
            if later == len(starts):
                return limit
            current = calendar.window(window.kind, starts[later])
            continue
        current, limit = calendar.next(current), following
    return limit


def group_budgets(
    budgets: PerUserBudgets, department: str | None, project: str | None
) -> list[tuple[str, Limits]]:
    """The shared budgets a user belongs to, named as in BudgetDecided.budget."""
    found: list[tuple[str, Limits]] = []
    if department is not None and department in budgets.department_budgets:
        found.append((f"department:{department}", budgets.department_budgets[department]))
    if project is not None and project in budgets.project_budgets:
        found.append((f"project:{project}", budgets.project_budgets[project]))
    return found


def group_usage(usages: Iterable[UserUsage]) -> dict[str, GroupUsage]:
    """Usage per department and project, summed over their members."""
    groups: dict[str, dict[PeriodName, dict[datetime, int]]] = {}
    for usage in usages:
        for name in _memberships(usage):
            group = groups.setdefault(name, {})
            for kind, totals in usage.periods.items():
                _add_into(group.setdefault(kind, {}), totals)
    return {name: GroupUsage(name, periods) for name, periods in groups.items()}


def _memberships(usage: UserUsage) -> list[str]:
    names = [f"department:{usage.department}"] if usage.department is not None else []
    return names + ([f"project:{usage.project}"] if usage.project is not None else [])


def _add_into(total: dict[datetime, int], periods: Mapping[datetime, int]) -> None:
    for start, tokens in periods.items():
        total[start] = total.get(start, 0) + tokens


def period_limit(
    base: int, budgets: PerUserBudgets, usage: PeriodUsage, window: Window, calendar: Calendar
) -> int:
    """One period's limit for a user or a group: its base limit, rolled over if enabled."""
    used = usage.periods.get(window.kind, {})
    return rolled_limit(base, budgets.rollover, used, window, calendar)
