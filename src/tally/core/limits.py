"""Limits: base limits per user, the rollover chain, and department/project budgets.

Base limits are chosen period kind by kind: the user's override, else the limit of the
user's role (a bare number is a daily limit), else the default; a kind that none of them
sets has no limit. With rollover enabled, a period's limit is its base limit plus
min(max_rollover_tokens, max(0, previous limit - previous use)), where the previous period
is the one just before, of the same kind; the chain starts at the first period with usage,
into which nothing rolls. The chain is evaluated with today's base
limits, so a config change re-prices the past as well.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from tally.config.models import Limits, PartialLimits, PerUserBudgets, Rollover
from tally.core.periods import PERIODS, Calendar, Window, roll_up
from tally.core.usage import PeriodUsage, UserUsage
from tally.wire import PeriodName

__all__ = [
    "GroupUsage",
    "base_limits",
    "group_budgets",
    "group_usage",
    "period_limit",
    "rolled_limit",
    "usage_in",
    "used_in",
]


@dataclass(frozen=True, slots=True)
class GroupUsage:
    """A department's or project's usage: the sum of its members' usage per period."""

    name: str  # "department:research", "project:atlas"
    periods: Mapping[PeriodName, Mapping[datetime, int]] = field(default_factory=dict)


def base_limits(budgets: PerUserBudgets, user_id: str, role: str | None) -> Limits:
    """Override > role > default, each period kind on its own."""
    layers = [budgets.user_overrides.get(user_id), _role_limits(budgets, role),
              budgets.default_limits]
    chosen = {f"{kind}_tokens": next((found for layer in layers if layer is not None
                                      if (found := layer.tokens(kind)) is not None), None)
              for kind in PERIODS}
    return Limits.model_validate(chosen)


def _role_limits(budgets: PerUserBudgets, role: str | None) -> PartialLimits | None:
    found = budgets.role_limits.get(role) if role is not None else None
    if isinstance(found, int):  # the brief's form: a role's daily limit
        return PartialLimits(daily_tokens=found)
    return found


def usage_in(usage: PeriodUsage, kind: PeriodName, calendar: Calendar) -> Mapping[datetime, int]:
    """Tokens per period start of `kind`, from the usage's days: every period is made of
    whole days, so a changed reset day applies at once, and to every period, past ones
    included, whatever schedule the periods were folded under."""
    days = usage.periods.get("daily", {})
    return days if kind == "daily" else roll_up(days, kind, calendar)


def used_in(usage: PeriodUsage, window: Window) -> int:
    """Tokens used in one period, from the usage's days (see usage_in)."""
    days = usage.periods.get("daily", {})
    if window.kind == "daily":
        return days.get(window.start, 0)  # the one day: no need to scan them all
    return sum(tokens for start, tokens in days.items() if start in window)


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
    """Usage per department and project, summed over their members, kind by kind."""
    totals: dict[str, dict[PeriodName, dict[datetime, int]]] = {}
    for usage in usages:
        for name in _memberships(usage):
            group = totals.setdefault(name, {})
            for kind, periods in usage.periods.items():
                _add_into(group.setdefault(kind, {}), periods)
    return {name: GroupUsage(name, periods) for name, periods in totals.items()}


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
    if not budgets.rollover.enabled:
        return base  # and no need to roll the days up into periods
    return rolled_limit(base, budgets.rollover, usage_in(usage, window.kind, calendar), window,
                        calendar)
