"""The budgets API through the real Starlette app, over an Enforcer filled in memory.

Every body is validated against the models the OpenAPI document is generated from, so a
row with a key the brief does not have fails here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from tally.services.enforcer.responses import AlertsResponse, BudgetsResponse, MyBudget
from tally.simulate import simulate

from .kit import (
    BUDGETS,
    KEYS,
    NOON,
    USAGE,
    USERS,
    asgi_client,
    balances,
    bearer,
    config,
    events,
    filled_board,
    token,
)

ADMIN = {"x-api-key": KEYS["carol"]}
BRIEF_KEYS = ["user_id", "daily_used", "daily_limit", "daily_remaining", "monthly_used",
              "monthly_limit", "status"]


async def get(path: str, headers: dict[str, str] = ADMIN, **params: Any) -> Any:
    async with asgi_client(filled_board()) as client:
        response = await client.get(path, headers=headers, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def test_admin_budgets_lists_every_user_in_the_briefs_shape_sorted() -> None:
    body = await get("/api/admin/budgets")
    BudgetsResponse.model_validate(body)
    assert [row["user_id"] for row in body["users"]] == ["alice", "bob", "carol", "dave", "erin"]
    assert all(list(row) == [*BRIEF_KEYS, "decision"] for row in body["users"])
    bob = body["users"][1]
    assert {k: bob[k] for k in BRIEF_KEYS} == {
        "user_id": "bob", "daily_used": 800, "daily_limit": 1000, "daily_remaining": 200,
        "monthly_used": 800, "monthly_limit": 100000, "status": "warning"}
    assert (bob["decision"]["action"], bob["decision"]["reset_time"]) == (
        "warn", "2026-05-11T00:00:00+00:00")


async def test_filters_by_status_role_and_department() -> None:
    def users(body: Any) -> list[str]:
        return [row["user_id"] for row in body["users"]]

    assert users(await get("/api/admin/budgets", status="over_limit")) == ["dave"]
    assert users(await get("/api/admin/budgets", status="ok")) == ["alice", "carol", "erin"]
    assert users(await get("/api/admin/budgets", role="developer")) == ["alice", "dave", "erin"]
    assert users(await get("/api/admin/budgets", department="research")) == ["alice", "dave"]
    assert users(await get("/api/admin/budgets", department="research", status="ok")) == [
        "alice"]
    assert users(await get("/api/admin/budgets", role="nobody")) == []


async def test_a_bad_filter_is_a_400_that_says_why() -> None:
    async with asgi_client(filled_board()) as client:
        bad_status = await client.get("/api/admin/budgets?status=red", headers=ADMIN)
        typo = await client.get("/api/admin/budgets?dept=research", headers=ADMIN)
        bad_limit = await client.get("/api/admin/alerts?limit=0", headers=ADMIN)
    assert bad_status.status_code == typo.status_code == bad_limit.status_code == 400
    assert bad_status.json() == {"error": "unknown status",
                                 "details": ["'red': expected one of ok, warning, over_limit"]}
    assert typo.json()["error"] == "unknown query parameter"
    assert "limit must be an integer" in bad_limit.json()["details"][0]


async def test_the_numbers_equal_tally_simulate_over_the_same_events(tmp_path: Path) -> None:
    (tmp_path / "users.yaml").write_text(yaml.safe_dump(
        {"user_identification": {"users": USERS}}))
    (tmp_path / "budgets.yaml").write_text(yaml.safe_dump(BUDGETS))
    lines = [e.model_dump_json() for e in events(USAGE)]
    (tmp_path / "events.jsonl").write_text("\n".join(lines) + "\n")
    offline = simulate(tmp_path, tmp_path / "events.jsonl", NOON)
    live = await get("/api/admin/budgets")
    assert without_as_of(live) == without_as_of(offline)


def without_as_of(report: Any) -> Any:
    """`as_of` says when a decision was made: the only field allowed to differ."""
    report = json.loads(json.dumps(report))
    for row in report["users"]:
        del row["decision"]["as_of"]
    return report


async def test_me_is_the_callers_own_budget_with_its_reset_times() -> None:
    body = await get("/api/budgets/me", headers={"x-api-key": KEYS["dave"]})
    MyBudget.model_validate(body)
    assert (body["user_id"], body["status"], body["daily_used"]) == ("dave", "over_limit", 1200)
    assert (body["daily_reset_time"], body["monthly_reset_time"]) == (
        "2026-05-11T00:00:00+00:00", "2026-06-01T00:00:00+00:00")
    assert body["decision"]["action"] == "hard_stop"


async def test_me_for_a_jwt_user_tally_never_saw_is_a_fresh_budget() -> None:
    body = await get("/api/budgets/me", headers=bearer(token(sub="zoe")))
    assert (body["user_id"], body["daily_used"], body["daily_limit"], body["status"]) == (
        "zoe", 0, 1000, "ok")


async def test_alerts_newest_first_with_a_limit() -> None:
    body = await get("/api/admin/alerts")
    AlertsResponse.model_validate(body)
    kinds = [(a["user_id"], a["kind"], a["threshold"]) for a in body["alerts"]]
    assert sorted(kinds) == [("bob", "warning", 75), ("dave", "limit", 100),
                             ("dave", "warning", 75)]
    limited = await get("/api/admin/alerts", limit=1)
    assert limited["alerts"] == body["alerts"][:1]


async def test_alerts_keep_the_order_they_were_published_in() -> None:
    board = filled_board()
    later = NOON.replace(hour=13)
    board.record(board.enforcer.on_balances(
        balances(board.enforcer.config, events({"alice": 900}, later), later), later))
    async with asgi_client(board) as client:
        body = (await client.get("/api/admin/alerts", headers=ADMIN)).json()
    assert (body["alerts"][0]["user_id"], body["alerts"][0]["kind"]) == ("alice", "warning")


async def test_a_reloaded_users_yaml_lets_a_new_key_in() -> None:
    board = filled_board()
    users = [*USERS, {"id": "frank", "api_key": "ak_frank_0123456789", "role": "admin"}]
    reloaded = config().model_copy(update={"users": config().users.model_validate(
        {"user_identification": {"users": users}})})
    async with asgi_client(board) as client:
        frank = {"x-api-key": "ak_frank_0123456789"}
        before = await client.get("/api/admin/budgets", headers=frank)
        board.record(board.enforcer.on_config(reloaded, NOON))
        after = await client.get("/api/admin/budgets", headers=frank)
    assert (before.status_code, after.status_code) == (401, 200)
    assert "frank" in [row["user_id"] for row in after.json()["users"]]
