"""The budgets API through the whole pipeline on a real broker: the brief's example events
go in through usage.raw, and GET /api/admin/budgets answers exactly what `tally simulate`
prints for the same file. Every service is ready on /readyz and counts on /metrics, and a
limit alert for the admin reaches the configured webhook."""

from __future__ import annotations

import contextlib
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tally.ops import Metrics
from tally.simulate import simulate
from tally.topics import Topics
from tally.wire import UsageRecorded
from tests.paths import project_root
from tests.test_pipeline import produce

from .pipeline import pipeline, ready, until
from .test_api import without_as_of
from .test_notifier import Receiver, receiving

pytestmark = pytest.mark.kafka

EVENTS = project_root() / "tests" / "data" / "brief_example_events.jsonl"
AT = datetime.fromisoformat("2026-05-20T15:00:00+00:00")
CAROL = {"x-api-key": "ak_carol_example_0003"}
# The same events simulate counts: those up to AT (the file has one after it, and a duplicate).
LINES = [line for line in EVENTS.read_bytes().splitlines()
         if UsageRecorded.model_validate_json(line).occurred_at <= AT]


def config_with_webhook(directory: Path, url: str) -> Path:
    """The example config, with the hard stop (the demo's action) notifying a webhook."""
    shutil.copytree(project_root() / "config", directory)
    budgets = yaml.safe_load((directory / "budgets.yaml").read_text())
    section = budgets["per_user_budgets"]
    section["on_limit_exceeded"]["hard_stop"]["notify_admin"] = True
    section["alert_webhook"] = {"url": url, "backoff_seconds": 0.05}
    (directory / "budgets.yaml").write_text(yaml.safe_dump(budgets))
    return directory


async def test_admin_budgets_over_kafka_equal_tally_simulate(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    topics, metrics, receiver = Topics(f"api-{unique_name}"), Metrics(), Receiver()
    async with receiving(receiver) as hook:
        config_dir = config_with_webhook(tmp_path / "config", hook)
        expected = without_as_of(simulate(config_dir, EVENTS, AT))
        async with pipeline(kafka_bootstrap, topics, config_dir, tmp_path / "p.db", AT,
                            metrics) as (ingest_url, url), \
                httpx.AsyncClient(timeout=10) as client:
            await until(lambda: ready(client, url))
            await produce(kafka_bootstrap, topics.usage_raw, LINES)
            assert await settled_report(client, url, expected) == expected
            await until(lambda: ready(client, ingest_url))
            await until(lambda: posts(receiver, 2))
            # The counter moves once the webhook has answered, after the receiver noted
            # the post: stopped in between, the second delivery went uncounted.
            await until(lambda: delivered(metrics, 2))
            ingest_metrics = (await client.get(f"{ingest_url}/metrics")).text

    assert [t.split("\n")[0] for t in receiver.texts] == [
        "*Tally*: user_bob is over the daily limit: 25,000/25,000 tokens, 100%",
        "*Tally*: user_bob is over the monthly limit: 520,000/500,000 tokens, 104%"]
    assert f'tally_events_in_total{{source="{topics.usage_raw}"}} {len(LINES)}.0' in ingest_metrics
    assert 'tally_consumer_lag{partition="0",topic="' + topics.usage_raw in ingest_metrics
    for status in ("ok", "warning", "over_limit"):
        users = sum(row["status"] == status for row in expected["users"])
        assert metrics.registry.get_sample_value("tally_decisions", {"status": status}) == users
    assert metrics.registry.get_sample_value("tally_alert_deliveries_total",
                                             {"result": "delivered"}) == 2.0


async def settled_report(client: httpx.AsyncClient, url: str, expected: Any) -> Any:
    """The API's report (less as_of) once it equals `expected`, or the last one seen."""
    last: list[Any] = [None]

    async def same() -> bool:
        answer = await client.get(f"{url}/api/admin/budgets", headers=CAROL)
        last[0] = without_as_of(answer.json())
        return bool(last[0] == expected)

    with contextlib.suppress(TimeoutError):
        await until(same)
    return last[0]


async def posts(receiver: Receiver, count: int) -> bool:
    return len(receiver.texts) >= count


async def delivered(metrics: Metrics, count: int) -> bool:
    return metrics.registry.get_sample_value("tally_alert_deliveries_total",
                                             {"result": "delivered"}) == count
