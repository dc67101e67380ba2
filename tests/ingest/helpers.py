"""Shared by the ingest tests: sample events, a users.yaml, and reading a topic back."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from tally.config.models import (
    Authentication,
    AuthFile,
    BudgetsFile,
    Config,
    EventTimeWindow,
    Limits,
    PerUserBudgets,
    User,
    UserIdentification,
    UsersFile,
)
from tally.kafka import Record, batches, end_offsets, make_consumer, partitions_of

USERS = (
    User(id="alice", api_key="ak_alice_0123456789", role="engineer", department="research",
         identities=("telegram:123456", "openai-user:alice")),
    User(id="bob", api_key="ak_bob_0123456789", role="engineer"),
    User(id="gw", api_key="ak_gateway_0123456789", role="engineer", gateway=True),
)
# The sample events are of March 2025: a ten-year window keeps them acceptable for years.
BUDGETS = BudgetsFile(per_user_budgets=PerUserBudgets(
    default_limits=Limits(daily_tokens=1000, monthly_tokens=10000),
    event_time_window=EventTimeWindow(max_age_days=3650)))


def make_config(**auth: Any) -> Config:
    users = UsersFile(user_identification=UserIdentification(users=USERS))
    return Config(auth=AuthFile(authentication=Authentication(**auth)), users=users,
                  budgets=BUDGETS)


def usage(event_id: str = "e-1", **changes: Any) -> dict[str, Any]:
    return {"event_id": event_id, "occurred_at": "2025-03-01T12:00:00Z", "user_id": "alice",
            "model": "anthropic/claude-sonnet-4", "input_tokens": 100, "output_tokens": 20,
            **changes}


def raw(event_id: str = "e-1", **changes: Any) -> bytes:
    return orjson.dumps(usage(event_id, **changes))


async def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 30.0
                     ) -> list[Record]:
    """The first `count` records of `topic`, across partitions, from the beginning."""
    consumer = make_consumer(bootstrap)
    await consumer.start()
    got: list[Record] = []
    try:
        parts = await partitions_of(consumer, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        async with asyncio.timeout(timeout):
            async for batch in batches(consumer):
                got += batch
                if len(got) >= count:
                    break
    finally:
        await consumer.stop()
    return got


async def count_records(bootstrap: str, topic: str) -> int:
    """How many records `topic` holds now (no compaction or retention in these tests)."""
    consumer = make_consumer(bootstrap)
    await consumer.start()
    try:
        ends = await end_offsets(consumer, await partitions_of(consumer, topic))
    finally:
        await consumer.stop()
    return sum(ends.values())
