"""The admin dashboard in a real headless Chromium, fed by the whole pipeline on a real
broker: sign in, see every user, then a user's own usage posted to the ingest turns their
row red without a reload. The screenshot is test-artifacts/dashboard.png."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page

from tally.topics import Topics
from tests.test_pipeline import produce

from .browser import chromium_page, log_in, screenshot, visible_users
from .kit import KEYS, USAGE, events
from .pipeline import pipeline, ready, until, write_config

pytestmark = pytest.mark.kafka


async def statuses(client: httpx.AsyncClient, url: str) -> dict[str, str]:
    answer = await client.get(f"{url}/api/admin/budgets", headers={"x-api-key": KEYS["carol"]})
    if answer.status_code != 200:
        return {}
    return {row["user_id"]: row["status"] for row in answer.json()["users"]}


async def refused_login(page: Page, url: str, credential: str) -> str:
    await log_in(page, url, credential)
    await page.wait_for_function("document.getElementById('login-error').textContent != ''")
    return await page.inner_text("#login-error")


async def settled(client: httpx.AsyncClient, url: str) -> dict[str, str]:
    """Every user's status once dave's limit and bob's warning have come through."""
    seen: dict[str, str] = {}

    async def through() -> bool:
        seen.update(await statuses(client, url))
        return seen.get("dave") == "over_limit" and seen.get("bob") == "warning"

    await until(through)
    return seen


async def test_sign_in_see_everyone_and_watch_a_row_change_live(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    topics, now = Topics(f"dash-{unique_name}"), datetime.now(UTC)
    config_dir = write_config(tmp_path / "config")
    async with pipeline(kafka_bootstrap, topics, config_dir, tmp_path / "p.db", now) as (
            ingest_url, url), \
            httpx.AsyncClient(timeout=10) as client, chromium_page() as page:
        await asyncio.sleep(1)  # topics exist once every service started
        await produce(kafka_bootstrap, topics.usage_raw,
                      [e.model_dump_json().encode() for e in events(USAGE, now)])
        assert await settled(client, url) == {"alice": "ok", "bob": "warning", "carol": "ok",
                                              "dave": "over_limit", "erin": "ok"}
        assert await ready(client, url)

        assert await refused_login(page, url, "ak_wrong_0000000000") == "unknown API key"
        assert await refused_login(page, url, KEYS["bob"]) == (
            "admin role required: bob has role 'viewer'")
        await log_in(page, url, KEYS["carol"])
        await page.wait_for_selector("tr[data-user=dave][data-status=over_limit]")
        assert await visible_users(page) == ["dave", "bob", "alice", "carol", "erin"]
        assert await page.inner_text("#n-over_limit") == "1"
        assert "Stopped until" in await page.inner_text("#alerts")

        await watch_alice_go_over(page, client, ingest_url, now)
        await page.fill("#search", "research")
        assert await visible_users(page) == ["alice", "dave"]
        await page.fill("#search", "")
        await page.wait_for_timeout(300)  # let the row's flash fade a little
        await screenshot(page, "dashboard.png")


async def watch_alice_go_over(page: Page, client: httpx.AsyncClient, ingest_url: str,
                              now: datetime) -> None:
    """Alice posts her own usage; her row turns red in place, in the same document."""
    await page.evaluate("window.__sameDocument = true;"
                        "document.querySelector('tr[data-user=alice]').__sameRow = true")
    posted = await client.post(f"{ingest_url}/v1/usage", headers={"x-api-key": KEYS["alice"]},
                               json={"event_id": "alice-live", "model": "m/x",
                                     "occurred_at": now.isoformat(),
                                     "input_tokens": 900, "output_tokens": 0})
    assert posted.status_code == 202, posted.text
    await page.wait_for_selector("tr[data-user=alice][data-status=over_limit]", timeout=60_000)
    assert await page.evaluate("window.__sameDocument && "
                               "document.querySelector('tr[data-user=alice]').__sameRow")
    assert "1,200 / 1,000" in await page.inner_text("tr[data-user=alice] .daily")
    await page.wait_for_selector("#alerts li[data-alert^='alice|daily'][data-alert$='|limit|100']")
