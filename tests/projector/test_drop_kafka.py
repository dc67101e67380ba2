"""A large lost partition deleted while the instance stays in the group (drop.py), on the
real broker with real DuckDB files.

An instance holds every partition, three of them large (100,000 ledger rows between them);
a second joins and takes those three (the warm assignor gives a fresh instance the lowest
partitions: its file holds none). The first deletes them from its file a slice at a time,
outside the rebalance listener, while usage keeps coming: it goes on folding its own
partitions meanwhile, is not dropped from the group (one rebalance, the join's), and no
audit of its file ever counts a partition half deleted (the audit waits for the deletion)."""

from __future__ import annotations

import asyncio
import signal
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tally.kafka import ensure_topics, make_producer, read_to_end
from tally.service import started
from tally.services.projector.drop import SLICE_ROWS
from tally.topics import Topics
from tally.wire import BalanceUpdated
from tests.projector.history import Message, event_ids, history, partition_of, produce_fast
from tests.projector.test_instances_kafka import (
    PARTITIONS,
    instance,
    latest_by_position,
    readyz,
    settled,
)
from tests.projector.test_projector_kafka import ADMIN, BALANCES, RECOUNT, db_rows, free_port
from tests.projector.test_restore_zombie_kafka import BALANCE_ROWS, as_rows

pytestmark = pytest.mark.kafka

LOST = (0, 1, 2)  # what the second instance takes
LOST_ROWS = 100_000
IN_LOST = f"topic_partition IN ({', '.join(map(str, LOST))})"


def split(messages: list[Message]) -> tuple[list[Message], list[Message]]:
    """The messages of the LOST partitions, and the others."""
    lost = [m for m in messages if partition_of(m, PARTITIONS) in LOST]
    return lost, [m for m in messages if partition_of(m, PARTITIONS) not in LOST]


async def test_a_large_lost_partition_is_deleted_while_the_instance_stays_and_folds(
    kafka_bootstrap: str, unique_name: str, config_dir: Path, tmp_path: Path
) -> None:
    topics = Topics(f"dropk-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    big, _ = split(history(LOST_ROWS * 2, users=300, seed=41))
    _, small = split(history(20_000, users=300, seed=42))
    past = big + small
    assert len(event_ids(big)) > SLICE_ROWS  # deleted in more than one slice
    await produce_fast(kafka_bootstrap, topics.usage_events, past)
    # Usage of the partitions it keeps, arriving while it deletes the others.
    _, stream = split(history(12_000, users=300, seed=43))
    dbs, ports = [tmp_path / "a.duckdb", tmp_path / "b.duckdb"], [free_port(), free_port()]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    async with instance(kafka_bootstrap, topics, dbs[0], config_dir, ports[0],
                        log=logs[0]) as a:
        await settled(ports[:1], topics.usage_events, len(past))
        done = asyncio.Event()
        audits = asyncio.create_task(audit_until(ports[0], done))
        trickling = asyncio.create_task(trickle(kafka_bootstrap, topics.usage_events, stream,
                                                done))
        async with instance(kafka_bootstrap, topics, dbs[1], config_dir, ports[1],
                            log=logs[1]) as b:
            seen = await deleting(ports[0])
            done.set()
            sent = await trickling
            answers = await audits
            await settled(ports, topics.usage_events, len(past) + sent)
            # Read before they stop: one leaving first may make the other rejoin once more.
            said = [log.read_text() for log in logs]
            for process in (a, b):
                process.send_signal(signal.SIGTERM)
            assert [await asyncio.wait_for(p.wait(), 30) for p in (a, b)] == [0, 0]
    # It said it was deleting them (after the listener, the new share owned), and no audit
    # answer counted them part deleted: all of them before the rebalance, none after.
    assert seen == {"partitions": [3, 4, 5], "dropping": list(LOST)}, seen
    assert answers and {n for _, n in answers} <= {len(event_ids(big)), 0}, answers[-5:]
    # Not dropped from the group: each instance was assigned once per membership change.
    assert [text.count("projector: owns partitions") for text in said] == [2, 1], said[0]
    assert "not recognized" not in said[0] and "session expired" not in said[0]
    # It folded its partitions while deleting: a balance of one of them went out between
    # its new assignment and the end of the deletion (a live batch between two slices;
    # a deletion holding the writing lock throughout sends none there).
    took, deleted = (when(said[0], line) for line in ("projector: owns partitions [3, 4, 5]",
                                                      "projector: deleted partitions"))
    records = [r for r in await read_to_end(kafka_bootstrap, topics.budget_balances)
               if r.value is not None]
    published = [BalanceUpdated.model_validate_json(r.value) for r in records]
    assert any(took < r.timestamp_ms / 1000 < deleted and b.source_partition not in LOST
               for b, r in zip(published, records, strict=True)), (took, deleted)
    # Its file holds its own partitions whole and nothing of the lost ones.
    assert db_rows(dbs[0], f"SELECT count(*) FROM ledger WHERE {IN_LOST}") == {(0,)}
    assert db_rows(dbs[0], "SELECT DISTINCT partition FROM offsets WHERE topic = "
                           f"'{topics.usage_events}'") == {(3,), (4,), (5,)}
    ids = event_ids(past + stream[:sent])
    ledgers = [db_rows(db, "SELECT event_id FROM ledger") for db in dbs]
    assert sum(len(ledger) for ledger in ledgers) == len(ids)
    assert ledgers[0] | ledgers[1] == {(i,) for i in ids}
    assert all(db_rows(db, BALANCES) == db_rows(db, RECOUNT) for db in dbs)
    files = set().union(*(db_rows(db, BALANCE_ROWS) for db in dbs))
    assert as_rows(latest_by_position(published)) == files


async def deleting(port: int, timeout: float = 90) -> dict[str, list[int]]:
    """Until the instance has deleted what it lost; what it said while deleting (its
    partitions and those being deleted), or {} if it was never seen deleting."""
    seen: dict[str, list[int]] = {}
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        state = await readyz(port)
        if state["dropping"]:
            seen = {"partitions": state["partitions"], "dropping": state["dropping"]}
        elif seen:
            return seen
        await asyncio.sleep(0.01)
    raise AssertionError("the instance did not delete what it lost")


async def audit_until(port: int, done: asyncio.Event) -> list[tuple[int, int]]:
    """Ask the instance's /audit for the rows of the LOST partitions again and again until
    `done`; each answer's status and count."""
    answers = []
    async with httpx.AsyncClient(timeout=60) as client:
        while not done.is_set():
            answer = await client.post(
                f"http://127.0.0.1:{port}/audit", headers=ADMIN,
                json={"sql": f"SELECT count(*) FROM ledger WHERE {IN_LOST}"})
            assert answer.status_code == 200, answer.text
            answers.append((answer.status_code, answer.json()["rows"][0][0]))
            await asyncio.sleep(0.02)  # leave the 2 cores to the instances
    return answers


async def trickle(bootstrap: str, topic: str, messages: list[Message],
                  done: asyncio.Event) -> int:
    """Usage arriving a little at a time until `done` (or none is left); how many sent."""
    sent = 0
    async with started(make_producer(bootstrap)) as producer:
        while sent < len(messages) and not done.is_set():
            chunk = messages[sent:sent + 20]
            await asyncio.gather(*[await producer.send(topic, value, key=key)
                                   for key, value in chunk])
            sent += len(chunk)
            await asyncio.sleep(0.02)
    return sent


def when(log: str, line: str) -> float:
    """The time of the first log line holding `line` (the service logs local time)."""
    [first, *_] = [row for row in log.splitlines() if line in row]
    return datetime.strptime(first[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()

