"""A gained partition with history is restored in bulk (restore.py), on the real broker:
usage.events already holds more than BULK_FROM records a partition when a `tally
projector` starts on an empty file, so it gains every partition far behind and restores
them in bulk; a second one joins and takes half of them away mid-restore (the first is
paused while restoring until the second listens; whether the rebalance lands before the
restore ends is up to the machine, and printed). Then usage keeps coming, with copies of
restored events. Each event is in one ledger once, the balances equal the recount, and
none that readers keep ever goes back."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import httpx
import pytest

from tally.config.loader import load_config
from tally.core.usage import from_balance
from tally.kafka import ensure_topics
from tally.services.projector.restore import BULK_FROM
from tally.topics import Topics
from tests.projector.test_instances_kafka import (
    PARTITIONS,
    balances_on_topic,
    instance,
    latest_by_position,
    never_goes_back,
    readyz,
    settled,
    spread,
)
from tests.projector.test_projector_kafka import (
    BALANCES,
    RECOUNT,
    db_rows,
    expected,
    free_port,
    make_events,
    period_rows,
    produce,
    usage_messages,
    with_duplicates,
)

pytestmark = pytest.mark.kafka

HISTORY = PARTITIONS * BULK_FROM * 3 // 2  # a partition holds 1.5 BULK_FROM on average


async def test_a_gained_partition_is_restored_in_bulk_and_a_rebalance_mid_restore_is_safe(
    kafka_bootstrap: str, unique_name: str, config_dir: Path, tmp_path: Path
) -> None:
    config = load_config(config_dir)
    topics = Topics(f"bulk-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    events = spread(make_events(HISTORY + 2_000, seed=21), users=60)
    history, later = events[:HISTORY], events[HISTORY:]
    await produce(kafka_bootstrap, topics.usage_events,
                  usage_messages(with_duplicates(history, every=40)))
    # Live after the restore: new events, and copies of restored ones (dedupe across both).
    tail = with_duplicates(later, every=20) + history[-300:]
    dbs, ports = [tmp_path / "a.duckdb", tmp_path / "b.duckdb"], [free_port(), free_port()]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    async with instance(kafka_bootstrap, topics, dbs[0], config_dir, ports[0],
                        log=logs[0]) as a:
        # Paused as soon as it restores (every partition, its file empty), resumed once the
        # second listens (its join waiting for the first): the rebalance comes mid-restore.
        await restoring(ports[0])
        a.send_signal(signal.SIGSTOP)
        async with instance(kafka_bootstrap, topics, dbs[1], config_dir, ports[1],
                            log=logs[1]) as b:
            await listening(ports[1])
            a.send_signal(signal.SIGCONT)
            sent = len(with_duplicates(history, every=40))
            await settled(ports, topics.usage_events, sent)
            await produce(kafka_bootstrap, topics.usage_events, usage_messages(tail))
            await settled(ports, topics.usage_events, sent + len(tail))
            # Every record is counted in (tally_events_in), the bulk-restored ones too; one
            # folded by both (a restore stopped by the rebalance) twice.
            assert sum([await events_in(port, topics.usage_events) for port in ports]) >= (
                sent + len(tail))
            for process in (a, b):
                process.send_signal(signal.SIGTERM)
            assert [await asyncio.wait_for(p.wait(), 30) for p in (a, b)] == [0, 0]
    said = "\n".join(log.read_text() for log in logs)
    assert "in bulk:" in said, said  # restored through the bulk path
    print("a bulk restore stopped by a rebalance:", "stopped by a rebalance" in said)
    want = expected(events, config)
    ledgers = [db_rows(db, "SELECT event_id FROM ledger") for db in dbs]
    assert sum(len(ledger) for ledger in ledgers) == len(events)  # each event once, once only
    assert ledgers[0] | ledgers[1] == {(e.event_id,) for e in events}
    assert all(db_rows(db, BALANCES) == db_rows(db, RECOUNT) for db in dbs)
    assert db_rows(dbs[0], BALANCES) | db_rows(dbs[1], BALANCES) == period_rows(want)
    published = await balances_on_topic(kafka_bootstrap, topics.budget_balances)
    assert never_goes_back(published) == []
    kept = latest_by_position(published)
    assert period_rows({u: from_balance(b) for u, b in kept.items()}) == period_rows(want)


async def events_in(port: int, topic: str) -> float:
    """tally_events_in of a topic, from the instance's /metrics."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    line = f'tally_events_in_total{{source="{topic}"}} '
    return sum(float(row.removeprefix(line)) for row in text.splitlines()
               if row.startswith(line))


async def restoring(port: int, timeout: float = 60) -> None:
    """Until the instance owns partitions and restores some."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(httpx.TransportError):  # not listening yet
            if (await readyz(port)).get("restoring"):
                return
        await asyncio.sleep(0.02)
    raise AssertionError("the instance did not restore")


async def listening(port: int, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(httpx.TransportError):
            await readyz(port)
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the instance did not listen")
