"""Usage history for the dashboard: GET /history on the projector, behind the admin rule.

One DuckDB query over the ledger (on a cursor of its own, like the audit endpoint) gives
tokens per user, daily period and model for the last `days` daily periods (the reset
schedule's days, today included). The answer:

    {"days": ["2026-11-03T00:00:00+00:00", ...],          # period starts, oldest first
     "team": [tokens per day, ...],                        # everyone, per day
     "models": {"openai/gpt-4.1": tokens, ...},            # everyone, over all the days
     "users": {"user_alice": {"total": tokens,
                              "days": {"openai/gpt-4.1": [tokens per day, ...], ...}}}}

Limits are not here: the enforcer's decisions carry each user's current daily limit, and
the dashboard draws that. Only the admin may ask (401/403 as on the enforcer, same rule);
the enforcer's dashboard reaches it through GET /api/admin/history, which forwards the
caller's credential, so the page stays same-origin.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime
from typing import Any

import duckdb
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tally.access import Access
from tally.auth import AuthError
from tally.config.models import Config
from tally.core import calendar_for, last_days
from tally.service import decimal
from tally.services.projector.query import AuditError, Dropping, settled

__all__ = ["DEFAULT_DAYS", "MAX_DAYS", "history", "history_routes"]

DEFAULT_DAYS = 30
MAX_DAYS = 366

QUERY = """
SELECT user_id, daily_start, model, sum(tokens)::BIGINT AS tokens
FROM ledger
WHERE daily_start >= $first
GROUP BY ALL
ORDER BY user_id, model
"""


def history(cursor: duckdb.DuckDBPyConnection, config: Config, now: datetime,
            days: int = DEFAULT_DAYS) -> dict[str, Any]:
    """The last `days` daily periods up to `now`, from the ledger (see the module doc)."""
    calendar = calendar_for(config.budgets.per_user_budgets.reset_schedule)
    windows = last_days(calendar, now, days)
    index = {window.start: i for i, window in enumerate(windows)}
    team = [0] * days
    models: dict[str, int] = {}
    users: dict[str, dict[str, Any]] = {}
    for user_id, start, model, tokens in cursor.execute(QUERY, {"first": windows[0].start}
                                                        ).fetchall():
        day = index.get(start)
        if day is None:  # after `now` (an event stamped in the future): not history
            continue
        user = users.setdefault(user_id, {"total": 0, "days": {}})
        user["days"].setdefault(model, [0] * days)[day] += tokens
        user["total"] += tokens
        team[day] += tokens
        models[model] = models.get(model, 0) + tokens
    return {"days": [w.start.isoformat() for w in windows], "team": team,
            "models": dict(sorted(models.items(), key=lambda m: -m[1])), "users": users}


# How long /history waits for the deletion of partitions lost in a rebalance.
SETTLE_SECONDS = 10.0


def history_routes(con: duckdb.DuckDBPyConnection, config: Config,
                   clock: Callable[[], datetime], access: Access | None = None,
                   dropping: Dropping | None = None) -> list[Route]:
    """GET /history?days=N (1..MAX_DAYS, default DEFAULT_DAYS), for an admin only (the
    audit's door: `access`, else one built from `config`). `dropping`: as the audit's, so
    that no user of a partition lost in a rebalance is in the answer (503 past
    SETTLE_SECONDS)."""
    access = access or Access.build(config)

    async def endpoint(request: Request) -> Response:
        try:
            access.admin(request)
        except AuthError as error:
            headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
            return _json({"error": error.reason, "details": []}, error.status, headers)
        days = decimal(request.query_params.get("days", str(DEFAULT_DAYS)))
        if days is None or not 1 <= days <= MAX_DAYS:
            return _json({"error": "bad days",
                          "details": [f"days must be an integer from 1 to {MAX_DAYS}"]}, 400)
        try:
            await settled(dropping, SETTLE_SECONDS)
        except AuditError as error:
            return _json({"error": str(error), "details": []}, error.status)
        cursor = con.cursor()  # made on the loop thread, used by one worker thread
        try:
            body = await asyncio.to_thread(history, cursor, config, clock(), days)
        finally:
            cursor.close()
        return _json(body)

    return [Route("/history", endpoint, methods=["GET"])]


def _json(content: object, status: int = 200,
          headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content), status, headers, media_type="application/json")
