"""Shared by the enforcer's API, stream and dashboard tests: a team, its budgets, and an
Enforcer filled in memory through the same core the live service runs."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt

from tally.config.models import Config
from tally.core import fold_events, to_balance
from tally.ops import Readiness
from tally.service import serving
from tally.services.enforcer.api import create_app
from tally.services.enforcer.board import Board
from tally.services.enforcer.state import Enforcer
from tally.wire import BalanceUpdated, UsageRecorded

NOON = datetime(2026, 5, 10, 12, tzinfo=UTC)
SECRET = "a-test-secret-that-is-long-enough-for-hs256"
KEYS = {"carol": "ak_carol_0123456789", "alice": "ak_alice_0123456789",
        "bob": "ak_bob_0123456789", "dave": "ak_dave_0123456789", "erin": "ak_erin_0123456789"}
USERS = [
    {"id": "carol", "api_key": KEYS["carol"], "role": "admin"},
    {"id": "alice", "api_key": KEYS["alice"], "role": "developer", "department": "research",
     "identities": ["openai-user:alice"]},
    {"id": "bob", "api_key": KEYS["bob"], "role": "viewer"},
    {"id": "dave", "api_key": KEYS["dave"], "role": "developer", "department": "research"},
    {"id": "erin", "api_key": KEYS["erin"], "role": "developer", "department": "sales"},
]
BUDGETS: dict[str, Any] = {"per_user_budgets": {
    "default_limits": {"daily_tokens": 1000, "monthly_tokens": 100000},
    "role_limits": {"admin": 5000, "developer": 1000, "viewer": 1000},
    "warnings": [{"at_percent": 75, "message": "You've used 75% of your {period} budget"}],
    "on_limit_exceeded": {"action": "hard_stop", "hard_stop": {
        "message": "Stopped until {reset_time}.", "notify_admin": True}},
    # The events are of fixed dates (May 2026): a ten-year window keeps them acceptable.
    "event_time_window": {"max_age_days": 3650},
}}
# Enough for every status: bob warns, dave is over, alice and erin are fine.
USAGE = {"alice": 300, "bob": 800, "dave": 1200}


def config(method: str = "jwt", **auth: Any) -> Config:
    settings: dict[str, Any] = {"method": method, **auth}
    if method == "jwt" and "public_key_file" not in auth:
        settings.setdefault("secret", SECRET)
    return Config.model_validate({"auth": {"authentication": settings},
                                  "users": {"user_identification": {"users": USERS}},
                                  "budgets": BUDGETS})


def events(usage: Mapping[str, int], at: datetime = NOON) -> list[UsageRecorded]:
    return [UsageRecorded(event_id=f"{user}-{at.isoformat()}", occurred_at=at, user_id=user,
                          model="m/x", input_tokens=tokens, output_tokens=0)
            for user, tokens in usage.items()]


def balances(cfg: Config, found: list[UsageRecorded], at: datetime = NOON) -> list[BalanceUpdated]:
    usages = fold_events(found, cfg.budgets.per_user_budgets)
    return [to_balance(usage, at) for usage in usages.values()]


def filled_board(cfg: Config | None = None, usage: Mapping[str, int] = USAGE,
                 at: datetime = NOON) -> Board:
    """A Board as the live enforcer has it after these balances (and their alerts)."""
    cfg = cfg or config()
    board = Board(Enforcer(cfg))
    board.record(board.enforcer.on_tick(at))
    board.record(board.enforcer.on_balances(balances(cfg, events(usage, at), at), at))
    return board


def token(sub: str = "carol", key: Any = SECRET, expires_in: int = 3600,
          algorithm: str = "HS256", **claims: Any) -> str:
    # An hour: tests parametrized with tokens make them at collection, and a whole suite on
    # a loaded machine may reach them many minutes later.
    return jwt.encode({"sub": sub, "exp": int(time.time()) + expires_in, **claims}, key,
                      algorithm=algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


def ready(readiness: Readiness | None = None) -> Readiness:
    readiness = readiness or Readiness()
    readiness.ready = True
    return readiness


def asgi_client(board: Board, readiness: Readiness | None = None) -> httpx.AsyncClient:
    app = create_app(board, readiness or ready(), clock=lambda: NOON)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://enforcer")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def served(board: Board) -> AsyncIterator[str]:
    """The board's API on a real socket (streams need one: ASGITransport buffers)."""
    port = free_port()
    async with serving(create_app(board, ready()), port):
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            board.hub.close()
