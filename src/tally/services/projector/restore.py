"""The restore of a gained usage.events partition in bulk: `tally replay`'s path, for the
partitions an instance gains far behind (its file lacks them, or holds them up to some
offset).

The live fold reads a backlog at about 5,000 events/s on a busy machine (aiokafka parses
each record in Python, and a live batch is 10,000 records); replay's pipeline reads with
librdkafka, decodes column-wise and writes batches of one DuckDB row group, about 40 times
as fast (bench/RESULTS.md). So a partition gained more than BULK_FROM records behind is
paused in the group's consumer and folded by `fold_in_bulk` (replay.py) from the offset
the assignment sought it to up to the end offset seen at the assignment (the end its
balances are held back until, ownership.py); then its users' usage is loaded from the file
into the mirror, the consumer is sought to that end and resumed, and the balances go out
once (PartitionBook.reached), as after a live restore. One fold rule: each batch goes
through `apply_or_split`, the store's transaction (ledger-wide dedupe by event_id, the
balances, the offsets) that replay and the live projector use.

Each bulk batch is one transaction with its offsets, written under the projector's
writing lock after the live batches judged before it are stored: the live fold of the
other partitions goes on between bulk batches (a bulk write holds it up for the write of
one batch, up to about a second). A rebalance stops the restore (`stop`, from the
revocation, before anything moves): the batch being written commits, the rest is not
written, and the file holds the partition consistently up to its stored offset (its users
read back into the mirror: the live fold may go on from there); the next assignment drops
it (lost) or restores it again from there (kept). The work runs in
threads (librdkafka, Arrow and DuckDB release the GIL): the event loop keeps answering
the group's heartbeats. A restore that fails (the bulk reader cannot reach the broker,
say) hands its partitions back to the live fold from their stored offsets.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, TopicPartition

from tally.core.usage import Offsets
from tally.kafka_bulk import Columns, TopicReader
from tally.service import error_text
from tally.services.projector import store
from tally.services.projector.decode import Decoded
from tally.services.projector.replay import REPLAY_BATCH, apply_or_split, fold_in_bulk
from tally.settings import KafkaSecurity

if TYPE_CHECKING:
    from tally.services.projector.app import Projector

__all__ = ["BULK_FROM", "BulkRestore", "far_behind"]

log = logging.getLogger(__name__)

# Records behind, from which a gained partition is restored in bulk: below, the live fold
# reads the gap within about a second (~5,000 events/s on a busy machine), about what the
# bulk reader's start costs (a librdkafka consumer and its metadata).
BULK_FROM = 5_000


def far_behind(topic: str, partitions: set[int], at: Mapping[int, int],
               ends: Offsets, bulk_from: int = BULK_FROM) -> set[int]:
    """Of `partitions` (sought to `at`), those `bulk_from` records or more behind their end."""
    return {p for p in partitions if ends.get((topic, p), 0) - at.get(p, 0) >= bulk_from}


class BulkRestore:
    """Restores in bulk the partitions `start` is given far behind; `stop` ends it.
    `loaded(partitions)` reads their users into the projector's mirror and book, from the
    file (Ownership._load)."""

    def __init__(self, projector: Projector, consumer: AIOKafkaConsumer, bootstrap: str,
                 loaded: Callable[[set[int]], Awaitable[None]],
                 failed: Callable[[BaseException], None],
                 security: KafkaSecurity | None = None, bulk_from: int = BULK_FROM) -> None:
        """`failed` is told of an error the restore could not hand back (it stops the
        service: a partition left paused would never be folded). `bulk_from`: how far
        behind a partition is restored in bulk (`tally projector --bulk-from`)."""
        self.bulk_from = bulk_from
        self.projector = projector
        self.failed = failed
        self.consumer = consumer
        self.bootstrap = bootstrap
        self.security = security
        self.loaded = loaded
        self.topic = projector.topics.usage_events
        self._task: asyncio.Future[None] | None = None
        self._stopping = False
        self._decoder = projector.decoder  # the one the restore under way decodes with
        self._stale = False  # budgets.yaml changed since: the live fold takes over

    def pause(self, partitions: set[int]) -> None:
        """Hold the group's consumer off these partitions (just sought: nothing read from
        them yet) until `start` says which it restores in bulk; the others it resumes."""
        if partitions:
            self.consumer.pause(*self._tps(partitions))

    def start(self, partitions: set[int], at: Mapping[int, int], ends: Offsets) -> None:
        """Of the `partitions` paused (at `at`, their offsets sought), restore those
        `bulk_from` or more behind their `ends` in bulk; resume the rest in the live fold."""
        far = far_behind(self.topic, partitions, at, ends, self.bulk_from)
        if partitions - far:
            self.consumer.resume(*self._tps(partitions - far))
        if not far:
            return
        self._stopping = False
        bounds = ({(self.topic, p): at.get(p, 0) for p in far},
                  {(self.topic, p): ends[(self.topic, p)] for p in far})
        self._task = asyncio.ensure_future(self._restore(far, *bounds))
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Future[None]) -> None:
        if not task.cancelled() and (error := task.exception()) is not None:
            self.failed(error)

    async def stop(self) -> None:
        """Until the restore under way has stopped: its batch being written commits, the
        rest is not written (a rebalance, or the service stopping)."""
        self._stopping = True
        if self._task is not None:
            await asyncio.wait([self._task])
            self._task = None

    async def _restore(self, partitions: set[int], starts: Offsets, ends: Offsets) -> None:
        began = time.monotonic()
        self._decoder, self._stale = self.projector.decoder, False
        try:
            records = await self._fold(starts, ends)
        except Exception as error:
            log.error("projector: the bulk restore of partitions %s of %s failed (%s): the "
                      "live fold restores them", sorted(partitions), self.topic,
                      error_text(error))
            await self._hand_back(partitions, starts)
            return
        if self._stale:
            log.info("projector: the reset schedule or the counted tokens (budgets.yaml) "
                     "changed during the bulk restore of partitions %s of %s: the live fold "
                     "restores the rest", sorted(partitions), self.topic)
            await self._hand_back(partitions, starts)
            return
        seconds = time.monotonic() - began
        if await self._caught_up(partitions, ends):
            log.info("projector: restored partitions %s of %s in bulk: %d records in %.1f s "
                     "(%.0f records/s), their users loaded and balances sent %.1f s later",
                     sorted(partitions), self.topic, records, seconds,
                     records / max(seconds, 1e-9), time.monotonic() - began - seconds)
        else:
            log.info("projector: the bulk restore of partitions %s of %s stopped by a "
                     "rebalance after %.1f s (the file holds them up to their stored offsets)",
                     sorted(partitions), self.topic, seconds)

    async def _fold(self, starts: Offsets, ends: Offsets) -> int:
        """Read from `starts` to `ends` and fold in bulk; the records read."""
        reader = await asyncio.to_thread(TopicReader, self.bootstrap, [self.topic], self.topic,
                                         self.security, (dict(starts), dict(ends)))
        read = 0

        def next_batch() -> Columns | None:
            nonlocal read
            batch = None if self._stopping or self._stale else reader.next_batch(REPLAY_BATCH)
            read += len(batch) if batch is not None else 0
            return batch

        # The reader's own thread: a read still running ends before the reader closes.
        reading = ThreadPoolExecutor(1, thread_name_prefix="restore-read")
        try:
            await fold_in_bulk(next_batch, reading, self._decoder, self._write)
        finally:
            await asyncio.to_thread(functools.partial(reading.shutdown, wait=True,
                                                      cancel_futures=True))
            reader.close()
        return read

    async def _write(self, decoded: Decoded) -> None:
        """One bulk batch, in its own transaction with its offsets, after the live batches
        judged before it are stored; nothing once stopping (a rebalance is under way)."""
        projector = self.projector
        async with projector.writing():
            if self._stopping or self._stale:
                return
            if projector.decoder is not self._decoder:
                # budgets.yaml changed: the store was recut or recounted under the new one
                # (Projector.follow), this batch was decoded under the old one.
                self._stale = True
                return
            await projector.drain()
            await projector.dead_letter(decoded.skipped)  # as the live fold does
            await asyncio.to_thread(apply_or_split, projector.writer, decoded)
            # Counted in as the live fold counts its batches (tally_events_in): a record
            # each row or dead letter (the bulk reader reads usage.events alone).
            projector.metrics.events_in.labels(self.topic).inc(
                decoded.events.num_rows + len(decoded.skipped))
            projector.book.positions.update(
                {p: at for (t, p), at in decoded.offsets.items() if t == self.topic})

    async def _caught_up(self, partitions: set[int], ends: Offsets) -> bool:
        """The partitions folded up to their ends: the ends stored (past any gap the last
        records leave, a transaction marker), their users loaded, the consumer sought to
        the ends and resumed, the balances sent once. False if stopped meanwhile."""
        projector = self.projector
        async with projector.writing():
            if self._stopping:
                await self._learn(partitions)
                return False
            await projector.drain()
            writer = projector.writer
            await asyncio.to_thread(store.apply_batch, writer, store.no_events(), dict(ends))
            await self._learn(partitions)
            self._resume_at({p: ends[(self.topic, p)] for p in partitions})
            done = projector.book.reached(dict(ends))
            await projector.publish(projector.book.users_in(done))
        return True

    async def _hand_back(self, partitions: set[int], starts: Offsets) -> None:
        """A failed restore's partitions to the live fold, from their stored offsets."""
        async with self.projector.writing():
            await self._learn(partitions)
            if self._stopping:
                return
            stored = await asyncio.to_thread(self.projector.store.load_offsets)
            self._resume_at({p: stored.get((self.topic, p), starts[(self.topic, p)])
                             for p in partitions})

    async def _learn(self, partitions: set[int]) -> None:
        """The projector's memory of the partitions as the file holds them, whatever the
        restore stored (its batches go to the file alone): their users' usage and
        partitions (the mirror, the book), and the live dedupe's recent ids (a copy of a
        restored recent event still to come is then known). Also when it stops or fails
        part way: the live fold may go on from the stored offsets (handed back, or kept in
        the next assignment less than bulk_from behind), and would fold onto the usage
        from before the restore, sending balances short of what the file holds."""
        await self.projector.drain()
        await self.loaded(partitions)
        await asyncio.to_thread(self.projector.forget_recent)

    def _resume_at(self, offsets: Mapping[int, int]) -> None:
        for p, at in offsets.items():
            self.consumer.seek(TopicPartition(self.topic, p), at)
            self.projector.book.positions[p] = at
        self.consumer.resume(*self._tps(set(offsets)))

    def _tps(self, partitions: set[int]) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in sorted(partitions)]
