"""The whole spine on a real broker: usage.raw -> ingest -> projector -> enforcer -> cache.

One person with a small daily limit: warnings, a hard stop, a switch to reduced priority
by editing budgets.yaml, the reset on the clock, and an enforcer restart that repeats no
alert. A duplicate is counted once; a malformed event goes to usage.dlq.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import orjson
import pytest
import yaml

from tally.config.loader import load_config
from tally.decision_cache import DecisionCache
from tally.kafka import Record, fetch, make_consumer, make_producer, partitions_of, read_to_end
from tally.services.enforcer.app import run_enforcer
from tally.services.ingest.app import run_ingest
from tally.services.projector.app import run_projector
from tally.topics import Topics
from tally.wire import BudgetAlerted, BudgetDecided

pytestmark = pytest.mark.kafka

NOON = datetime(2026, 5, 10, 12, tzinfo=UTC)

BUDGETS = {"per_user_budgets": {
    "default_limits": {"daily_tokens": 1000, "monthly_tokens": 100000},
    "warnings": [{"at_percent": 75, "message": "75% of {period} used"},
                 {"at_percent": 90, "message": "90% of {period} used"}],
    "on_limit_exceeded": {"action": "hard_stop",
                          "hard_stop": {"message": "Stopped until {reset_time}."}},
    # The events are of fixed dates (May 2026): a ten-year window keeps them acceptable.
    "event_time_window": {"max_age_days": 3650},
}}
USERS = {"user_identification": {"users": [
    {"id": "alice", "api_key": "ak_alice_0123456789", "identities": ["openai-user:alice"]},
    {"id": "bob", "api_key": "ak_bob_0123456789"},
]}}


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def write_config(directory: Path, budgets: dict[str, object]) -> None:
    directory.mkdir(exist_ok=True)
    (directory / "users.yaml").write_text(yaml.safe_dump(USERS))
    (directory / "budgets.yaml").write_text(yaml.safe_dump(budgets))


def raw(event_id: str, user: str, tokens: int, at: datetime = NOON) -> bytes:
    return orjson.dumps({"event_id": event_id, "occurred_at": at.isoformat(), "user_id": user,
                         "model": "m", "input_tokens": tokens, "output_tokens": 0})


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running(start: Callable[[asyncio.Event], Awaitable[None]]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(start(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def alerts(bootstrap: str, topics: Topics) -> list[BudgetAlerted]:
    return [BudgetAlerted.model_validate_json(r.value or b"")
            for r in await read_to_end(bootstrap, topics.budget_alerts)]


def status_of(cache: DecisionCache, user: str) -> tuple[str, str, int] | None:
    d: BudgetDecided | None = cache.get(user)
    return None if d is None else (d.status, d.action, d.daily.tokens_used)


async def test_budget_lifecycle_on_a_real_broker(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    topics, config_dir, db = Topics(f"pipe-{unique_name}"), tmp_path / "config", tmp_path / "p.db"
    write_config(config_dir, BUDGETS)
    config, clock = load_config(config_dir), Clock(NOON)
    cache = DecisionCache(kafka_bootstrap, topics)

    def ingest(stop: asyncio.Event) -> Awaitable[None]:
        return run_ingest(config, kafka_bootstrap, topics, None, stop)

    def projector(stop: asyncio.Event) -> Awaitable[None]:
        return run_projector(config, kafka_bootstrap, topics, db, stop)

    def enforcer(stop: asyncio.Event) -> Awaitable[None]:
        return run_enforcer(config_dir, kafka_bootstrap, topics, stop, clock=clock,
                            tick_seconds=0.1)

    async with running(ingest), running(projector):
        async with running(enforcer):
            await asyncio.sleep(1)  # topics exist once every service started
            await cache.start()
            await produce(kafka_bootstrap, topics.usage_raw, [
                raw("a1", "openai-user:Alice", 500), raw("a1", "openai-user:Alice", 500),
                b"{not json", raw("b1", "bob", 100), raw("a2", "alice", 300)])
            await eventually(lambda: status_of(cache, "alice") == ("warning", "warn", 800),
                             "alice at 80%")
            assert status_of(cache, "bob") == ("ok", "allow", 100)

            await produce(kafka_bootstrap, topics.usage_raw, [raw("a3", "alice", 250)])
            await eventually(lambda: status_of(cache, "alice") == ("over_limit", "hard_stop",
                                                                   1050), "hard stop")
            stopped = cache.get("alice")
            assert stopped is not None and stopped.message == (
                "Stopped until 2026-05-11T00:00:00+00:00.")
            assert not cache.allows("alice") and cache.allows("bob")

            switched = {"per_user_budgets": {**BUDGETS["per_user_budgets"],
                                             "on_limit_exceeded": {"action": "reduced_priority"}}}
            write_config(config_dir, switched)
            await eventually(lambda: status_of(cache, "alice") == (
                "over_limit", "reduced_priority", 1050), "reduced priority after reload")
            decided = cache.get("alice")
            assert decided is not None and decided.force_model == "anthropic/claude-3-haiku"

            (config_dir / "budgets.yaml").write_text("per_user_budgets: {default_limits: 5}\n")
            await asyncio.sleep(0.5)  # a bad file is refused: the old policy stays
            assert status_of(cache, "alice") == ("over_limit", "reduced_priority", 1050)
            write_config(config_dir, switched)

        sent = await alerts(kafka_bootstrap, topics)
        assert sorted((a.user_id, a.kind, a.threshold) for a in sent) == [
            ("alice", "limit", 100), ("alice", "warning", 75), ("alice", "warning", 90)]

        clock.now = NOON + timedelta(hours=12, seconds=1)  # past midnight: a new day
        async with running(enforcer):
            await eventually(lambda: status_of(cache, "alice") == ("ok", "allow", 0),
                             "ok after the reset, without new usage")
        resent = await alerts(kafka_bootstrap, topics)
        assert len(resent) == len(sent) + 1 and resent[-1].kind == "reset"
        assert len({a.alert_id for a in resent}) == len(resent)

    await cache.stop()
    dlq = await read_to_end(kafka_bootstrap, topics.usage_dlq)
    assert [orjson.loads(r.value or b"")["original"] for r in dlq] == ["{not json"]
    assert read_ids(db) == ["a1", "a2", "a3", "b1"]


def read_ids(db: Path) -> list[str]:
    """The ledger's event ids, read once the projector has closed its file."""
    with duckdb.connect(str(db), read_only=True) as con:
        return [r[0] for r in con.execute("SELECT event_id FROM ledger ORDER BY 1").fetchall()]


@contextlib.asynccontextmanager
async def following(bootstrap: str, topics: list[str],
                    handle: Callable[[list[Record]], None]) -> AsyncIterator[None]:
    """Every batch read from `topics` (all partitions, from the start) goes to `handle`
    while inside: what the services publish, read live."""
    consumer = make_consumer(bootstrap)
    await consumer.start()
    consumer.assign([tp for topic in topics for tp in await partitions_of(consumer, topic)])

    async def follow() -> None:
        while True:
            handle(await fetch(consumer, 1000, 100))

    task = asyncio.create_task(follow())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()
