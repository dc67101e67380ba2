"""The dashboard's usage history in a real headless Chromium at 1,280 px, fed by the demo's
own sample history (config/, 30 earlier days and today) through the whole pipeline: the
team chart, the selected user's daily use by model against the daily limit, the split by
model, every column and chart inside the page's width. The screenshot is
test-artifacts/dashboard-history-1280.png."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson
import pytest
from playwright.async_api import Page

from tally.config.loader import load_config
from tally.services.enforcer.responses import UsageHistory
from tally.topics import Topics
from tally_dev.demo import HISTORY_DAYS, PLAN, sample_history
from tests.paths import project_root
from tests.test_pipeline import produce

from .browser import chromium_page, log_in, screenshot
from .pipeline import pipeline, until

pytestmark = pytest.mark.kafka

CONFIG_DIR = project_root() / "config"
CAROL, BOB = "ak_carol_example_0003", "ak_bob_example_0002"  # admin, viewer (config/)


async def history_of(client: httpx.AsyncClient, url: str, key: str) -> httpx.Response:
    return await client.get(f"{url}/api/admin/history", headers={"x-api-key": key})


async def chart_tokens(page: Page, chart: str, day: int | None = None) -> int:
    """The tokens the bars of a chart stand for (those of one day when `day` is given)."""
    selector = f"#{chart} svg rect" + ("" if day is None else f"[data-day='{day}']")
    total: int = await page.eval_on_selector_all(
        selector, "rects => rects.reduce((s, r) => s + Number(r.dataset.tokens), 0)")
    return total


async def overflowing(page: Page) -> list[str]:
    """Headers and charts whose right edge is past the main panel's, and the panel itself
    when it scrolls sideways: what a 1,400 px window used to cut off."""
    found: list[str] = await page.evaluate("""() => {
        const main = document.getElementById('main');
        const right = main.getBoundingClientRect().right;
        const out = [...document.querySelectorAll('#main th, #main figure, #main svg')]
            .filter(e => e.getBoundingClientRect().right > right + 0.5)
            .map(e => e.textContent.trim().slice(0, 30) || e.tagName);
        if (main.scrollWidth > main.clientWidth) out.push('#main scrolls sideways');
        if (document.documentElement.scrollWidth > window.innerWidth) out.push('page scrolls');
        return out;
    }""")
    return found


async def test_history_charts_at_1280_px(kafka_bootstrap: str, unique_name: str,
                                         tmp_path: Path) -> None:
    topics, now = Topics(f"hist-{unique_name}"), datetime.now(UTC)
    history = sample_history(load_config(CONFIG_DIR), now)
    async with pipeline(kafka_bootstrap, topics, CONFIG_DIR, tmp_path / "p.db", now) as (
            _, url), httpx.AsyncClient(timeout=10) as client, \
            chromium_page(width=1280, height=1000) as page:
        await asyncio.sleep(1)  # topics exist once every service started
        await produce(kafka_bootstrap, topics.usage_raw,
                      [orjson.dumps(event) for event in history])

        async def all_counted() -> bool:
            answer = await history_of(client, url, CAROL)
            return answer.status_code == 200 and sum(answer.json()["team"]) == sum(
                e["input_tokens"] + e["output_tokens"] for e in history)

        await until(all_counted)
        body = UsageHistory.model_validate((await history_of(client, url, CAROL)).json())
        assert len(body.days) == HISTORY_DAYS + 1
        assert body.users["user_alice"].total == HISTORY_DAYS * PLAN["user_alice"][1] + 80_000
        refused = await history_of(client, url, BOB)
        assert (refused.status_code, refused.json()["error"]) == (
            403, "admin role required: user_bob has role 'viewer'")

        await log_in(page, url, CAROL)
        await page.wait_for_selector("tr[data-user=user_bob][data-status=over_limit]")
        await page.wait_for_selector("#user-chart svg rect")
        # bob sorts first (over the limit): his chart is shown, with his limit
        assert await page.get_attribute("#user-chart", "data-user") == "user_bob"
        assert await page.get_attribute("#user-chart line.limit", "data-limit") == "25000"
        assert await chart_tokens(page, "user-chart", HISTORY_DAYS) == 26_000
        assert await chart_tokens(page, "user-chart", 0) == PLAN["user_bob"][1]
        assert await chart_tokens(page, "team-chart") == sum(body.team)
        assert await page.eval_on_selector_all("#team-chart rect", "r => r.length") == (
            HISTORY_DAYS + 1)

        await page.click("tr[data-user=user_alice]")
        await page.wait_for_selector("#user-chart[data-user=user_alice]")
        assert await page.get_attribute("#user-chart line.limit", "data-limit") == "100000"
        assert await chart_tokens(page, "model-chart") == body.users["user_alice"].total
        assert await page.eval_on_selector_all("#model-chart rect", "r => r.length") == 3
        assert await page.get_attribute(
            "tr[data-user=user_alice]", "class") == "selected"

        assert await overflowing(page) == []
        await screenshot(page, "dashboard-history-1280.png")
