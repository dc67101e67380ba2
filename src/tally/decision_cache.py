"""The gateway's side: every user's latest decision, in memory, from budget.decisions.

The cache reads the compacted topic from the beginning, then follows it. `get` never
touches the network, so a gateway can call it on its request path. A user with no
decision yet is allowed or refused as configured (`fail_open`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition

from tally.kafka import Record, batches, end_offsets, make_consumer, partitions_of
from tally.topics import Topics
from tally.wire import BudgetDecided

__all__ = ["DecisionCache"]

log = logging.getLogger(__name__)

BLOCKING_ACTIONS = frozenset({"hard_stop"})


class DecisionCache:
    """Follows budget.decisions; `get` and `allows` answer from memory."""

    def __init__(
        self, bootstrap: str, topics: Topics | None = None, fail_open: bool = True
    ) -> None:
        self._bootstrap = bootstrap
        self._topic = (topics or Topics()).budget_decisions
        self._fail_open = fail_open
        self._decisions: dict[str, BudgetDecided] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._follower: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()

    def get(self, user_id: str) -> BudgetDecided | None:
        """The user's latest decision (with its `as_of`), or None if there is none yet."""
        return self._decisions.get(user_id)

    def allows(self, user_id: str) -> bool:
        """Whether a request may go ahead now; unknown users follow `fail_open`."""
        decision = self._decisions.get(user_id)
        if decision is None:
            return self._fail_open
        return decision.action not in BLOCKING_ACTIONS

    def snapshot(self) -> list[BudgetDecided]:
        """Every cached decision, for status pages and reports."""
        return list(self._decisions.values())

    def __len__(self) -> int:
        return len(self._decisions)

    async def start(self, timeout: float = 30.0) -> None:
        """Connect, then return once everything published before now has been read."""
        self._consumer = make_consumer(self._bootstrap)
        await self._consumer.start()
        parts = await partitions_of(self._consumer, self._topic)
        self._consumer.assign(parts)
        await self._consumer.seek_to_beginning(*parts)
        targets = await end_offsets(self._consumer, parts)
        self._follower = asyncio.create_task(self._follow(targets))
        await asyncio.wait_for(self._caught_up.wait(), timeout)

    async def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._consumer is not None:
            await self._consumer.stop()

    async def _follow(self, targets: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        await self._mark_if_caught_up(targets)
        async for batch in batches(self._consumer, timeout_ms=20):
            self._apply(batch)
            await self._mark_if_caught_up(targets)

    async def _mark_if_caught_up(self, targets: dict[TopicPartition, int]) -> None:
        assert self._consumer is not None
        if self._caught_up.is_set():
            return
        positions = [await self._consumer.position(tp) for tp in targets]
        if all(pos >= end for pos, end in zip(positions, targets.values(), strict=True)):
            self._caught_up.set()

    def _apply(self, batch: list[Record]) -> None:
        for record in batch:
            self._apply_one(record)

    def _apply_one(self, record: Record) -> None:
        if record.key is None:
            return
        user_id = record.key.decode()
        if record.value is None:  # a tombstone: the user's decision was withdrawn
            self._decisions.pop(user_id, None)
            return
        try:
            self._decisions[user_id] = BudgetDecided.model_validate_json(record.value)
        except ValueError as error:
            log.warning("skipping undecodable decision for %s at offset %d: %s",
                        user_id, record.offset, error)
