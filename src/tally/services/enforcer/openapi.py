"""The OpenAPI 3.1 document of the enforcer's API, served at GET /openapi.json.

Paths are written here; every body schema is generated from the models in responses.py,
which the tests also validate real responses against, so the document cannot drift from
what the endpoints send.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tally.services.enforcer.responses import (
    AlertsResponse,
    BudgetsResponse,
    DashboardRow,
    ErrorBody,
    MyBudget,
    UsageHistory,
)

__all__ = ["openapi_document"]

REF = "#/components/schemas/{model}"
MODELS: list[type[BaseModel]] = [BudgetsResponse, MyBudget, AlertsResponse, DashboardRow,
                                 ErrorBody, UsageHistory]
STATUS_VALUES = ["ok", "warning", "over_limit"]

STREAM_TEXT = """Server-sent events (text/event-stream) for the dashboard. Authenticate with
the Authorization header like every other endpoint: the dashboard reads the stream with
fetch(), not EventSource, so no token ever travels in a URL. Events:
`snapshot` (first; data: {"users": [DashboardRow], "alerts": [BudgetAlerted]}),
`decision` (data: DashboardRow, one per changed decision) and `alert` (data: BudgetAlerted).
Comment lines (`: keepalive`) are sent when idle. A stream that falls far behind is closed;
reconnect for a fresh snapshot."""


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {400: "bad query parameter", 401: "no credentials, or an unknown API key, or "
               "an expired or badly signed JWT", 403: "authenticated, but not an admin",
               503: "the projector does not answer"}
    return {str(s): _json(ErrorBody, reasons[s]) for s in statuses}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema}


def _paths() -> dict[str, Any]:
    admin = {"security": [{"bearer": []}, {"apiKey": []}], "tags": ["admin"]}
    return {
        "/api/admin/budgets": {"get": {
            **admin, "summary": "Every user's budget and current decision, sorted by user",
            "parameters": [_query("status", "only users with this status",
                                  {"type": "string", "enum": STATUS_VALUES}),
                           _query("role", "only users with this role", {"type": "string"}),
                           _query("department", "only users of this department",
                                  {"type": "string"})],
            "responses": {"200": _json(BudgetsResponse, "every user"), **_errors(400, 401, 403)},
        }},
        "/api/admin/alerts": {"get": {
            **admin, "summary": "Recent alerts, newest first",
            "parameters": [_query("limit", "at most this many (default 100)",
                                  {"type": "integer", "minimum": 1, "maximum": 1000})],
            "responses": {"200": _json(AlertsResponse, "alerts"), **_errors(400, 401, 403)},
        }},
        "/api/admin/stream": {"get": {
            **admin, "summary": "Live decisions and alerts (server-sent events)",
            "description": STREAM_TEXT,
            "responses": {"200": {"description": "the event stream",
                                  "content": {"text/event-stream": {"schema": {
                                      "type": "string"}}}}, **_errors(401, 403)},
        }},
        "/api/admin/history": {"get": {
            **admin, "summary": "Daily use per user and model, and the team's total per day",
            "description": "Read from the projector's ledger (its GET /history, relayed "
                           "with the caller's credential). 503 when the projector does "
                           "not answer.",
            "parameters": [_query("days", "this many daily periods up to today (default 30)",
                                  {"type": "integer", "minimum": 1, "maximum": 366})],
            "responses": {"200": _json(UsageHistory, "the history"),
                          **_errors(400, 401, 403, 503)},
        }},
        "/api/budgets/me": {"get": {
            "security": [{"bearer": []}, {"apiKey": []}], "tags": ["user"],
            "summary": "The caller's own budget, decision and reset times",
            "responses": {"200": _json(MyBudget, "the caller's budget"), **_errors(401)},
        }},
    }


def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema([(m, "serialization") for m in MODELS], ref_template=REF)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Tally enforcer API", "version": "1",
                 "description": "Per-user token budgets: the admin view, a user's own "
                                "budget, recent alerts and a live stream. Also served, "
                                "without authentication: /admin (the dashboard), /metrics, "
                                "/healthz, /readyz."},
        "paths": _paths(),
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "a JWT (auth.yaml) or an API key from users.yaml"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }
