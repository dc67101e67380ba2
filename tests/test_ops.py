"""tally.ops on a real broker: readiness and lag of a consumer, and the projector's
/metrics, /healthz and /readyz beside its audit endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from pathlib import Path

import httpx
import orjson
import pytest

from tally.config.models import Config
from tally.kafka import ensure_topics, fetch, make_consumer, partitions_of
from tally.ops import Metrics, Readiness, observe_lag
from tally.services.projector.app import run_projector
from tally.topics import Topics
from tests.enforcer.kit import free_port
from tests.enforcer.pipeline import ready, until
from tests.test_pipeline import produce, running

pytestmark = pytest.mark.kafka

ADMIN_KEY = "ak_auditor_0123456789"
CONFIG = Config.model_validate({
    "budgets": {"per_user_budgets": {
        "default_limits": {"daily_tokens": 1000, "monthly_tokens": 100000}}},
    "users": {"user_identification": {"users": [
        {"id": "auditor", "api_key": ADMIN_KEY, "role": "admin"}]}}})


def usage(event_id: str) -> bytes:
    return orjson.dumps({"event_id": event_id, "occurred_at": "2026-05-10T12:00:00Z",
                         "user_id": "alice", "model": "m/x", "input_tokens": 5,
                         "output_tokens": 0})


async def test_ready_once_read_to_the_end_offsets_and_lag_per_partition(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topics, metrics, readiness = Topics(f"ops-{unique_name}"), Metrics(), Readiness()
    await ensure_topics(kafka_bootstrap, topics, 3)
    await produce(kafka_bootstrap, topics.usage_raw, [usage(f"e{n}") for n in range(5)])
    consumer = make_consumer(kafka_bootstrap)
    await consumer.start()
    try:
        assert not await readiness.check(consumer)
        assert readiness.detail == "waiting for partitions"
        parts = await partitions_of(consumer, topics.usage_raw)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        assert not await readiness.check(consumer)
        got = []
        while len(got) < 5:
            got += await fetch(consumer, 2, 100)  # two at a time: some lag is seen
            await observe_lag(metrics, consumer)
        assert await readiness.check(consumer) and readiness.detail == "caught up"
    finally:
        await consumer.stop()
    lags = [metrics.registry.get_sample_value("tally_consumer_lag", {
        "topic": topics.usage_raw, "partition": str(tp.partition)}) for tp in parts]
    assert [lag for lag in lags if lag is not None] and all(lag == 0 for lag in lags if lag)


async def test_the_projector_serves_metrics_health_and_readiness_beside_audit(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    topics, port = Topics(f"opsp-{unique_name}"), free_port()
    url = f"http://127.0.0.1:{port}"

    def projector(stop: asyncio.Event) -> Awaitable[None]:
        return run_projector(CONFIG, kafka_bootstrap, topics, tmp_path / "p.db", stop,
                             port=port)

    async with running(projector), httpx.AsyncClient(timeout=10) as client:
        await until(lambda: ready(client, url))
        assert (await client.get(f"{url}/healthz")).json() == {"status": "ok"}
        await produce(kafka_bootstrap, topics.usage_events, [usage("p1"), usage("p2")])
        line = f'tally_events_in_total{{source="{topics.usage_events}"}} 2.0'

        async def counted() -> bool:
            return line in (await client.get(f"{url}/metrics")).text.splitlines()

        await until(counted)
        audit = await client.post(f"{url}/audit", json={"sql": "SELECT count(*) FROM ledger"},
                                  headers={"X-API-Key": ADMIN_KEY})
        assert audit.json()["rows"] == [[2]]
