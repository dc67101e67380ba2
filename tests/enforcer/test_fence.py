"""Fencing per partition (fence.py), on the real broker: an enforcer that lost a partition
of budget.balances (a zombie) cannot send alerts for its users once the new owner has
started that partition's producer, neither the batch it held in an open transaction when
it was paused nor a later one; read_committed readers see each alert once. An enforcer
fenced off a partition the group still gives it takes the partition again."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path

import httpx
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import MessageSizeTooLargeError, ProducerFenced

from tally.kafka import Record, ensure_topics, make_producer, read_to_end
from tally.service import started
from tally.services.enforcer.app import run_enforcer
from tally.services.enforcer.fence import (
    ATTEMPTS,
    AlertSenders,
    account,
    shares_of,
    transactional_id,
)
from tally.services.enforcer.heard import decode_all
from tally.services.enforcer.memory import AlertsSent
from tally.services.enforcer.state import Enforcer, partition_of
from tally.topics import Topics
from tally.wire import BudgetAlerted, BudgetDecided
from tests.test_pipeline import running

from .kit import NOON, balances, config, events, free_port
from .pipeline import until, write_config

pytestmark = pytest.mark.kafka

PARTITIONS = 3
USAGE = {"bob": 800, "dave": 1200}  # bob warns (75 %); dave warns and is over the limit


async def test_a_fenced_zombie_sends_no_alert_read_committed_readers_see(
        kafka_bootstrap: str, unique_name: str) -> None:
    topics = Topics(f"fence-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    cfg = config()
    state = Enforcer(cfg)  # the zombie's
    outcome = state.on_balances(balances(cfg, events(USAGE)), NOON)
    moved, kept = partition_of("dave", PARTITIONS), partition_of("bob", PARTITIONS)
    assert moved != kept and {a.user_id for a in outcome.alerts} == set(USAGE)
    shares = shares_of(outcome.alerts, outcome.memory, PARTITIONS)
    stale = next(a for a in outcome.alerts if a.user_id == "dave")

    async with (started(AlertSenders(kafka_bootstrap, topics, PARTITIONS)) as zombie,
                started(AlertSenders(kafka_bootstrap, topics, PARTITIONS)) as owner):
        # A zombie paused with an alert batch in hand: its transaction open, the alert in
        # the log; then the group gives `moved` to another instance, which takes it.
        await zombie.own({moved, kept})
        producer = zombie.producers[moved]
        await producer.begin_transaction()
        await (await producer.send(topics.budget_alerts, stale.model_dump_json().encode(),
                                   key=b"dave"))
        await owner.own({moved})
        sent = await owner.send({moved: shares[moved]})
        assert sent.committed == {moved} and not sent.fenced and sent.error is None
        # The zombie resumes: its commit fails, and so does its next batch's share of
        # `moved`; its share of the partition it still owns goes out.
        with pytest.raises(ProducerFenced):
            await producer.commit_transaction()
        sent = await zombie.send(shares)
        assert (sent.committed, sent.fenced, sent.error) == ({kept}, {moved}, None)
        # It counts as sent only what was committed: given `moved` back one day, it
        # would send dave's alerts unless it heard them (no alert lost).
        assert account(state.memory, outcome.alerts, sent, PARTITIONS) == shares[kept][0]
        assert state.memory.ids == {a.alert_id for a in shares[kept][0]}

    committed = decode_all(BudgetAlerted, await read_to_end(kafka_bootstrap,
                                                             topics.budget_alerts))
    assert Counter(a.alert_id for a in committed) == Counter(a.alert_id
                                                             for a in outcome.alerts)
    memory = decode_all(AlertsSent, await read_to_end(kafka_bootstrap,
                                                      topics.budget_alert_memory))
    assert sorted(m.key for m in memory) == sorted(m.key for m in outcome.memory)
    # The zombie's alerts did reach the log: only the isolation level keeps them unseen.
    written = Counter(a.alert_id for a in await read_uncommitted(kafka_bootstrap,
                                                                 topics.budget_alerts))
    assert written[stale.alert_id] >= 2  # the zombie's open transaction's, and the owner's
    # A fenced aiokafka producer leaves reference cycles holding unfinished coroutines:
    # collected now, in this test's loop, and not later by a collection that falls inside
    # a compile (pytest's assertion rewriting), where CPython 3.11.7 raises SystemError
    # ("AST constructor recursion depth mismatch") when a finalizer runs.
    gc.collect()


async def test_a_transaction_that_fails_is_tried_again_then_raises_and_nothing_is_seen(
        kafka_bootstrap: str, unique_name: str) -> None:
    topics = Topics(f"fence-fail-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    cfg = config()
    state = Enforcer(cfg)
    outcome = state.on_balances(balances(cfg, events({"dave": 1200})), NOON)
    warned, limited = outcome.alerts
    # The limit alert too large to send (the producer refuses a request over 1 MB): the
    # warning is in the log by then, in a transaction that must be aborted.
    huge = limited.model_copy(update={"message": "x" * 2_000_000})
    shares = shares_of([warned, huge], outcome.memory, PARTITIONS)
    async with started(AlertSenders(kafka_bootstrap, topics, PARTITIONS)) as owner:
        await owner.own(range(PARTITIONS))
        sent = await owner.send(shares)
    assert isinstance(sent.error, MessageSizeTooLargeError) and not sent.committed
    assert account(state.memory, outcome.alerts, sent, PARTITIONS) == []
    assert not state.memory.ids  # judged again (after a restart), both are due
    assert state.evaluate({"dave"}, NOON).alerts == outcome.alerts
    assert not await read_to_end(kafka_bootstrap, topics.budget_alerts)
    assert not await read_to_end(kafka_bootstrap, topics.budget_alert_memory)
    tries = await read_uncommitted(kafka_bootstrap, topics.budget_alerts)
    assert [a.alert_id for a in tries] == [warned.alert_id] * ATTEMPTS  # each aborted


async def test_an_owner_fenced_from_outside_the_group_takes_its_partition_again(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """A producer started by hand with the transactional id of a partition the enforcer
    owns fences the enforcer's producer: the next alerts of that partition's users are
    aborted. The group still gives the partition to the enforcer, so it takes it again
    (fencing the other producer) and sends them: each once, and the alerted user's
    decision with them; the service goes on, fenced once."""
    topics = Topics(f"fence-own-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    config_dir, port = write_config(tmp_path / "config"), free_port()
    url, every = f"http://127.0.0.1:{port}", list(range(PARTITIONS))
    fenced = partition_of("dave", PARTITIONS)
    cfg = config()
    due = Enforcer(cfg).on_balances(balances(cfg, events(USAGE)), NOON).alerts

    def enforcer(stop: asyncio.Event) -> Awaitable[None]:
        return run_enforcer(config_dir, kafka_bootstrap, topics, stop, clock=lambda: NOON,
                            tick_seconds=0.2, partitions=PARTITIONS, port=port)

    caplog.set_level(logging.WARNING, logger="tally.services.enforcer")
    async with (running(enforcer), httpx.AsyncClient(timeout=10) as client,
                started(make_producer(kafka_bootstrap)) as producer):
        await until(lambda: owns(client, url, every))
        # Starting it (InitProducerId) fences the enforcer's producer of `fenced`.
        async with started(make_producer(kafka_bootstrap, transactional_id=transactional_id(
                topics, fenced))):
            pass
        for balance in balances(cfg, events(USAGE)):
            await producer.send_and_wait(topics.budget_balances,
                                         balance.model_dump_json().encode(),
                                         key=balance.user_id.encode())
        # Its alerts, then its decision (withheld until they commit), and the partition.
        await until(lambda: seen(kafka_bootstrap, topics.budget_alerts, len(due)))
        await until(lambda: decided(kafka_bootstrap, topics, "dave", "over_limit"))
        await until(lambda: owns(client, url, every))
    committed = decode_all(BudgetAlerted, await read_to_end(kafka_bootstrap,
                                                             topics.budget_alerts))
    assert Counter(a.alert_id for a in committed) == Counter(a.alert_id for a in due)
    assert [r.getMessage() for r in caplog.records if "fenced off" in r.getMessage()
            and r.name.endswith("group")] == [
        f"fenced off budget.balances partitions [{fenced}]: deciding for their users no longer"]
    gc.collect()  # the fenced producer's cycles (see the first test)


async def owns(client: httpx.AsyncClient, url: str, partitions: list[int]) -> bool:
    """Whether the enforcer says on /readyz it decides for exactly these partitions."""
    try:
        answer = (await client.get(f"{url}/readyz")).json()
    except httpx.TransportError:  # not listening yet
        return False
    return bool(answer.get("status") == "ready" and not answer.get("restoring", True)
                and answer.get("partitions") == partitions)


async def seen(bootstrap: str, topic: str, count: int) -> bool:
    await asyncio.sleep(0.4)  # each look starts a consumer: not ten a second
    return len(await read_to_end(bootstrap, topic)) >= count


async def decided(bootstrap: str, topics: Topics, user: str, status: str) -> bool:
    await asyncio.sleep(0.4)
    decisions = decode_all(BudgetDecided, await read_to_end(bootstrap, topics.budget_decisions))
    return [d.status for d in decisions if d.user_id == user][-1:] == [status]


async def read_uncommitted(bootstrap: str, topic: str) -> list[BudgetAlerted]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                isolation_level="read_uncommitted", enable_auto_commit=False)
    async with started(consumer):
        found = await consumer.getmany(timeout_ms=2000, max_records=1000)
    return decode_all(BudgetAlerted, [
        Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
        for messages in found.values() for m in messages])
