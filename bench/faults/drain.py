"""When a fault run is over: everything produced has gone all the way through.

Drained means: the ingest group has committed usage.raw to its end; the projector's stored
offsets (asked through its audit endpoint) reach the ends of usage.events and usage.dlq;
and budget.balances, budget.decisions and budget.alerts have not grown for `settle`
seconds while the enforcer has been up for twice that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from bench.faults.services import Service
from bench.faults.workload import AUDITOR_KEY
from tally.kafka import end_offsets, make_admin, make_consumer, partitions_of
from tally.topics import Topics

__all__ = ["wait_until_drained"]

log = logging.getLogger(__name__)


class _Gauges:
    def __init__(self, bootstrap: str, topics: Topics, projector_port: int) -> None:
        self.topics = topics
        self.consumer = make_consumer(bootstrap)
        self.admin = make_admin(bootstrap)
        self.audit_url = f"http://127.0.0.1:{projector_port}/audit"

    async def end(self, topic: str) -> int:
        parts = await partitions_of(self.consumer, topic)
        return sum((await end_offsets(self.consumer, parts)).values())

    async def ingest_committed(self) -> int:
        group = f"tally-ingest:{self.topics.usage_raw}"
        offsets = await self.admin.list_consumer_group_offsets(group)
        return sum(meta.offset for tp, meta in offsets.items()
                   if tp.topic == self.topics.usage_raw and meta.offset > 0)

    async def projector_consumed(self) -> dict[str, int]:
        sql = "SELECT topic, sum(next_offset) FROM offsets GROUP BY topic"
        async with httpx.AsyncClient(timeout=5.0) as client:
            response = await client.post(self.audit_url, json={"sql": sql},
                                         headers={"X-API-Key": AUDITOR_KEY})
        return {topic: int(total) for topic, total in response.json()["rows"]}

    async def through(self) -> bool:
        """Ingest and projector have consumed everything there is."""
        if await self.ingest_committed() < await self.end(self.topics.usage_raw):
            return False
        consumed = await self.projector_consumed()
        ends = [await self.end(t) for t in (self.topics.usage_events, self.topics.usage_dlq)]
        return all(consumed.get(t, 0) >= end for t, end in zip(
            (self.topics.usage_events, self.topics.usage_dlq), ends, strict=True))

    async def outputs(self) -> tuple[int, ...]:
        t = self.topics
        return tuple([await self.end(n) for n in (t.budget_balances, t.budget_decisions,
                                                  t.budget_alerts)])


@contextlib.asynccontextmanager
async def _gauges(bootstrap: str, topics: Topics, port: int) -> AsyncIterator[_Gauges]:
    gauges = _Gauges(bootstrap, topics, port)
    consumer: AIOKafkaConsumer = gauges.consumer
    await consumer.start()
    await gauges.admin.start()
    try:
        yield gauges
    finally:
        await gauges.admin.close()
        await consumer.stop()


async def wait_until_drained(bootstrap: str, topics: Topics, projector_port: int,
                             enforcer: Service, settle: float, timeout: float) -> bool:
    """True once drained (see the module doc); False after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with _gauges(bootstrap, topics, projector_port) as gauges:
        last: tuple[int, ...] = ()
        since = loop.time()
        while loop.time() < deadline:
            await asyncio.sleep(0.5)
            try:
                if not await gauges.through():
                    last = ()
                    continue
                outputs = await gauges.outputs()
            except (KafkaError, httpx.HTTPError, KeyError, ValueError) as error:
                log.debug("not drained yet: %r", error)
                last = ()
                continue
            if outputs != last:
                last, since = outputs, loop.time()
            elif loop.time() - since >= settle and enforcer.uptime() >= 2 * settle:
                return True
    return False
