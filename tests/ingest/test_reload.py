"""A changed users.yaml applies at every port while the services run (tally.config.loader's
LiveConfig): a revoked key is refused, a new user's key and identities work, and a broken
file keeps the config before it. No Kafka: the ingest's two paths and the access rule of the
projector's audit, each under a LiveConfig refreshed by hand."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from starlette.requests import Request

from tally.access import Access
from tally.auth import AuthError
from tally.config.loader import LiveConfig, load_config
from tally.kafka import Record
from tally.services.ingest.app import Intake
from tally.services.ingest.http import create_app

from .helpers import usage
from .test_http import MemoryPublisher

BOB_KEY, CAROL_KEY = "ak_bob_0123456789", "ak_carol_0123456789"


def users(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"user_identification": {"users": list(entries)}}


BOB = {"id": "bob", "api_key": BOB_KEY, "role": "admin"}
CAROL = {"id": "carol", "api_key": CAROL_KEY, "identities": ["telegram:999"]}


def write_users(directory: Path, content: dict[str, Any] | str) -> None:
    path = directory / "users.yaml"
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    os.utime(path, ns=(before + 10**9, before + 10**9))  # a change however coarse the clock


@pytest.fixture
def live(tmp_path: Path) -> LiveConfig:
    (tmp_path / "budgets.yaml").write_text(yaml.safe_dump({"per_user_budgets": {
        "default_limits": {"daily_tokens": 1000, "monthly_tokens": 10000},
        "event_time_window": {"max_age_days": 3650}}}))
    write_users(tmp_path, users(BOB))
    return LiveConfig(load_config(tmp_path), tmp_path)


async def post_as(app: Any, key: str, user: str) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
        answer = await client.post("/v1/usage", content=orjson.dumps(usage(user_id=user)),
                                   headers={"x-api-key": key})
    return answer.status_code


async def test_http_a_revoked_key_is_refused_and_a_new_one_admitted(
        live: LiveConfig, tmp_path: Path) -> None:
    app = create_app(live, MemoryPublisher(), config_dir=tmp_path)
    assert (await post_as(app, BOB_KEY, "bob"), await post_as(app, CAROL_KEY, "carol")) == (
        202, 401)
    write_users(tmp_path, users(CAROL))
    assert live.refresh() is not None
    assert (await post_as(app, BOB_KEY, "bob"), await post_as(app, CAROL_KEY, "carol")) == (
        401, 202)


def test_kafka_path_a_new_identity_counts_for_its_user(live: LiveConfig, tmp_path: Path) -> None:
    intake = live.derived(Intake.of)
    record = Record("usage.raw", 0, 7, None,
                    orjson.dumps(usage(user_id="telegram:999")), 0)
    assert intake() is intake()  # built once per config
    at = datetime(2025, 3, 2, tzinfo=UTC)
    before = intake().triage(record, at)
    assert not isinstance(before, str) and before.user_id == "telegram:999"  # nobody's yet
    write_users(tmp_path, users(BOB, CAROL))
    live.refresh()
    after = intake().triage(record, at)
    assert not isinstance(after, str) and after.user_id == "carol"


def test_a_broken_users_yaml_keeps_the_config_before_it(live: LiveConfig, tmp_path: Path,
                                                         ) -> None:
    before = live.current
    write_users(tmp_path, "user_identification: {users: [{id: bob, api_key: 3}]}\n")
    assert live.refresh() is None
    assert live.current is before


def admin_request(key: str) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/audit",
                    "headers": [(b"x-api-key", key.encode())]})


def test_the_audit_admits_an_admin_until_the_role_is_taken_away(
        live: LiveConfig, tmp_path: Path) -> None:
    access = Access.following(live, tmp_path)
    assert access.admin(admin_request(BOB_KEY)).user_id == "bob"
    write_users(tmp_path, users({**BOB, "role": "engineer"}, CAROL))
    live.refresh()
    with pytest.raises(AuthError) as refused:
        access.admin(admin_request(BOB_KEY))
    assert refused.value.status == 403
