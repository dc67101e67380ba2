"""The enforcer's live view, for its HTTP API: every decision, recent alerts, open streams.

The enforcer already holds every user's usage and current decision in memory, so one call
answers for everyone with no query per user and no reader on the projector's DuckDB. The
loop calls `record` after each publish; handlers read through `rows`, `mine`, `alerts`
and `snapshot`, which only shape what the core computed.
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from datetime import datetime
from typing import Any, get_args

from tally.core.report import budget_row
from tally.ops import Metrics
from tally.services.enforcer.responses import dashboard_row, my_budget
from tally.services.enforcer.state import Enforcer, Outcome
from tally.services.enforcer.stream import Hub, sse_frame
from tally.wire import BudgetAlerted, BudgetDecided, StatusName

__all__ = ["MAX_ALERTS", "STATUSES", "Board", "Filters"]

MAX_ALERTS = 1000  # recent alerts kept for GET /api/admin/alerts and the dashboard
STATUSES: tuple[str, ...] = get_args(StatusName)

Filters = dict[str, str]  # status / role / department -> the value a row must have


class Board:
    """What the API shows; `record` keeps it current and tells the open streams."""

    def __init__(self, enforcer: Enforcer, metrics: Metrics | None = None,
                 hub: Hub | None = None, max_alerts: int = MAX_ALERTS) -> None:
        self.enforcer = enforcer
        self.metrics = metrics or Metrics()
        self.hub = hub or Hub()
        self._alerts: deque[BudgetAlerted] = deque(maxlen=max_alerts)
        self.count_statuses()

    def record(self, outcome: Outcome) -> None:
        """After a publish: count it, keep the alerts, push both to every open stream."""
        for decision in outcome.decisions:
            self.metrics.decisions_published.labels(decision.status).inc()
        for alert in outcome.alerts:
            self.metrics.alerts_published.labels(alert.kind).inc()
        self._alerts.extend(outcome.alerts)
        if outcome.decisions:
            self.count_statuses()
        if outcome and len(self.hub):
            self.hub.publish(self._frames(outcome))

    def hear(self, decisions: list[BudgetDecided], alerts: list[BudgetAlerted]) -> None:
        """What was read back from the topics (heard.py): the other instances' decisions,
        and every alert (an earlier run's, at start). Shown and streamed, not counted as
        published here; an alert this instance sent itself is in the list already.
        Partitions interleave, so the alerts are ordered by time."""
        kept = {a.alert_id for a in self._alerts}
        fresh = sorted((a for a in alerts if a.alert_id not in kept), key=lambda a: a.as_of)
        self._alerts.extend(fresh)
        if decisions:
            self.count_statuses()
        if (decisions or fresh) and len(self.hub):
            self.hub.publish(self._frames(Outcome(decisions, fresh)))

    def count_statuses(self) -> None:
        counts: Counter[str] = Counter(d.status for d, _ in self.enforcer.current())
        for status in STATUSES:
            self.metrics.decisions.labels(status).set(counts[status])

    def _frames(self, outcome: Outcome) -> list[bytes]:
        labelled = {usage.user_id: usage for _, usage in self.enforcer.current()}
        return ([sse_frame("decision", dashboard_row(d, labelled.get(d.user_id)))
                 for d in outcome.decisions]
                + [sse_frame("alert", a.model_dump(mode="json")) for a in outcome.alerts])

    def rows(self, filters: Filters) -> list[dict[str, Any]]:
        """Every user's row in the brief's shape, sorted by user, filtered."""
        return [budget_row(decision) for decision, usage in self.enforcer.current()
                if _matches(filters, decision.status, usage.role, usage.department)]

    def mine(self, user_id: str, now: datetime) -> dict[str, Any]:
        return my_budget(self.enforcer.decision_for(user_id, now))

    def alerts(self, limit: int) -> list[dict[str, Any]]:
        """Newest first."""
        newest = list(self._alerts)[::-1][:limit]
        return [alert.model_dump(mode="json") for alert in newest]

    def snapshot(self) -> dict[str, Any]:
        """A new stream's first event: every row with its labels, and the recent alerts."""
        return {"users": [dashboard_row(d, u) for d, u in self.enforcer.current()],
                "alerts": self.alerts(len(self._alerts))}

    def open_stream(self) -> tuple[asyncio.Queue[bytes | None], bytes]:
        """Subscribe, then snapshot, in one step: nothing published in between is lost."""
        queue = self.hub.subscribe()
        return queue, sse_frame("snapshot", self.snapshot())


def _matches(filters: Filters, status: str, role: str | None, department: str | None) -> bool:
    found = {"status": status, "role": role, "department": department}
    return all(found[key] == value for key, value in filters.items())
