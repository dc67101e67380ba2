"""`tally replay`: rebuild the projector's DuckDB from offset 0 of usage.events (and usage.dlq).

It reads up to the end offsets taken at start through the same `apply_records` as the live
projector, so the file it builds equals the live one for the same events. It builds into a
temporary file and renames it over the target only when complete: a failed replay leaves
the old file as it was. Stop the projector first; it holds the file open.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import duckdb
from aiokafka import AIOKafkaConsumer, TopicPartition

from tally.cli import command_main
from tally.config.loader import load_config
from tally.config.models import Config
from tally.errors import InputError
from tally.kafka import CatchUp, Record, ensure_topics, make_consumer
from tally.services.projector import store
from tally.services.projector.app import Decoded, assign_from
from tally.services.projector.decode import Decoder, Skipped, rejected
from tally.settings import Settings
from tally.topics import Topics

__all__ = ["REPLAY_BATCH", "Progress", "decode", "main", "replay"]

# Records per transaction. Replay reads a backlog, so it takes batches 12x the live ones:
# exactly one DuckDB row group, which DuckDB writes straight to the file instead of
# copying it into the WAL at commit (~1.6 us a row instead of ~2.6 us at 100k rows);
# per-statement costs are amortized and the dedupe scan of event_ids is paid once a batch.
REPLAY_BATCH = 122_880
# DuckDB's buffer pool otherwise grows with the file (up to 80% of RAM): capped, replay's
# memory stays flat (~600-700 MiB with three batches in flight) whatever the topic holds.
REPLAY_DUCKDB_MEMORY = "256MB"


@dataclass
class Progress:
    """A one-line progress bar on a stream, redrawn at most every `every` seconds."""

    total: int
    out: TextIO = sys.stderr
    every: float = 0.2
    done: int = 0
    started: float = field(default_factory=time.monotonic)
    _drawn: float = 0.0

    def add(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if now - self._drawn >= self.every or self.done >= self.total:
            self._drawn = now
            self.draw(now)

    def draw(self, now: float) -> None:
        share = self.done / self.total if self.total else 1.0
        bar = "#" * int(share * 30)
        rate = self.done / max(now - self.started, 1e-9)
        self.out.write(f"\rreplay [{bar:<30}] {self.done:,}/{self.total:,} "
                       f"({share:.0%}) {rate:,.0f} events/s")
        self.out.flush()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


async def replay(config: Config, bootstrap: str, topics: Topics, db_path: Path,
                 out: TextIO = sys.stderr, partitions: int = 3) -> Progress:
    """Fold both topics from their start up to their end at call time into db_path."""
    await ensure_topics(bootstrap, topics, partitions)
    consumer = make_consumer(bootstrap, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        parts = await assign_from(consumer, (topics.usage_events, topics.usage_dlq), {})
        catch_up = await CatchUp.taken(consumer, parts)
        ends = catch_up.ends
        starts = await consumer.beginning_offsets(parts)
        progress = Progress(sum(ends[tp] - starts[tp] for tp in parts), out)
        schedule = config.budgets.per_user_budgets.reset_schedule
        with store.connect(db_path, schedule=schedule) as con:
            con.execute(f"SET memory_limit = '{REPLAY_DUCKDB_MEMORY}'")
            await _fold(consumer, con, Decoder.of(config.budgets.per_user_budgets), topics,
                        catch_up, progress)
        progress.draw(time.monotonic())
        out.write("\n")
        return progress
    finally:
        await consumer.stop()


async def _fold(consumer: AIOKafkaConsumer, con: duckdb.DuckDBPyConnection, decoder: Decoder,
                topics: Topics, catch_up: CatchUp, progress: Progress) -> None:
    """A three-stage pipeline: batch n+2 is fetched (Python, holding the GIL) while batch
    n+1 is decoded (mostly in Arrow's C++, GIL released) and DuckDB writes batch n (GIL
    released); each stage runs in order, so commits stay in offset order."""
    pending = set(await catch_up.behind(consumer))
    decoding: asyncio.Future[Decoded] | None = None
    writing: asyncio.Future[set[str]] | None = None
    async for fetched in _until_ends(consumer, pending, catch_up.ends):
        if decoding is not None:
            writing = await _write_next(con, await decoding, writing)
        decoding = asyncio.ensure_future(asyncio.to_thread(decode, decoder, topics, fetched))
        progress.add(sum(map(len, fetched.values())))
    if decoding is not None:
        writing = await _write_next(con, await decoding, writing)
    if writing is not None:
        await writing


async def _write_next(con: duckdb.DuckDBPyConnection, decoded: Decoded,
                      writing: asyncio.Future[set[str]] | None,
                      ) -> asyncio.Future[set[str]]:
    if writing is not None:
        await writing
    return asyncio.ensure_future(asyncio.to_thread(decoded.apply, store.DuckDBStore(con)))


Fetched = dict[TopicPartition, list[Any]]  # aiokafka ConsumerRecords per partition


def decode(decoder: Decoder, topics: Topics, fetched: Fetched) -> Decoded:
    """Decoded.of without a Record per message: columns straight from aiokafka's records."""
    events = [(tp, ms) for tp, ms in fetched.items() if tp.topic == topics.usage_events]
    values = [m.value for _, ms in events for m in ms]
    table = decoder.whole(values, [tp.partition for tp, ms in events for _ in ms],
                          [m.offset for _, ms in events for m in ms])
    skipped: Skipped = []
    if table is None:  # a record skipped here was dead-lettered by the live projector
        table, skipped = decoder.one_by_one(_records(events))
    dlq = _records([(tp, ms) for tp, ms in fetched.items() if tp.topic == topics.usage_dlq])
    offsets = {(tp.topic, tp.partition): ms[-1].offset + 1 for tp, ms in fetched.items() if ms}
    return Decoded(table, rejected(dlq), offsets, skipped)


def _records(fetched: list[tuple[TopicPartition, list[Any]]]) -> list[Record]:
    return [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
            for _, ms in fetched for m in ms]


async def _until_ends(consumer: AIOKafkaConsumer, pending: set[TopicPartition],
                      ends: dict[TopicPartition, int]) -> AsyncIterator[Fetched]:
    """Batches of REPLAY_BATCH records (the last one smaller) cut at the end offsets;
    stops once every partition has reached its end."""
    batch: Fetched = defaultdict(list)
    while pending:
        fetched = await consumer.getmany(timeout_ms=100, max_records=REPLAY_BATCH)
        for tp, messages in fetched.items():
            batch[tp].extend(m for m in messages if m.offset < ends[tp])
        for tp in list(pending):
            if await consumer.position(tp) >= ends[tp]:
                pending.discard(tp)
                consumer.pause(tp)  # what arrives later is the live projector's business
        while sum(map(len, batch.values())) >= REPLAY_BATCH:
            full, batch = _cut(batch, REPLAY_BATCH)
            yield full
    if batch:
        yield batch


def _cut(batch: Fetched, size: int) -> tuple[Fetched, Fetched]:
    """The first `size` records (a prefix of each partition's) and the rest."""
    head: Fetched = {}
    rest: Fetched = defaultdict(list)
    for tp, messages in batch.items():
        take = min(size, len(messages))
        head[tp], rest[tp] = messages[:take], messages[take:]
        size -= take
    return head, rest


# the command -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`tally replay` (options: tally.cli)."""
    settings = Settings.from_env()
    _check_target(args.db, args.force)
    config = load_config(args.config)
    building = args.db.with_name(args.db.name + ".replay")
    _remove(building)
    topics = Topics(args.namespace, settings.replication_factor)
    progress = asyncio.run(replay(config, settings.bootstrap_servers, topics,
                                  building, partitions=settings.partitions))
    _remove(args.db)  # its write-ahead log must not be replayed onto the new file
    os.replace(building, args.db)
    rate = progress.done / max(progress.seconds, 1e-9)
    print(f"replayed {progress.done:,} events in {progress.seconds:.2f} s "
          f"({rate:,.0f} events/s) into {args.db}")
    return 0


class ReplayRefused(InputError):
    """The target exists without --force, or another process has it open."""


def _check_target(db: Path, force: bool) -> None:
    if not db.exists():
        return
    if not force:
        raise ReplayRefused(f"{db} exists; pass --force to replace it")
    try:
        duckdb.connect(str(db)).close()  # fails while a projector holds the file
    except duckdb.IOException as e:
        if "lock" in str(e).lower():
            raise ReplayRefused(f"{db} is in use (stop the projector first): {e}") from e
        # anything else (not a DuckDB file, say) is what --force is for


def _remove(db: Path) -> None:
    for path in (db, db.with_name(db.name + ".wal")):
        path.unlink(missing_ok=True)


main = command_main("replay")
