"""The pure budget core: periods, usage folds, limits, the policy and alerts.

No I/O, no asyncio, no clock: `now` is always an argument. The live services, replay and
`tally simulate` all call these same functions.
"""

from tally.core.alerts import RESET_MESSAGE, alert_id, new_alerts
from tally.core.limits import (
    GroupUsage,
    base_limits,
    group_budgets,
    group_usage,
    period_limit,
    rolled_limit,
    usage_in,
)
from tally.core.periods import (
    PERIODS,
    Calendar,
    Window,
    calendar_for,
    daily_window,
    last_days,
    monthly_window,
    next_window,
    parse_reset_time,
    previous_window,
    roll_up,
    window_of,
    windows_at,
)
from tally.core.policy import (
    SEVERITY,
    Standing,
    action_message,
    decide,
    percent_used,
    period_status,
    standings,
)
from tally.core.report import budget_row, budgets_report, known_usages
from tally.core.templates import PLACEHOLDERS, placeholders_in, render
from tally.core.usage import (
    Fold,
    MemoryStore,
    PeriodUsage,
    UsageStore,
    UserUsage,
    counted_tokens,
    fold_events,
    from_balance,
    to_balance,
    with_labels,
)

__all__ = [
    "PERIODS",
    "PLACEHOLDERS",
    "RESET_MESSAGE",
    "SEVERITY",
    "Calendar",
    "Fold",
    "GroupUsage",
    "MemoryStore",
    "PeriodUsage",
    "Standing",
    "UsageStore",
    "UserUsage",
    "Window",
    "action_message",
    "alert_id",
    "base_limits",
    "budget_row",
    "budgets_report",
    "calendar_for",
    "counted_tokens",
    "daily_window",
    "decide",
    "fold_events",
    "from_balance",
    "group_budgets",
    "group_usage",
    "known_usages",
    "last_days",
    "monthly_window",
    "new_alerts",
    "next_window",
    "parse_reset_time",
    "percent_used",
    "period_limit",
    "period_status",
    "placeholders_in",
    "previous_window",
    "render",
    "roll_up",
    "rolled_limit",
    "standings",
    "to_balance",
    "usage_in",
    "window_of",
    "windows_at",
    "with_labels",
]
