"""`tally replay`: rebuild the projector's DuckDB from offset 0 of usage.events (and usage.dlq).

It reads up to the end offsets taken at start through the same `apply_records` as the live
projector, so the file it builds equals the live one for the same events. It builds into a
temporary file and renames it over the target only when complete: a failed replay leaves
the old file as it was. Stop the projector first; it holds the file open.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import duckdb
import pyarrow as pa

from tally.cli import command_main
from tally.config.loader import load_config
from tally.config.models import Config
from tally.errors import InputError
from tally.kafka import ensure_topics
from tally.kafka_bulk import Columns, TopicReader
from tally.service import error_text
from tally.services.projector import store
from tally.services.projector.decode import RECORD_FAULTS, Decoded, Decoder, Skipped, rejected
from tally.services.projector.partitioncount import keep_partition_count
from tally.settings import Settings
from tally.topics import Topics

__all__ = ["REPLAY_BATCH", "Progress", "apply_or_split", "decode", "fold_in_bulk", "main",
           "replay"]

log = logging.getLogger(__name__)

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
    reader = await asyncio.to_thread(TopicReader, bootstrap,
                                     [topics.usage_events, topics.usage_dlq], topics.usage_events)
    # The reader's own thread: on the way out (an error, Ctrl-C) a read still running is
    # waited for before the consumer closes under it.
    reading = ThreadPoolExecutor(1, thread_name_prefix="replay-read")
    try:
        progress = Progress(reader.total, out)
        schedule = config.budgets.per_user_budgets.reset_schedule
        with store.connect(db_path, schedule=schedule) as con:
            con.execute(f"SET memory_limit = '{REPLAY_DUCKDB_MEMORY}'")
            # The count the file is written under, as the projector records it: a projector
            # started on the file refuses another (partitioncount.py).
            keep_partition_count(con, topics.usage_events,
                                 reader.partition_count(topics.usage_events), db_path)
            await fold_in_bulk(functools.partial(reader.next_batch, REPLAY_BATCH), reading,
                               Decoder.of(config.budgets.per_user_budgets),
                               lambda decoded: asyncio.to_thread(apply_or_split, con, decoded),
                               progress)
        progress.draw(time.monotonic())
        out.write("\n")
        return progress
    finally:
        reading.shutdown(wait=True, cancel_futures=True)
        reader.close()


async def fold_in_bulk(read: Callable[[], Columns | None], reading: ThreadPoolExecutor,
                       decoder: Decoder, write: Callable[[Decoded], Awaitable[object]],
                       progress: Progress | None = None) -> None:
    """A three-stage pipeline, each stage in a thread of its own: batch n+2 is read
    (librdkafka's C, the GIL released while it waits), batch n+1 decoded (mostly in
    Arrow's C++, the GIL released) and batch n written (`write`: `apply_or_split` in a
    thread, DuckDB releasing the GIL). Each stage takes its batches in order, so commits
    stay in offset order. `tally replay` and the restore of a gained partition
    (restore.py) fold through it."""
    loop = asyncio.get_running_loop()
    next_batch = loop.run_in_executor(reading, read)
    decoding: asyncio.Future[Decoded] | None = None
    writing: asyncio.Future[object] | None = None
    while (batch := await next_batch) is not None:
        next_batch = loop.run_in_executor(reading, read)
        if decoding is not None:
            writing = await _write_next(write, await decoding, writing)
        decoding = asyncio.ensure_future(asyncio.to_thread(decode, decoder, batch))
        if progress is not None:
            progress.add(len(batch))
    if decoding is not None:
        writing = await _write_next(write, await decoding, writing)
    if writing is not None:
        await writing


async def _write_next(write: Callable[[Decoded], Awaitable[object]], decoded: Decoded,
                      writing: asyncio.Future[object] | None) -> asyncio.Future[object]:
    if writing is not None:
        await writing
    return asyncio.ensure_future(write(decoded))


def apply_or_split(con: duckdb.DuckDBPyConnection, decoded: Decoded) -> set[str]:
    """The batch in one transaction; if it fails on what it holds, the live projector's
    answer (Projector.split): its events by halves, each piece in a transaction of its own,
    down to each event that fails even alone, which is skipped and logged by topic,
    partition and offset (the live projector dead-letters it; replay writes nothing but its
    file), then the batch's rejected records and offsets. Users of the events written."""
    try:
        return decoded.apply(store.DuckDBStore(con))
    except RECORD_FAULTS as error:
        log.error("a batch of %d events failed (%s): looking for the events at fault",
                  decoded.events.num_rows, error_text(error))
    users = _apply_halves(con, decoded.events)
    store.apply_batch(con, store.no_events(), decoded.offsets, decoded.rejected)
    return users


def _apply_halves(con: duckdb.DuckDBPyConnection, events: pa.Table) -> set[str]:
    if events.num_rows == 1:
        [event] = events.select(["topic_partition", "topic_offset", "event_id"]).to_pylist()
        log.error("skipping usage event at partition %(topic_partition)d offset "
                  "%(topic_offset)d (event_id %(event_id)r): it fails the fold even alone",
                  event)
        return set()
    middle = events.num_rows // 2
    users: set[str] = set()
    for piece in (events.slice(0, middle), events.slice(middle)):
        try:
            users |= store.apply_batch(con, piece, {}).users
        except RECORD_FAULTS:
            users |= _apply_halves(con, piece)
    return users


def decode(decoder: Decoder, batch: Columns) -> Decoded:
    """Decoded.of without a Record per message: the events column-wise straight from the
    reader's columns; usage.dlq's few records one by one."""
    table = decoder.whole(batch.values, batch.partitions, batch.offsets)
    skipped: Skipped = []
    if table is None:  # a record skipped here was dead-lettered by the live projector
        table, skipped = decoder.one_by_one(batch.records())
    return Decoded(table, rejected(batch.others), batch.next_offsets, skipped)


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
