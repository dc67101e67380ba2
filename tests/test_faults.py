"""The fault-injection run of bench/faults, short: 20k events, 6 SIGKILLs, a broker restart.

The three services run as child processes (`python -m tally.cli ...`) against a broker of
this test's own (its ports, its data dir), because the run stops and starts the broker,
which the session's shared test broker must never be. The full run is
`python -m bench.faults --events 200000` (see bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import duckdb
import pyarrow as pa
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError

from bench.faults import Broker, Plan, render, run_faults
from bench.faults.chaos import low_free_port
from services.ingest.app import KafkaPublisher, consume
from services.projector import store
from tally.identity import Directory
from tally.topics import Topics
from tally.wire import RejectedEvent, UsageRecorded

NOW = datetime(2026, 5, 10, 12, tzinfo=UTC)


# Bugs the fault run found, each shown without Kafka ----------------------------------------


@dataclass(frozen=True)
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp: int = 0


class RebalancingConsumer:
    """Hands out `batches`, then idles; its first commit fails as after a group rebalance."""

    def __init__(self, batches: list[list[Message]]) -> None:
        self.pending = batches
        self.commits: list[dict[TopicPartition, int]] = []
        self.drained = asyncio.Event()

    async def getmany(self, timeout_ms: int, max_records: int) -> dict[TopicPartition, Any]:
        if not self.pending:
            self.drained.set()
            await asyncio.sleep(timeout_ms / 1000)
            return {}
        batch = self.pending.pop(0)
        return {TopicPartition(batch[0].topic, batch[0].partition): batch}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)
        if len(self.commits) == 1:
            raise CommitFailedError("the group has rebalanced")


class Recorder:
    """A publisher (or a producer's send) that keeps what it was given."""

    def __init__(self) -> None:
        self.published: list[tuple[Sequence[UsageRecorded], Sequence[RejectedEvent]]] = []
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def publish(self, accepted: Sequence[UsageRecorded],
                      rejected: Sequence[RejectedEvent]) -> None:
        self.published.append((accepted, rejected))

    async def send(self, topic: str, value: bytes,
                   key: bytes | None = None) -> asyncio.Future[None]:
        self.sent.append((topic, value, key))
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def raw_message(offset: int) -> Message:
    value = (f'{{"event_id": "e{offset}", "occurred_at": "2026-05-10T12:00:00Z", '
             f'"user_id": "alice", "model": "m", "input_tokens": 1, "output_tokens": 1}}')
    return Message("t.usage.raw", 0, offset, None, value.encode())


async def test_ingest_goes_on_when_a_rebalance_refuses_its_commit() -> None:
    """The run saw ingest exit with CommitFailedError when its group rebalanced mid-batch.
    The batch is read again after the rebalance (at-least-once): no reason to die."""
    consumer = RebalancingConsumer([[raw_message(0)], [raw_message(1)]])
    publisher = Recorder()
    loop = asyncio.create_task(consume(cast(AIOKafkaConsumer, consumer),
                                       cast(KafkaPublisher, publisher), Directory()))
    drained = asyncio.ensure_future(consumer.drained.wait())
    await asyncio.wait([loop, drained], timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert not loop.done(), "consume() ended instead of going on"
    for task in (loop, drained):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert len(publisher.published) == 2 and len(consumer.commits) == 2


async def test_ingest_keys_a_dlq_record_by_its_source() -> None:
    """Copies of one rejected usage.raw record (redelivered after a crash) land in one DLQ
    partition, in order, so the projector keeps the same first copy live and in replay."""
    producer = Recorder()
    rejected = RejectedEvent(reason="bad", source="kafka:t.usage.raw[2]@7", original="x",
                             rejected_at=NOW)
    await KafkaPublisher(cast(AIOKafkaProducer, producer), Topics("t")).publish([], [rejected])
    assert producer.sent == [("t.usage.dlq", rejected.model_dump_json().encode(),
                              b"kafka:t.usage.raw[2]@7")]


def rejected_rows(*rows: tuple[str, int, int]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"reason": "bad", "source": source, "original": "x", "rejected_at": NOW,
          "partition": partition, "offset": offset} for source, partition, offset in rows],
        schema=store.REJECTED_ARROW)


def test_projector_stores_a_malformed_message_once_however_often_it_was_rejected(
    tmp_path: Path,
) -> None:
    """The run's DLQ held 7 copies after ingest kills; the rejected table counted them."""
    no_events = pa.Table.from_pylist([], schema=store.LEDGER_ARROW)
    con: duckdb.DuckDBPyConnection = store.connect(tmp_path / "p.duckdb")
    dlq = "t.usage.dlq"
    store.apply_batch(con, no_events, {(dlq, 0): 2}, rejected_rows(
        ("kafka:t.usage.raw[0]@5", 0, 0), ("kafka:t.usage.raw[0]@5", 0, 1)))
    store.apply_batch(con, no_events, {(dlq, 0): 5}, rejected_rows(
        ("kafka:t.usage.raw[0]@5", 0, 2), ("http:POST /v1/usage", 0, 3),
        ("http:POST /v1/usage", 0, 4)))
    assert con.execute('SELECT source, "offset" FROM rejected ORDER BY 2').fetchall() == [
        ("kafka:t.usage.raw[0]@5", 0), ("http:POST /v1/usage", 3), ("http:POST /v1/usage", 4)]


# The run itself ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fault_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    port = low_free_port()
    controller_port = port
    while controller_port == port:
        controller_port = low_free_port()
    broker = Broker(port, controller_port, tmp_path_factory.mktemp("kafka-faults"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.mark.kafka
async def test_kills_and_a_broker_restart_lose_nothing_and_count_nothing_twice(
    fault_broker: Broker, tmp_path: Path
) -> None:
    plan = Plan(events=20_000, kills=6, rate=1_000, seed=6, drain_timeout=180)
    figures = await run_faults(plan, fault_broker, tmp_path)
    report = render(figures)
    print(report)
    assert figures.failures() == [], report
    assert figures.kills == 6
    assert {name: s.kills for name, s in figures.services.items()} == {
        "ingest": 2, "projector": 2, "enforcer": 2}
    assert figures.balances.lost == 0 and figures.balances.extra == 0
    assert figures.dlq.records == figures.dlq.malformed_on_raw == 200
    assert figures.decisions.users >= 40 and not figures.decisions.mismatched
    assert figures.alerts > 0 and figures.duplicate_alerts == 0
