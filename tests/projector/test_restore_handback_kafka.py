"""A bulk restore handed back to the live fold part way (restore.py, `_hand_back`), on the
real broker, by what an operator does: change the counted tokens in budgets.yaml while
partitions are restored.

usage.events holds history when a `tally projector` starts on an empty file: it restores
every partition in bulk, in small batches here (cut to HANDBACK_BATCH records: the restore
takes about 65). Paused (SIGSTOP) once its first bulk batch is stored, it has budgets.yaml
count cache reads too, and stays paused past the config watcher's second; resumed, it
recounts what its file holds before its restore's next batches but one or two (both wait
for the projector's writing lock, the watcher first), so the restore, decoding under the
old counting, stops part way and hands its partitions back to the live fold from their
stored offsets. The live fold restores the rest; then more usage comes, with copies of
restored events.

The bulk batches go to the file alone: handed back, the instance must read their users
back from the file, or it never sends the balance of a user whose events the restore
stored all of (each partition begins with events of users seen there only). The balances
readers keep equal the file's, which equal the recount; each event is in the ledger once."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tally.kafka import ensure_topics
from tally.topics import Topics
from tests.projector.history import event_ids, history, produce_fast
from tests.projector.test_instances_kafka import (
    PARTITIONS,
    balances_on_topic,
    instance,
    latest_by_position,
    never_goes_back,
    settled,
)
from tests.projector.test_projector_kafka import BALANCES, BUDGETS, RECOUNT, db_rows, free_port
from tests.projector.test_restore_zombie_kafka import (
    BALANCE_ROWS,
    as_rows,
    cut_bulk_batches,
    first_bulk_batch_stored,
)

pytestmark = pytest.mark.kafka

HISTORY = 12_000
USERS = 300  # every partition holds about 2,000 records: all of them restored in bulk
# Before the history: events of users seen there only (user_0300 to user_0599, about one
# event each), at the start of each partition: the first bulk batches store all of some.
EARLY, EARLY_USERS = 600, 600
HANDBACK_BATCH = 200
BULK_FROM = 1_000
# Longer than LiveConfig.follow's poll (a second): once resumed, the instance looks at its
# config files before anything else it would do (the poll is overdue).
WATCHER_S = 1.5
# A change an operator makes that stops a bulk restore: the tokens counted (every stored
# event counted anew, the restore's batches were decoded under the old counting).
CHANGED = BUDGETS.replace("cache_write_tokens]", "cache_write_tokens, cache_read_tokens]")


async def test_a_bulk_restore_handed_back_part_way_sends_the_balances_the_file_holds(
    kafka_bootstrap: str, unique_name: str, config_dir: Path, tmp_path: Path
) -> None:
    assert CHANGED != BUDGETS
    topics = Topics(f"hback-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    past = (history(EARLY, users=EARLY_USERS, seed=40)
            + history(HISTORY, users=USERS, seed=41, copies_every=50))
    await produce_fast(kafka_bootstrap, topics.usage_events, past)
    # After the hand-back: new events, and copies of the earliest (restored in bulk) ones.
    later = history(1_000, users=USERS, seed=42) + past[:300]
    db, port, log = tmp_path / "a.duckdb", free_port(), tmp_path / "a.log"
    async with instance(kafka_bootstrap, topics, db, config_dir, port,
                        "--bulk-from", str(BULK_FROM), log=log,
                        program=cut_bulk_batches(HANDBACK_BATCH)) as projector:
        caught = await first_bulk_batch_stored(port, topics.usage_events)
        projector.send_signal(signal.SIGSTOP)
        assert caught, "the restore ended before the pause: no hand-back to test"
        (config_dir / "budgets.yaml").write_text(CHANGED)
        await asyncio.sleep(WATCHER_S)
        projector.send_signal(signal.SIGCONT)
        await settled([port], topics.usage_events, len(past))
        await produce_fast(kafka_bootstrap, topics.usage_events, later)
        await settled([port], topics.usage_events, len(past) + len(later))
        projector.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(projector.wait(), 30) == 0
    said = log.read_text()
    assert "(budgets.yaml) changed during the bulk restore" in said, said
    assert db_rows(db, "SELECT count(*) FROM ledger") == {(len(event_ids(past + later)),)}
    assert db_rows(db, "SELECT event_id FROM ledger") == {
        (i,) for i in event_ids(past + later)}
    assert db_rows(db, BALANCES) == db_rows(db, RECOUNT)
    published = await balances_on_topic(kafka_bootstrap, topics.budget_balances)
    assert never_goes_back(published) == []
    assert as_rows(latest_by_position(published)) == db_rows(db, BALANCE_ROWS)
