"""GET /api/admin/stream over a real socket: a snapshot, then each change as it happens."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson

from tally.services.enforcer.responses import DashboardRow
from tally.services.enforcer.stream import Hub, sse_frame

from .kit import KEYS, NOON, balances, events, filled_board, served

ADMIN = {"authorization": f"Bearer {KEYS['carol']}"}


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    """(event, data) of each message; comments (keepalives) skipped."""
    event, data = "", b""
    async for line in response.aiter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:].encode()
        elif not line and event:
            yield event, orjson.loads(data)
            event = ""


async def test_a_snapshot_then_changed_decisions_and_new_alerts() -> None:
    board = filled_board()
    async with served(board) as url, httpx.AsyncClient(timeout=10) as client, \
            client.stream("GET", f"{url}/api/admin/stream", headers=ADMIN) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        received = sse_events(response)
        kind, snapshot = await anext(received)
        assert kind == "snapshot"
        rows = [DashboardRow.model_validate(row) for row in snapshot["users"]]
        assert [(r.user_id, r.status, r.role) for r in rows][:2] == [
            ("alice", "ok", "developer"), ("bob", "warning", "viewer")]
        assert len(snapshot["alerts"]) == 3

        later = NOON.replace(hour=13)  # a balance is absolute: alice now stands at 800
        found = balances(board.enforcer.config, events({"alice": 800}, later), later)
        board.record(board.enforcer.on_balances(found, later))
        kind, row = await asyncio.wait_for(anext(received), 5)
        assert (kind, row["user_id"], row["status"], row["daily_used"]) == (
            "decision", "alice", "warning", 800)
        kind, alert = await asyncio.wait_for(anext(received), 5)
        assert (kind, alert["user_id"], alert["kind"]) == ("alert", "alice", "warning")


async def test_refused_without_admin_credentials_and_closed_on_shutdown() -> None:
    board = filled_board()
    async with served(board) as url, httpx.AsyncClient(timeout=10) as client:
        refused = await client.get(f"{url}/api/admin/stream")
        assert refused.status_code == 401
        async with client.stream("GET", f"{url}/api/admin/stream", headers=ADMIN) as response:
            received = sse_events(response)
            await anext(received)
            board.hub.close()
            assert [e async for e in received] == []  # the server ended the stream


async def test_a_stream_that_falls_behind_is_dropped_not_waited_for() -> None:
    hub = Hub(max_queue=2)
    queue = hub.subscribe()
    stream = hub.stream(queue, b"first")
    hub.publish([sse_frame("decision", {"n": n}) for n in range(5)])
    assert len(hub) == 0
    assert [frame async for frame in stream] == [
        b"first", *(sse_frame("decision", {"n": n}) for n in range(2))]


async def test_an_idle_stream_sends_keepalives() -> None:
    hub = Hub(keepalive_seconds=0.01)
    stream = hub.stream(hub.subscribe(), b"first")
    assert [await anext(stream), await anext(stream)] == [b"first", b": keepalive\n\n"]
    hub.close()
    assert [frame async for frame in stream] == []
