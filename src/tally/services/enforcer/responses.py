"""The bodies the enforcer's HTTP API answers with, as models: one source for the code, the
tests (which validate real responses against them) and the OpenAPI document.

Rows are built by the core (`tally.core.report.budget_row`); these models only describe
them. `extra="forbid"` makes a test fail the day a row grows a key the brief does not have.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from tally.core.report import budget_row
from tally.core.usage import UserUsage
from tally.wire import BudgetAlerted, BudgetDecided, StatusName

__all__ = [
    "AlertsResponse",
    "BudgetRow",
    "BudgetsResponse",
    "DashboardRow",
    "ErrorBody",
    "MyBudget",
    "UsageHistory",
    "UserHistory",
    "dashboard_row",
    "my_budget",
]


class Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UserHistory(Body):
    """One user's tokens per model, each a list with one figure per day of `days`."""

    total: int
    days: dict[str, list[int]]


class UsageHistory(Body):
    """GET /api/admin/history (the projector's GET /history, relayed)."""

    days: list[str]  # daily period starts, ISO 8601, oldest first, today last
    team: list[int]  # everyone's tokens per day
    models: dict[str, int]  # everyone's tokens per model over the days, largest first
    users: dict[str, UserHistory]


class BudgetRow(Body):
    """The brief's row, with the user's current decision appended."""

    user_id: str
    daily_used: int
    daily_limit: int
    daily_remaining: int
    monthly_used: int
    monthly_limit: int
    # added, only where the user has a weekly limit
    weekly_used: int | None = None
    weekly_limit: int | None = None
    weekly_remaining: int | None = None
    status: StatusName
    decision: BudgetDecided


class BudgetsResponse(Body):
    """GET /api/admin/budgets: every user, sorted by user_id."""

    users: list[BudgetRow]


class MyBudget(BudgetRow):
    """GET /api/budgets/me: the caller's row, with each period's reset time spelled out."""

    daily_reset_time: str
    monthly_reset_time: str
    weekly_reset_time: str | None = None  # added, with a weekly limit


class AlertsResponse(Body):
    """GET /api/admin/alerts: the most recent alerts, newest first."""

    alerts: list[BudgetAlerted]


class DashboardRow(BudgetRow):
    """A row as the dashboard stream sends it: with the labels it searches and shows."""

    role: str | None
    department: str | None


class ErrorBody(Body):
    """Every 4xx: what went wrong, and details where there are several things to say."""

    error: str
    details: list[str] = []


def my_budget(decision: BudgetDecided) -> dict[str, Any]:
    resets = {f"{kind}_reset_time": status.reset_time
              for kind, status in decision.periods.items()}
    return {**budget_row(decision), **resets}


def dashboard_row(decision: BudgetDecided, usage: UserUsage | None) -> dict[str, Any]:
    role = usage.role if usage is not None else None
    department = usage.department if usage is not None else None
    return {**budget_row(decision), "role": role, "department": department}
