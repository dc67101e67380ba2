"""A weekly budget end to end, on a real broker: usage posted to the ingest goes through the
projector and the enforcer; a user over the weekly limit (and under the daily one) is
stopped at the gateway's decision cache, the admin API shows the brief's row with the weekly
figures beside it, and the dashboard shows the weekly bar. Then budgets.yaml moves the
week's reset day, then the time zone, then the counted tokens while everything runs, and
each applies at once. Screenshot:
test-artifacts/dashboard-weekly.png."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import yaml

from tally.core.periods import WEEKDAYS
from tally.decision_cache import DecisionCache
from tally.topics import Topics
from tests.test_pipeline import produce

from .browser import chromium_page, log_in, screenshot
from .kit import BUDGETS, KEYS, events
from .pipeline import pipeline, ready, until, write_config

pytestmark = pytest.mark.kafka

WEEKLY = 500  # below the daily limits (1,000): a week can be spent in one day


def weekly_budgets(reset_day: datetime) -> dict[str, Any]:
    """Weekly limits, the week starting on the weekday of `reset_day` (UTC midnight)."""
    budgets = copy.deepcopy(BUDGETS)
    budgets["per_user_budgets"]["default_limits"]["weekly_tokens"] = WEEKLY
    budgets["per_user_budgets"]["reset_schedule"] = {
        "weekly_reset_day": WEEKDAYS[reset_day.weekday()]}
    # the role's mapping form: a developer's weekly limit from the role, daily kept
    budgets["per_user_budgets"]["role_limits"]["developer"] = {
        "daily_tokens": 1000, "weekly_tokens": WEEKLY}
    return budgets


async def me(client: httpx.AsyncClient, url: str, user: str) -> dict[str, Any]:
    answer = await client.get(f"{url}/api/budgets/me", headers={"x-api-key": KEYS[user]})
    body: dict[str, Any] = answer.json() if answer.status_code == 200 else {}
    return body


async def test_a_user_over_the_weekly_limit_is_stopped_and_the_dashboard_shows_the_week(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    yesterday = now - timedelta(days=1)  # the week starts yesterday: both days count
    config_dir = write_config(tmp_path / "config", weekly_budgets(yesterday))
    topics = Topics(f"weekly-{unique_name}")
    async with httpx.AsyncClient(timeout=10) as client, pipeline(
            kafka_bootstrap, topics, config_dir, tmp_path / "p.db", now) as (_, url):
        await asyncio.sleep(1)  # topics exist once every service started
        usage = [*events({"alice": 300}, yesterday), *events({"alice": 300, "erin": 100}, now)]
        await produce(kafka_bootstrap, topics.usage_raw,
                      [e.model_dump_json().encode() for e in usage])

        async def alice_stopped() -> bool:
            return (await me(client, url, "alice")).get("status") == "over_limit"

        await until(alice_stopped)
        row = await me(client, url, "alice")
        assert (row["daily_used"], row["daily_limit"], row["daily_remaining"]) == (300, 1000, 700)
        assert (row["weekly_used"], row["weekly_limit"], row["weekly_remaining"]) == (600, 500, 0)
        decision = row["decision"]
        assert (decision["action"], decision["period"], decision["daily"]["status"]) == (
            "hard_stop", "weekly", "ok")
        assert decision["weekly"]["reset_time"] == row["weekly_reset_time"]

        cache = DecisionCache(kafka_bootstrap, topics)
        await cache.start()
        try:  # the gateway's side: alice refused, erin (100 of 500 this week) let through.
            # The API answers from the usage the enforcer holds, a moment before the
            # decision (sent after its alert's transaction) is on the topic.
            async def alice_refused() -> bool:
                return not cache.allows("alice")

            await until(alice_refused, timeout=10)
            assert cache.allows("erin")
        finally:
            await cache.stop()

        assert await ready(client, url)
        async with chromium_page() as page:
            await log_in(page, url, KEYS["carol"])
            await page.wait_for_selector("tr[data-user=alice][data-status=over_limit]")
            assert await page.is_visible("tr[data-user=alice] .weekly-bar.over_limit")
            assert "600 / 500" in await page.inner_text("tr[data-user=alice] .figures.weekly")
            assert "100 / 500" in await page.inner_text("tr[data-user=erin] .figures.weekly")
            assert "week in" in await page.inner_text("tr[data-user=alice] .reset-weekly")
            await screenshot(page, "dashboard-weekly.png")

        # The week now starts today: yesterday's 300 leave it, at once, for everyone.
        (config_dir / "budgets.yaml").write_text(yaml.safe_dump(weekly_budgets(now)))

        async def alice_allowed() -> bool:
            return (await me(client, url, "alice")).get("status") == "ok"

        await until(alice_allowed)
        week = (await me(client, url, "alice"))["decision"]["weekly"]
        today = now.replace(hour=0, minute=0, second=0, microsecond=0)
        assert (week["tokens_used"], datetime.fromisoformat(week["period_start"])) == (300, today)

        # A new time zone moves every day's start: the projector cuts the stored periods
        # anew, and the enforcer finds today's 300 in the day that starts at midnight in
        # Kolkata (UTC+05:30, never a UTC midnight: days left uncut would read 0).
        kolkata = weekly_budgets(now)
        kolkata["per_user_budgets"]["reset_schedule"]["timezone"] = "Asia/Kolkata"
        (config_dir / "budgets.yaml").write_text(yaml.safe_dump(kolkata))
        local = now.astimezone(ZoneInfo("Asia/Kolkata"))
        midnight = local.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(UTC)

        def alices_day_is(start: datetime, used: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                day = (await me(client, url, "alice")).get("decision", {}).get("daily") or {}
                return bool(day.get("period_start")) and (
                    datetime.fromisoformat(day["period_start"]), day.get("tokens_used")) == (
                    start, used)
            return check

        await until(alices_day_is(midnight, 300))

        # Counting output tokens only (these events have none): the projector counts every
        # stored event anew, as a replay under the new config would, and today reads 0.
        kolkata["per_user_budgets"]["counted_tokens"] = ["output_tokens"]
        (config_dir / "budgets.yaml").write_text(yaml.safe_dump(kolkata))

        await until(alices_day_is(midnight, 0))
