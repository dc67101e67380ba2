"""A zombie in the middle of a bulk restore (restore.py), on the real broker.

usage.events holds history when a `tally projector` starts on an empty file: it restores
every partition in bulk, in small batches here (its bulk batch is cut from one DuckDB row
group to ZOMBIE_BATCH records, so that a short history takes many batches). It is paused
(SIGSTOP) once its first bulk batch is stored, and stays paused past its session timeout:
a second instance takes every partition, restores them and folds more usage. Resumed
(SIGCONT), the zombie goes on with its restore until it learns it was fenced; the rebalance
stops the restore part way, and it is given back a share, which it restores from what its
file holds, by the live fold (less than --bulk-from left).

Nothing it sends after losing its partitions changes a balance readers keep; its file ends
consistent (the partitions it lost deleted, those given back whole); each event is in one
ledger once; every balance equals the recount; and it serves its share afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tally.kafka import end_offsets, ensure_topics, make_consumer, partitions_of
from tally.services.projector.query import MAX_ROWS
from tally.topics import Topics
from tally.wire import BalanceUpdated
from tests.projector.history import event_ids, history, produce_fast
from tests.projector.test_instances_kafka import (
    PARTITIONS,
    balances_on_topic,
    instance,
    latest_by_position,
    never_goes_back,
    readyz,
    settled,
)
from tests.projector.test_projector_kafka import ADMIN, BALANCES, RECOUNT, db_rows, free_port
from tests.projector.test_restore_kafka import events_in

pytestmark = pytest.mark.kafka

HISTORY = 40_000
USERS = 300  # every partition holds 5,800 records or more
ZOMBIE_BATCH = 1_000  # records a bulk batch of the zombie's: its restore takes ~40 batches


def cut_bulk_batches(records: int) -> tuple[str, ...]:
    """The Python program of `tally` (instance's `program`) with its bulk restore's
    batches cut to `records`."""
    return ("-c", "import sys; from tally.services.projector import restore; "
            f"restore.REPLAY_BATCH = {records}; from tally.cli import main; sys.exit(main())")


ZOMBIE = cut_bulk_batches(ZOMBIE_BATCH)
# The zombie restores in bulk every partition it gains from an empty file, and by the live
# fold what is left of its share once it rejoins (its stopped restore stored part of it):
# the path on which its memory must learn what that restore stored.
ZOMBIE_BULK_FROM = 5_500


async def test_a_zombie_paused_mid_bulk_restore_changes_no_balance_and_ends_consistent(
    kafka_bootstrap: str, unique_name: str, config_dir: Path, tmp_path: Path
) -> None:
    topics = Topics(f"zrest-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    past = history(HISTORY, users=USERS, seed=31, copies_every=50)
    await produce_fast(kafka_bootstrap, topics.usage_events, past)
    # Usage while the zombie is paused (new events, copies of restored ones), and after.
    meanwhile = history(3_000, users=USERS, seed=32) + past[-400:]
    later = history(1_000, users=USERS, seed=33)
    dbs, ports = [tmp_path / "zombie.duckdb", tmp_path / "b.duckdb"], [free_port(), free_port()]
    logs = [tmp_path / "zombie.log", tmp_path / "b.log"]
    async with instance(kafka_bootstrap, topics, dbs[0], config_dir, ports[0],
                        "--bulk-from", str(ZOMBIE_BULK_FROM), log=logs[0],
                        program=ZOMBIE) as zombie:
        caught = await first_bulk_batch_stored(ports[0], topics.usage_events)
        zombie.send_signal(signal.SIGSTOP)
        assert caught, "the restore had ended before the pause: the case is not reached"
        async with instance(kafka_bootstrap, topics, dbs[1], config_dir, ports[1],
                            log=logs[1]) as b:
            # B takes every partition once the zombie's session times out, and restores.
            await settled(ports[1:], topics.usage_events, len(past))
            await produce_fast(kafka_bootstrap, topics.usage_events, meanwhile)
            total = len(past) + len(meanwhile)
            await settled(ports[1:], topics.usage_events, total)
            want = await balance_rows(ports[1])
            reached = await ends_of(kafka_bootstrap, topics.usage_events)
            before = await balances_on_topic(kafka_bootstrap, topics.budget_balances)
            assert as_rows(latest_by_position(before)) == want
            zombie.send_signal(signal.SIGCONT)
            # It finishes what it had in hand, learns it was fenced, rejoins, takes a share.
            await settled(ports, topics.usage_events, total)
            assert all([(await readyz(port))["partitions"] for port in ports])
            await produce_fast(kafka_bootstrap, topics.usage_events, later)
            await settled(ports, topics.usage_events, total + len(later))
            for process in (zombie, b):
                process.send_signal(signal.SIGTERM)
            assert [await asyncio.wait_for(p.wait(), 30) for p in (zombie, b)] == [0, 0]
    said = logs[0].read_text()
    # Whether the rebalance stopped the zombie's restore (else it ended before the zombie
    # heard it was fenced: a case the test does not reach then).
    print("the zombie's restore stopped by the rebalance:", "stopped by a rebalance" in said)
    published = await balances_on_topic(kafka_bootstrap, topics.budget_balances)
    # Nothing sent from the zombie's resumption on changed a kept balance: every record
    # readers take in place of theirs, up to the usage before `later`, has its figures.
    changed = changes_to(latest_by_position(before), published[len(before):], want, reached)
    assert changed == [], changed[:5]
    assert never_goes_back(published) == []
    # Each file consistent: its partitions whole, none it lost, balances the recount.
    ids = event_ids(past + meanwhile + later)
    ledgers = [db_rows(db, "SELECT event_id FROM ledger") for db in dbs]
    assert sum(len(ledger) for ledger in ledgers) == len(ids)  # each event once, once only
    assert ledgers[0] | ledgers[1] == {(i,) for i in ids}
    assert all(db_rows(db, BALANCES) == db_rows(db, RECOUNT) for db in dbs)
    partitions = [db_rows(db, "SELECT DISTINCT topic_partition FROM ledger") for db in dbs]
    assert not partitions[0] & partitions[1] and partitions[0]
    stored = db_rows(dbs[0], "SELECT partition FROM offsets WHERE topic = "
                               f"'{topics.usage_events}'")
    assert stored == partitions[0]
    kept = latest_by_position(published)
    files = set().union(*(db_rows(db, BALANCE_ROWS) for db in dbs))
    assert as_rows(kept) == files


BALANCE_ROWS = "SELECT user_id, period, epoch(period_start)::BIGINT, tokens FROM balances"


def as_rows(balances: dict[str, BalanceUpdated]) -> set[tuple[Any, ...]]:
    """The balances as the rows of BALANCE_ROWS."""
    return {(b.user_id, kind, int(_start(start)), tokens)
            for b in balances.values()
            for kind, totals in b.periods.items() for start, tokens in totals.items()}


def _start(start: Any) -> float:
    return (start if isinstance(start, datetime) else datetime.fromisoformat(start)).timestamp()


def changes_to(kept: dict[str, BalanceUpdated], records: list[BalanceUpdated],
               want: set[tuple[Any, ...]], reached: dict[int, int]) -> list[str]:
    """Of `records` (in order, after `kept`), those a reader would keep instead of its
    balance whose figures differ from `want`: at a position up to `reached` (the end of its
    partition before the usage that followed), a balance must say what `want` says."""
    changed = []
    for record in records:
        held = kept.get(record.user_id)
        if held is not None and not held.superseded_by(record):
            continue
        kept[record.user_id] = record
        position = record.source_partition, record.source_offset
        if position[0] is None or position[1] is None or position[1] <= reached[position[0]]:
            mine = {row for row in want if row[0] == record.user_id}
            if as_rows({record.user_id: record}) != mine:
                changed.append(f"{record.user_id} at {position}")
    return changed


async def balance_rows(port: int) -> set[tuple[Any, ...]]:
    """An instance's balances (BALANCE_ROWS), through its /audit, a page at a time."""
    rows: set[tuple[Any, ...]] = set()
    async with httpx.AsyncClient(timeout=60) as client:
        while True:
            page = f"{BALANCE_ROWS} ORDER BY ALL LIMIT {MAX_ROWS} OFFSET {len(rows)}"
            answer = await client.post(f"http://127.0.0.1:{port}/audit", json={"sql": page},
                                       headers=ADMIN)
            assert answer.status_code == 200, answer.text
            got = answer.json()["rows"]
            rows |= {tuple(row) for row in got}
            if len(got) < MAX_ROWS:
                return rows


async def ends_of(bootstrap: str, topic: str) -> dict[int, int]:
    consumer = make_consumer(bootstrap)
    await consumer.start()
    try:
        ends = await end_offsets(consumer, await partitions_of(consumer, topic))
        return {tp.partition: end for tp, end in ends.items()}
    finally:
        await consumer.stop()


async def first_bulk_batch_stored(port: int, topic: str, timeout: float = 90) -> bool:
    """Until the instance has stored a bulk batch (tally_events_in counts it) or is done
    restoring; whether it was still restoring then (else the pause comes too late for
    the case, and the test says so)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(httpx.TransportError):  # not listening yet
            counted = await events_in(port, topic)
            state = await readyz(port)  # after: restoring still, with that batch stored
            if state.get("partitions") and (counted > 0 or not state["restoring"]):
                return bool(state["restoring"]) and counted > 0
        await asyncio.sleep(0.01)
    raise AssertionError("the instance stored no bulk batch")

