"""The fault-injection run of bench/faults, short: 20k events, 6 SIGKILLs, a broker restart.

The three services run as child processes (`python -m tally.cli ...`) against a broker of
this test's own (its ports, its data dir), because the run stops and starts the broker,
which the session's shared test broker must never be. The full run is
`python -m bench.faults --events 200000` (see bench/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import duckdb
import httpx
import pyarrow as pa
import pytest
import yaml
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError

from bench.faults import Broker, Plan, render, run_faults
from bench.faults.chaos import low_free_port
from tally.config.loader import load_config
from tally.config.models import EventTimeWindow
from tally.identity import Directory
from tally.kafka import Record, ensure_topics, make_producer, read_to_end
from tally.ops import Metrics
from tally.services.enforcer.app import run_enforcer
from tally.services.ingest.app import Intake, KafkaPublisher, handle
from tally.services.projector import store
from tally.services.projector.app import run_projector
from tally.topics import Topics
from tally.wire import BalanceUpdated, BudgetDecided, RejectedEvent, UsageRecorded
from tests.enforcer.kit import free_port
from tests.enforcer.pipeline import until

NOW = datetime(2026, 5, 10, 12, tzinfo=UTC)


# Bugs the fault run found, each shown without Kafka ----------------------------------------


class RebalancedConsumer:
    """Its commits fail as they do when the group rebalanced during the batch."""

    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets)
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


async def test_ingest_goes_on_when_a_rebalance_refuses_its_commit() -> None:
    """The run saw ingest exit with CommitFailedError when its group rebalanced mid-batch.
    The batch is read again after the rebalance (at-least-once): no reason to die."""
    value = (b'{"event_id": "e1", "occurred_at": "2026-05-10T12:00:00Z", "user_id": "alice",'
             b' "model": "m", "input_tokens": 1, "output_tokens": 1}')
    consumer, publisher = RebalancedConsumer(), Recorder()
    await handle([Record("t.usage.raw", 0, 41, None, value, 0)],
                 cast(AIOKafkaConsumer, consumer), cast(KafkaPublisher, publisher),
                 Intake(Directory(), EventTimeWindow(max_age_days=3650)), Metrics())
    assert consumer.commits == [{TopicPartition("t.usage.raw", 0): 42}]
    assert [len(accepted) for accepted, _ in publisher.published] == [1]


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


@pytest.mark.kafka
async def test_a_restarted_enforcer_judges_nobody_before_it_has_read_the_balances(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """The run saw every restarted enforcer publish, before reading budget.balances, a
    decision with 0 tokens used for every users.yaml user: a user past the limit was told
    `allow` until the balances were read again."""
    topics, config_dir = Topics(f"faults-restart-{unique_name}"), tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "users.yaml").write_text(yaml.safe_dump(
        {"user_identification": {"users": [{"id": "alice"}]}}))
    (config_dir / "budgets.yaml").write_text(yaml.safe_dump({"per_user_budgets": {
        "default_limits": {"daily_tokens": 1000, "monthly_tokens": 100000},
        "on_limit_exceeded": {"action": "hard_stop"}}}))
    await ensure_topics(kafka_bootstrap, topics, 3)
    over = BalanceUpdated(user_id="alice", daily={"2026-05-10T00:00:00+00:00": 1500},
                          monthly={"2026-05-01T00:00:00+00:00": 1500},
                          last_event_at=NOW, as_of=NOW)
    producer = make_producer(kafka_bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topics.budget_balances, over.model_dump_json().encode(),
                                     key=b"alice")
    finally:
        await producer.stop()
    for run in (1, 2):
        stop, port = asyncio.Event(), free_port()
        task = asyncio.create_task(run_enforcer(config_dir, kafka_bootstrap, topics, stop,
                                                clock=lambda: NOW, tick_seconds=0.1,
                                                port=port))
        # Deciding for every partition, their users judged: whatever it would say early
        # (the bug) came before this; stopping then sends all it queued.
        await until(functools.partial(deciding_for_all, port, 3), 60)
        stop.set()
        await asyncio.wait_for(task, 30)
        decisions = [BudgetDecided.model_validate_json(r.value or b"")
                     for r in await read_to_end(kafka_bootstrap, topics.budget_decisions)]
        assert [(d.action, d.tokens_used) for d in decisions] == [("hard_stop", 1500)], run


async def deciding_for_all(port: int, partitions: int) -> bool:
    """Whether the enforcer on `port` is ready and decides for every partition (/readyz
    says so once it has judged their users)."""
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            answer = (await client.get(f"http://127.0.0.1:{port}/readyz")).json()
    except httpx.TransportError:
        return False
    return (answer.get("status") == "ready" and answer.get("restoring") is False
            and answer.get("partitions") == list(range(partitions)))


async def produce(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(topic, value, key=key)
    finally:
        await producer.stop()


def alice_used(balance: bytes | None) -> int:
    decoded = BalanceUpdated.model_validate_json(balance or b"")
    return decoded.periods["daily"]["2026-05-10T00:00:00+00:00"]


async def alice_balances(bootstrap: str, topics: Topics) -> list[int]:
    return [alice_used(r.value) for r in sorted(
        await read_to_end(bootstrap, topics.budget_balances), key=lambda r: r.offset)]


@pytest.mark.kafka
async def test_a_restarted_projector_never_sends_a_balance_older_than_one_already_sent(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    """The run saw decisions go back after a projector kill: balances are sent before
    their commit, so a killed run may have sent more than it stored, and the restart sent
    the stored (older) balances at once. Here the killed run's last send is forged."""
    topics, config_dir = Topics(f"faults-proj-{unique_name}"), tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "budgets.yaml").write_text(yaml.safe_dump({"per_user_budgets": {
        "default_limits": {"daily_tokens": 1000, "monthly_tokens": 100000}}}))
    config = load_config(config_dir)

    def events(first: int, last: int) -> list[tuple[bytes, bytes]]:
        return [(b"alice", UsageRecorded(event_id=f"e{i}", user_id="alice", occurred_at=NOW,
                                         model="m", input_tokens=10, output_tokens=0)
                 .model_dump_json().encode()) for i in range(first, last)]

    async def project_until(tokens: int, times: int = 1) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_projector(config, kafka_bootstrap, topics,
                                                 tmp_path / "p.duckdb", stop))
        for _ in range(300):
            if (await alice_balances(kafka_bootstrap, topics)).count(tokens) >= times:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(task, 30)

    await ensure_topics(kafka_bootstrap, topics, 1)
    await produce(kafka_bootstrap, topics.usage_events, events(0, 10))
    await project_until(100)
    ahead = BalanceUpdated(user_id="alice", daily={"2026-05-10T00:00:00+00:00": 200},
                           monthly={"2026-05-01T00:00:00+00:00": 200},
                           last_event_at=NOW, as_of=NOW)
    await produce(kafka_bootstrap, topics.usage_events, events(10, 20))
    await produce(kafka_bootstrap, topics.budget_balances,
                  [(b"alice", ahead.model_dump_json().encode())])
    await project_until(200, times=2)  # the forged one, then the restarted run's
    sent = await alice_balances(kafka_bootstrap, topics)
    assert sent == sorted(sent) and sent.count(200) == 2, sent


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
    # usage.dlq may hold copies re-sent by the at-least-once ingest; `rejected` may not
    assert figures.dlq.records - figures.dlq.copies == figures.dlq.malformed_on_raw == 200
    assert figures.dlq.rejected_rows == 200 and figures.dlq.rejected_duplicated == 0
    assert figures.decisions.users >= 40 and not figures.decisions.mismatched
    assert figures.history.published > 0 and not figures.history.went_back
    assert figures.alerts > 0 and figures.duplicate_alerts == 0
