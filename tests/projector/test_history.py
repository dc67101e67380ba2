"""The projector's GET /history: the last days of the ledger per user, model and daily
period (today last), for an admin only; on a real DuckDB file."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import httpx
import pytest
from starlette.applications import Starlette

from tally.config.loader import load_config
from tally.services.projector import store
from tally.services.projector.history import history, history_routes
from tally.wire import PERIOD_NAMES
from tests.paths import project_root

CONFIG = load_config(project_root() / "config")  # UTC, days start at 00:00
NOW = datetime(2026, 12, 1, 0, 30, tzinfo=UTC)  # half an hour into a month
TODAY = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def con(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    con = store.connect(tmp_path / "p.duckdb")
    rows = [("a1", "user_alice", TODAY, "m/x", 100), ("a2", "user_alice", TODAY, "m/y", 50),
            ("a3", "user_alice", TODAY - timedelta(days=1), "m/x", 70),
            ("b1", "user_bob", TODAY - timedelta(days=2), "m/x", 5),
            ("old", "user_bob", TODAY - timedelta(days=3), "m/x", 999),  # before the window
            ("late", "user_bob", TODAY + timedelta(days=1), "m/x", 888)]  # after now
    for i, (event_id, user, day, model, tokens) in enumerate(rows):
        # the period starts are not read by the history: the day stands in for each
        starts = ", ".join(f"{kind}_start" for kind in PERIOD_NAMES)
        con.execute("INSERT INTO ledger (event_id, user_id, occurred_at, model, input_tokens, "
                    f"output_tokens, cache_read_tokens, cache_write_tokens, tokens, {starts}, "
                    "topic_partition, topic_offset) VALUES (?, ?, ?, ?, ?, 0, 0, 0, ?, "
                    f"{', '.join('?' for _ in PERIOD_NAMES)}, 0, ?)",
                    [event_id, user, day, model, tokens, tokens, *(day for _ in PERIOD_NAMES), i])
    return con


def test_three_days_across_a_month_end(con: duckdb.DuckDBPyConnection) -> None:
    assert history(con.cursor(), CONFIG, NOW, days=3) == {
        "days": ["2026-11-29T00:00:00+00:00", "2026-11-30T00:00:00+00:00",
                 "2026-12-01T00:00:00+00:00"],
        "team": [5, 70, 150],
        "models": {"m/x": 175, "m/y": 50},
        "users": {"user_alice": {"total": 220, "days": {"m/x": [0, 70, 100],
                                                         "m/y": [0, 0, 50]}},
                  "user_bob": {"total": 5, "days": {"m/x": [5, 0, 0]}}},
    }


async def test_only_an_admin_may_ask(con: duckdb.DuckDBPyConnection) -> None:
    app = Starlette(routes=history_routes(con, CONFIG, lambda: NOW))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://projector") as client:
        anonymous = await client.get("/history")
        bob = await client.get("/history", headers={"x-api-key": "ak_bob_example_0002"})
        carol = await client.get("/history?days=2",
                                 headers={"authorization": "Bearer ak_carol_example_0003"})
        bad = await client.get("/history?days=0", headers={"x-api-key": "ak_carol_example_0003"})
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer"
    assert (bob.status_code, bob.json()["error"]) == (
        403, "admin role required: user_bob has role 'viewer'")
    assert carol.status_code == 200 and carol.json()["team"] == [70, 150]
    assert (bad.status_code, bad.json()["error"]) == (400, "bad days")


async def test_waits_for_a_lost_partition_to_be_deleted(con: duckdb.DuckDBPyConnection) -> None:
    """A user of a partition lost in a rebalance is still in the file until its deletion
    ends: the history waits for it (ownership.settled) and answers 503 if it does not end."""
    left: list[str | None] = ["partition 3 of usage.events", None]
    waited: list[float] = []

    async def dropping(timeout: float) -> str | None:
        waited.append(timeout)
        return left.pop(0)

    app = Starlette(routes=history_routes(con, CONFIG, lambda: NOW, dropping=dropping))
    admin = {"x-api-key": "ak_carol_example_0003"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://projector") as client:
        pending = await client.get("/history?days=2", headers=admin)
        done = await client.get("/history?days=2", headers=admin)
    assert pending.status_code == 503
    assert "still deleting partition 3 of usage.events" in pending.json()["error"]
    assert done.status_code == 200 and done.json()["team"] == [70, 150]
    assert waited == [10.0, 10.0]
