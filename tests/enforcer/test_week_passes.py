"""A week passes: usage.raw and budget.alerts keep seconds, as a week of retention would.

After their old segments are deleted an enforcer restart repeats no alert (it remembers
them in the compacted budget.alert_memory, not by reading budget.alerts), and `replay` from
usage.events (which keeps everything) still equals the live balances.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import duckdb
import pytest
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from tally.config.loader import load_config
from tally.kafka import Record, ensure_topics, make_admin, make_consumer, partitions_of
from tally.services.enforcer.app import run_enforcer
from tally.services.ingest.app import run_ingest
from tally.services.projector.app import run_projector
from tally.services.projector.replay import replay
from tally.topics import Topics
from tally.wire import PERIOD_NAMES, BudgetAlerted
from tests.test_pipeline import (
    BUDGETS,
    NOON,
    Clock,
    eventually,
    following,
    produce,
    raw,
    running,
    write_config,
)

pytestmark = pytest.mark.kafka

SECONDS = {"retention.ms": "1000", "segment.ms": "1000"}


async def admin_call(bootstrap: str, resources: list[ConfigResource]) -> list[object]:
    admin = make_admin(bootstrap)
    await admin.start()
    try:
        if resources[0].configs and None not in resources[0].configs.values():
            return list(await admin.alter_configs(resources))
        return list(await admin.describe_configs(resources))
    finally:
        await admin.close()


async def retention_checked_within_seconds(bootstrap: str) -> bool:
    check = {"log.retention.check.interval.ms": None}
    (response,) = await admin_call(bootstrap, [ConfigResource(ConfigResourceType.BROKER, "1",
                                                              check)])
    entry = response.to_object()["resources"][0]["config_entries"][0]  # type: ignore[attr-defined]
    return int(entry["config_value"]) <= 5000


@contextlib.asynccontextmanager
async def collected_alerts(bootstrap: str, topic: str) -> AsyncIterator[list[BudgetAlerted]]:
    """Every alert published while inside, read live (before retention deletes it)."""
    found: list[BudgetAlerted] = []

    def handle(records: list[Record]) -> None:
        found.extend(BudgetAlerted.model_validate_json(r.value or b"") for r in records)

    async with following(bootstrap, [topic], handle):
        yield found


async def log_start(bootstrap: str, topic: str) -> int:
    consumer = make_consumer(bootstrap)
    await consumer.start()
    try:
        parts = await partitions_of(consumer, topic)
        return sum((await consumer.beginning_offsets(parts)).values())
    finally:
        await consumer.stop()


def balances(db: Path) -> list[tuple[object, ...]]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT user_id, period, period_start, tokens FROM balances "
                           "ORDER BY ALL").fetchall()


async def test_a_week_passes_and_a_restart_repeats_no_alert(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    assert await retention_checked_within_seconds(kafka_bootstrap), (
        "the test broker enforces retention every 5 minutes: restart it with the current "
        "tally_dev.localkafka settings (tally kafka stop --data-dir .local/kafka-test)")
    topics, config_dir, db = Topics(f"week-{unique_name}"), tmp_path / "config", tmp_path / "p.db"
    write_config(config_dir, BUDGETS)
    config, clock = load_config(config_dir), Clock(NOON)
    await ensure_topics(kafka_bootstrap, topics, 1)  # one partition: every alert in one log
    await admin_call(kafka_bootstrap, [ConfigResource(ConfigResourceType.TOPIC, name, SECONDS)
                                       for name in (topics.usage_raw, topics.budget_alerts)])

    def ingest(stop: asyncio.Event) -> Awaitable[None]:
        return run_ingest(config, kafka_bootstrap, topics, None, stop, partitions=1)

    def projector(stop: asyncio.Event) -> Awaitable[None]:
        return run_projector(config, kafka_bootstrap, topics, db, stop, partitions=1)

    def enforcer(stop: asyncio.Event) -> Awaitable[None]:
        return run_enforcer(config_dir, kafka_bootstrap, topics, stop, clock=clock,
                            tick_seconds=0.1, partitions=1)

    def kinds(alerts: list[BudgetAlerted]) -> list[tuple[str, int]]:
        return [(a.user_id, a.threshold) for a in alerts]

    async with (collected_alerts(kafka_bootstrap, topics.budget_alerts) as sent,
                running(ingest), running(projector)):
        async with running(enforcer):
            await produce(kafka_bootstrap, topics.usage_raw, [raw("a1", "alice", 800)])
            await eventually(lambda: kinds(sent) == [("alice", 75)], "alice's warning")
            await asyncio.sleep(1.2)  # older than segment.ms: the next append rolls it
            await produce(kafka_bootstrap, topics.usage_raw, [raw("b1", "bob", 950)])
            await eventually(lambda: kinds(sent)[1:] == [("bob", 75), ("bob", 90)],
                             "bob's warnings")
        deleted = await log_start(kafka_bootstrap, topics.budget_alerts)
        while deleted == 0:  # alice's alert is gone from budget.alerts
            await asyncio.sleep(0.2)
            deleted = await log_start(kafka_bootstrap, topics.budget_alerts)
        assert await log_start(kafka_bootstrap, topics.usage_raw) > 0

        async with running(enforcer):  # restarts, judges everyone again on its first tick
            await produce(kafka_bootstrap, topics.usage_raw, [raw("c1", "carol", 800)])
            await eventually(lambda: ("carol", 75) in kinds(sent), "carol's warning")
        assert kinds(sent) == [("alice", 75), ("bob", 75), ("bob", 90), ("carol", 75)]

    rebuilt = tmp_path / "replayed.db"
    await replay(config, kafka_bootstrap, topics, rebuilt, partitions=1)
    assert balances(rebuilt) == balances(db)
    assert [row[0] for row in balances(db)].count("alice") == len(PERIOD_NAMES)  # one a kind
