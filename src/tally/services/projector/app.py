"""The projector: usage.events (and usage.dlq) -> DuckDB -> budget.balances.

Its instances share the partitions through a consumer group (ownership.py); each resumes
every partition it owns from the offset stored in its DuckDB file with the results it
produced (nothing is committed to Kafka), so a crash at any point neither loses nor
double-counts an event. After each commit it publishes the absolute balance of every user
the batch changed; republishing after a crash is harmless.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import InconsistentGroupProtocolError

from tally.access import Access
from tally.cli import command_main
from tally.config.loader import LiveConfig, load_config
from tally.config.models import Config
from tally.core.usage import UserUsage, to_balance
from tally.instances import heartbeat, instance_id
from tally.kafka import (
    Record,
    batches,
    ensure_topics,
    make_consumer,
    make_producer,
    next_offsets,
    partitions_of,
)
from tally.ops import Metrics, Readiness, ops_routes, watch
from tally.service import Part, bind, error_text, http_part, run_parts, run_service, started
from tally.services.projector import store
from tally.services.projector.assignor import offered, refused, warm_assignor
from tally.services.projector.audit import audit_app, instances_asker
from tally.services.projector.decode import RECORD_FAULTS, Decoded, Decoder, Skipped
from tally.services.projector.history import history_routes
from tally.services.projector.ownership import Ownership, PartitionBook, Stamped, group_id
from tally.services.projector.partitioncount import check_partition_count, keep_partition_count
from tally.services.projector.recent import RecentIds, WindowMissed
from tally.services.projector.restore import BULK_FROM
from tally.services.projector.sandbox import AuditLimits, Auditor, lock_down
from tally.settings import Settings
from tally.topics import Topics
from tally.wire import rejection

__all__ = ["BATCH_SIZE", "Decoded", "assign_from", "main", "run", "run_projector"]

log = logging.getLogger(__name__)

BATCH_SIZE = 10_000
READ_AHEAD = 8  # fetched batches held while one is handled
# Up to this many records a batch is decoded in the event loop: a thread's hop costs more
# than a live batch's decode (~30-80 records at 1,000 events/s); a catch-up batch, in a thread.
DECODED_INLINE = 1_000
# Batches judged from memory are written together, at most this often: each DuckDB
# transaction costs about the same CPU whether it holds 20 events or 500, and the
# balances went out before it anyway. One write per live batch (~30/s at 1,000 events/s)
# was most of the projector's CPU an event.
WRITE_EVERY_S = 0.25
# Records judged but not yet stored, past which a batch waits for the write under way.
UNWRITTEN_MAX = BATCH_SIZE


async def assign_from(consumer: AIOKafkaConsumer, names: Iterable[str],
                      offsets: dict[tuple[str, int], int]) -> list[TopicPartition]:
    """Assign every partition of the topics; seek to the stored offsets, else the start."""
    parts = [tp for name in names for tp in await partitions_of(consumer, name)]
    consumer.assign(parts)
    for tp in parts:
        stored = offsets.get((tp.topic, tp.partition))
        if stored is None:
            await consumer.seek_to_beginning(tp)
        else:
            consumer.seek(tp, stored)
    return parts


class Projector:
    """The live fold, with the in-memory mirror of every user's usage.

    By default a batch's balances are sent before its transaction, from the mirror: a
    DuckDB statement takes milliseconds (and a checkpoint hundreds), the send one. Which
    events are new is judged from memory (`RecentIds`: the ids of the last minutes) when
    the batch's events are all that recent, else by DuckDB's dedupe first, as
    `publish_before_commit=False` always does (which also waits for the commit). The
    transaction (ledger, balances, offsets) then runs in a thread while the next batches
    are read, judged and sent: one write at a time, in order, each taking every batch
    judged since the last (at most every WRITE_EVERY_S). That is safe because a balance
    is an absolute snapshot: if the commit never happens, a restart re-reads the same
    events from the stored offsets and sends the same values again (see hold_until).
    A write that fails, or that DuckDB judges otherwise than memory did (`WindowMissed`),
    has every batch not yet stored refolded from the store (`_recover`).
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, config: Config, topics: Topics,
                 producer: AIOKafkaProducer, publish_before_commit: bool = True) -> None:
        # A cursor of its own: the audit endpoint makes its cursors from `con` meanwhile.
        self.writer = con.cursor()
        store.index_event_ids(self.writer)  # small live batches: dedupe by index lookups
        self.store = store.DuckDBStore(self.writer)
        self.decoder = Decoder.of(config.budgets.per_user_budgets)
        self.topics = topics
        self.producer = producer
        self.mirror: dict[str, UserUsage] = self.store.load_usages()
        self.recent = RecentIds.load(self.writer, datetime.now(UTC))
        self.publish_before_commit = publish_before_commit
        # The write under way (its result: how many records it stored), and the batches
        # judged from memory waiting for the next one, with what memory found new in each.
        self._write: asyncio.Future[int] | None = None
        self._pending: list[tuple[Decoded, pa.Table, int]] = []
        self._last_write = 0.0  # when the last write began (the event loop's clock)
        self._unwritten: list[Record] = []  # records taken whose write has not succeeded
        self._work: asyncio.Future[None] | None = None
        self._acks: asyncio.Future[list[object]] | None = None
        self.metrics = Metrics()
        # The partitions this instance owns, where it stands in each, and those held back
        # (see ownership.py): balances go out only for users of owned partitions.
        self.book = PartitionBook(topics.usage_events)
        self._writing = asyncio.Lock()  # a batch, or a recut of the periods: one at a time

    def writing(self) -> asyncio.Lock:
        """Held while a batch is written (or the periods recut), and while a rebalance
        changes what the instance owns."""
        return self._writing

    async def release(self, records: list[Record]) -> None:
        """After a batch: each restoring partition it brings to the end offset seen at its
        assignment sends every balance of its users, once. Held back until then because
        balances go out before their commit: a killed run may have sent more than it
        stored, and the stored (older) figures would make decisions go back."""
        if self.book.held and (done := self.book.reached(next_offsets(records))):
            await self.publish(self.book.users_in(done))

    def begin(self, decoded: Decoded) -> store.Applied:
        """Open a decoded batch's transaction to find its new events, and fold them into
        the mirror: all a publish needs. `complete` writes the rest and commits."""
        applied = self.store.begin(decoded.events)
        try:
            self.mirror.update(store.with_rows(self.mirror, applied.new))
        except BaseException:
            self.writer.execute("ROLLBACK")
            raise
        return applied

    def complete(self, decoded: Decoded, applied: store.Applied) -> None:
        self.store.finish(applied, decoded.offsets, decoded.rejected)

    async def handle(self, records: list[Record],
                     current: Callable[[], bool] = lambda: True) -> None:
        """Fold a batch; if it fails on what it holds, find the record at fault by halves
        (the rest is counted exactly once) and dead-letter it: no record stops counting.
        Not if it is no longer `current` once its turn comes (a rebalance came between:
        the partitions were sought back to their stored offsets, so folding it now would
        store older offsets than the file holds)."""
        async with self._writing:
            if not records:  # woken by a write that ended (see consume): a failed one is
                await self.advance()  # refolded
            elif current():
                await self._handle(records)
                # Here, not once handled: a rebalance may come between, after it is folded.
                self.metrics.count_in(records)

    async def follow(self, config: Config) -> None:
        """A reloaded budgets.yaml: its reset schedule and counted tokens apply to the events
        to come, and if either changed, every stored event is cut or counted anew and every
        balance sent, so the balances follow the config the enforcer decides by (and equal
        what `tally replay` of the same events under it gives)."""
        budgets = config.budgets.per_user_budgets
        async with self._writing:
            await self.drain()
            await self.acked()
            recut = await asyncio.to_thread(store.follow_schedule, self.writer,
                                            budgets.reset_schedule)
            recounted = await asyncio.to_thread(store.follow_counting, self.writer,
                                                budgets.counted_tokens)
            if recut or recounted:
                # A new decoder only then: a bulk restore under way stops at one (its
                # batches decoded under the old, restore.py) and the live fold restores
                # the rest, ~40 times as slowly; a changed limit or users.yaml decodes as
                # before.
                self.decoder = Decoder.of(budgets)
                self.mirror = await asyncio.to_thread(self.store.load_usages)
                await self.publish(self.mirror)
                log.info("the %s changed: every stored event %s, %d balances sent",
                         "reset schedule" if recut else "counted tokens",
                         "cut anew" if recut else "counted anew", len(self.mirror))

    async def _handle(self, records: list[Record]) -> None:
        self._unwritten.extend(records)
        try:
            await self.fold(records, self.publish_before_commit)
        except (*RECORD_FAULTS, WindowMissed) as error:
            log.error("a batch failed (%s): refolding the %d records not stored yet, looking "
                      "for any record at fault", error_text(error), len(self._unwritten))
            await self._recover()

    async def _recover(self) -> None:
        """The write under way ends (a failed one rolled back); the mirror and the recent
        ids are read from the store, and every record not stored is folded again by
        halves, DuckDB first; then every balance is sent (what was sent is redone)."""
        with contextlib.suppress(*RECORD_FAULTS, WindowMissed):
            await self._written()
        records, self._unwritten, self._pending = self._unwritten, [], []
        await asyncio.to_thread(self.restore)
        await self.split(records)
        await self.publish(self.mirror)

    async def drain(self) -> None:
        """Until every batch taken is stored (or, if a write fails, refolded)."""
        try:
            await self._written()
            if self._pending:
                self._start_write(wait=False)
                await self._written()
        except (*RECORD_FAULTS, WindowMissed) as error:
            log.error("a batch's write failed (%s): refolding", error_text(error))
            await self._recover()

    async def advance(self) -> None:
        """A write ended: take its outcome (a failed one is refolded), and start the next
        if batches wait for it."""
        try:
            await self._written()
            self._start_write()
        except (*RECORD_FAULTS, WindowMissed) as error:
            log.error("a batch's write failed (%s): refolding", error_text(error))
            await self._recover()

    async def _written(self) -> None:
        """Until the write under way is committed; its error, if it failed."""
        if self._write is not None:
            write, self._write = self._write, None
            del self._unwritten[:await write]

    def _start_write(self, wait: bool = True) -> None:
        """The pending batches' write, if none is under way: in a thread, after waiting
        (`wait`) until WRITE_EVERY_S since the last one began; it takes every batch
        pending by then."""
        if self._write is not None or not self._pending:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_write + WRITE_EVERY_S - loop.time()) if wait else 0.0
        self._write = asyncio.ensure_future(self._write_pending(delay))

    async def _write_pending(self, delay: float) -> int:
        if delay:
            await asyncio.sleep(delay)
        self._last_write = asyncio.get_running_loop().time()
        batches, self._pending = self._pending, []
        decoded = Decoded.joined([b for b, _, _ in batches])
        new = pa.concat_tables([n for _, n, _ in batches])
        await asyncio.to_thread(self.store_checked, decoded, new)
        return sum(count for _, _, count in batches)

    async def fold(self, records: list[Record], publish_first: bool) -> None:
        if len(records) <= DECODED_INLINE:
            decoded = Decoded.of(self.decoder, self.topics, records)
        else:  # in a thread, the audit endpoint and fetches go on (pyarrow frees the GIL)
            decoded = await asyncio.to_thread(Decoded.of, self.decoder, self.topics, records)
        new = (self.recent.new_of(store.first_of_each(decoded.events), datetime.now(UTC))
               if publish_first else None)
        if new is None:
            sent = await self._fold_by_store(decoded, publish_first)
        else:
            sent = await self._fold_from_memory(decoded, new, len(records))
        # The acks are awaited while the next batch is read, before its balances are sent.
        await self.acked()
        self._acks = asyncio.gather(*sent)

    async def _fold_from_memory(self, decoded: Decoded, new: pa.Table,
                                count: int) -> list[asyncio.Future[object]]:
        """Balances first, from memory; then the batch waits for the next write (one for
        every batch taken meanwhile, at most every WRITE_EVERY_S; DuckDB releases the GIL:
        the next batches are handled meanwhile)."""
        self.mirror.update(store.with_rows(self.mirror, new))
        self.book.note(new, decoded.offsets)  # the position its balances carry
        await self.dead_letter(decoded.skipped)
        sent = await self.send(store.Applied(new).users)
        self._pending.append((decoded, new, count))
        if len(self._unwritten) >= UNWRITTEN_MAX:  # DuckDB is behind: wait for it
            await self._written()
        if self._write is not None and self._write.done():
            await self._written()
        self._start_write()
        return sent

    async def _fold_by_store(self, decoded: Decoded,
                             publish_first: bool) -> list[asyncio.Future[object]]:
        """DuckDB says which events are new (the batch holds one older than the recent ids
        or the balances wait for the commit): once every batch before it is stored."""
        await self.drain()
        applied = await asyncio.to_thread(self.begin, decoded)
        self.book.note(applied.new, decoded.offsets)
        await self.dead_letter(decoded.skipped)
        if publish_first:
            sent = await self.send(applied.users)
            await asyncio.to_thread(self.complete, decoded, applied)
        else:
            await asyncio.to_thread(self.complete, decoded, applied)
            sent = await self.send(applied.users)
        self.recent.remember(applied.new, datetime.now(UTC))
        self._unwritten.clear()
        return sent

    def store_checked(self, decoded: Decoded, new: pa.Table) -> None:
        """The batch's transaction with DuckDB's own dedupe, the authority: what it finds
        new is stored; WindowMissed if that is not `new`, what memory said."""
        applied = self.store.begin(decoded.events)
        self.complete(decoded, applied)
        found, said = (sorted(table.column("event_id").to_pylist())
                       for table in (applied.new, new))
        if found != said:
            raise WindowMissed(f"DuckDB found {len(found)} new events where the recent ids "
                               f"said {len(said)}")

    def restore(self) -> None:
        """After a failed batch (rolled back): the mirror and the recent ids as stored,
        without its part."""
        self.mirror = self.store.load_usages()
        self.forget_recent()

    def forget_recent(self) -> None:
        """The recent ids as the ledger holds them (after a rollback, or partitions
        dropped from the file)."""
        self.recent = RecentIds.load(self.writer, datetime.now(UTC))

    async def split(self, records: list[Record]) -> None:
        """Fold each half on its own (balances sent after each commit), halving again
        whichever fails, down to the one record that cannot be folded."""
        if len(records) == 1:
            await self.give_up_on(records[0])
            return
        middle = len(records) // 2
        for piece in (records[:middle], records[middle:]):
            try:
                await self.fold(piece, publish_first=False)
            except RECORD_FAULTS:
                await asyncio.to_thread(self.restore)
                await self.split(piece)

    async def give_up_on(self, record: Record) -> None:
        """Dead-letter a record that fails alone, and store the offset past it. First a
        write of the offsets it stands at: if the store itself fails (a full disk), that
        raises, and no record is blamed for it."""
        here = {(record.topic, record.partition): record.offset}
        await asyncio.to_thread(self.store.apply, store.no_events(), here)
        reason = "projector: this record fails the fold even alone"
        log.error("dead-lettering %s: %s", record.source, reason)
        await self.dead_letter([(record, reason)])
        await asyncio.to_thread(self.store.apply, store.no_events(), next_offsets([record]))

    async def dead_letter(self, skipped: Skipped) -> None:
        """usage.events records that cannot be counted go to usage.dlq, acknowledged before
        the batch commits (so none is lost; a copy after a crash is stored once, by source)."""
        # Not a standby's for the partitions it only follows: their owner sends those.
        skipped = [(record, reason) for record, reason in skipped
                   if record.topic != self.topics.usage_events
                   or record.partition in self.book.owned]
        if not skipped:
            return
        now = datetime.now(UTC)
        acks = [await self.producer.send(
                    self.topics.usage_dlq, key=record.source.encode(),
                    value=rejection(record.value, reason, record.source, now)
                    .model_dump_json().encode())
                for record, reason in skipped]
        await asyncio.gather(*acks)

    async def acked(self) -> None:
        """Until the broker has acknowledged every balance sent (a failure raises here)."""
        if self._acks is not None:
            acks, self._acks = self._acks, None
            await acks

    async def send(self, users: Iterable[str]) -> list[asyncio.Future[object]]:
        """Queue each user's absolute balance, with the position it was folded up to; the
        futures settle when the broker acks. Only the users of partitions this instance
        owns and has caught up on (see release and ownership.py)."""
        as_of = datetime.now(UTC)
        return [
            await self.producer.send(self.topics.budget_balances, key=user.encode(),
                                     value=to_balance(self.mirror[user], as_of,
                                                      self.book.source(user))
                                     .model_dump_json().encode())
            for user in self.book.sendable(users)
        ]

    async def publish(self, users: Iterable[str]) -> None:
        await asyncio.gather(*await self.send(users))

    async def consume(self, consumer: AIOKafkaConsumer,
                      generation: Callable[[], int] = lambda: 0,
                      follower: AIOKafkaConsumer | None = None) -> None:
        """Fold what `consumer` (and a standby's `follower`, ownership.py) reads until
        cancelled. `generation` changes at each rebalance (ownership.py): a batch read
        before one is dropped, not folded."""
        # Read ahead while a batch is handled: aiokafka sends the next fetch only once the
        # records it holds are taken, so a reader that waited for each batch's commit left
        # new events at the broker for up to two batch times (~65 ms at 1,000 events/s).
        ahead: asyncio.Queue[Stamped] = asyncio.Queue(maxsize=READ_AHEAD)
        readers = [_read_ahead(c, ahead, generation)
                   for c in (consumer, follower) if c is not None]
        reader = asyncio.ensure_future(asyncio.gather(*readers))
        reader.add_done_callback(_retrieved)  # a gather cancelled at the stop: not an error
        try:
            while True:
                # Empty when a write ended first (a failed one is refolded at once, not
                # when the next batch comes), or when all was read before a rebalance.
                read_in, records = await _take(ahead, reader, generation, self._write)
                # Shielded: a stop lets the batch under way commit and publish (see finish).
                self._work = asyncio.ensure_future(self.handle(
                    records, _still(read_in, generation)))
                await asyncio.shield(self._work)
                if read_in == generation():  # else dropped, or the holds were set anew
                    await self.release(records)
        finally:
            reader.cancel()  # what it read and nobody took is read again after a restart
            if self._write is not None:  # its thread ends before the store can be closed
                await asyncio.wait([self._write])

    async def finish(self) -> None:
        if self._work is not None:
            await self._work
        async with self._writing:
            await self.drain()
        await self.acked()


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _still(read_in: int, generation: Callable[[], int]) -> Callable[[], bool]:
    """Whether no rebalance has come since a batch was read."""
    return lambda: generation() == read_in


async def _read_ahead(consumer: AIOKafkaConsumer, ahead: asyncio.Queue[Stamped],
                      generation: Callable[[], int]) -> None:
    async for records in batches(consumer, max_records=BATCH_SIZE):
        await ahead.put((generation(), records))  # stamped when read, not when queued


async def _take(ahead: asyncio.Queue[Stamped], reader: asyncio.Future[Any],
                generation: Callable[[], int],
                write: asyncio.Future[Any] | None = None) -> Stamped:
    """Everything read ahead (up to about BATCH_SIZE) in the current generation, once
    there is something (empty if all of it was read before a rebalance); nothing if the
    `write` under way ends first."""
    if ahead.empty():
        getting: asyncio.Future[Any] = asyncio.ensure_future(ahead.get())
        waiting: set[asyncio.Future[Any]] = {getting, reader, *([write] if write else [])}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not getting.done():
            getting.cancel()  # a batch put meanwhile stays in the queue
            if write is not None and write.done() and not reader.done():
                return generation(), []
            reader.result()  # the reader's error, if it failed
            raise RuntimeError("the projector's reader stopped")
        first: Stamped = getting.result()
    else:
        first = ahead.get_nowait()
    now = generation()
    records = first[1] if first[0] == now else []
    while not ahead.empty() and len(records) < BATCH_SIZE:
        read_in, more = ahead.get_nowait()
        if read_in == now:
            records = records + more
    return now, records


async def run_projector(config: Config, bootstrap: str, topics: Topics, db_path: Path,
                        stop: asyncio.Event, port: int | None = None,
                        partitions: int = 3, publish_before_commit: bool = True,
                        host: str = "127.0.0.1", audit_limits: AuditLimits | None = None,
                        config_dir: Path | None = None,
                        session_timeout_ms: int = 10_000, standby: bool = False,
                        bulk_from: int = BULK_FROM) -> None:
    """Run until `stop` is set, as one instance of the group sharing usage.events and
    usage.dlq (ownership.py; `session_timeout_ms`: how long a silent instance keeps its
    partitions; `standby`: keep every partition warm, see Ownership; `bulk_from`: how far
    behind a gained partition is restored in bulk, restore.py). With a port,
    serve POST /audit (sandboxed within `audit_limits`, for admins as `config`'s auth
    says; `config_dir` resolves its key file), GET /history, /metrics, /healthz and
    /readyz (ready once caught up with its partitions) on host:port."""
    await ensure_topics(bootstrap, topics, partitions)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        budgets = config.budgets.per_user_budgets
        con = stack.enter_context(store.connect(db_path, schedule=budgets.reset_schedule,
                                                counted=budgets.counted_tokens))
        # The partitions are placed by what each instance's file holds (assignor.py).
        assignors = offered(warm_assignor(topics, lambda: ownership.claim()), standby)
        consumer = await stack.enter_async_context(started(make_consumer(
            bootstrap, group_id=group_id(topics), session_timeout_ms=session_timeout_ms,
            assignors=assignors)))
        follower = (await stack.enter_async_context(started(make_consumer(bootstrap)))
                    if standby else None)
        # Refused if usage.events has other partitions than the file was written under
        # (partitioncount.py); a rebalance that shows another count stops it too.
        count = keep_partition_count(con, topics.usage_events, len(await partitions_of(
            consumer, topics.usage_events)), db_path)
        producer = await stack.enter_async_context(started(make_producer(bootstrap)))
        projector = Projector(con, config, topics, producer, publish_before_commit)
        # The partitions come from the group (ownership.py); the first assignment seeks
        # to the stored offsets and sends the balances of the partitions caught up.
        ownership = Ownership(projector, consumer, topics, follower=follower,
                              check_count=lambda found: check_partition_count(
                                  topics.usage_events, count, found, db_path),
                              bootstrap=bootstrap, bulk_from=bulk_from)
        consumer.subscribe([topics.usage_events, topics.usage_dlq], listener=ownership)
        readiness = Readiness(ownership.describe)
        services = [Part("projector-fold",
                         lambda: _fold_until_stopped(projector, consumer, ownership, follower)),
                    Part("projector-ownership", ownership.broken),
                    # A standby is ready once it follows every partition it does not own
                    # (or, owning them all, once caught up on them: Ownership.readers).
                    Part("projector-watch", lambda: watch(ownership.readers,
                                                          projector.metrics, readiness)),
                    Part("projector-report", lambda: ownership.keep_reporting(
                        projector.metrics)),
                    Part("projector-heartbeat", lambda: heartbeat(
                        producer, topics, instance_id("projector", port), "projector",
                        f"http://{host}:{port}" if port else None, ownership.describe))]
        # A changed budgets.yaml recuts or recounts; a changed users.yaml (a revoked key, a
        # new admin) applies to the audit and history at once.
        live = LiveConfig(config, config_dir)
        services.append(Part("projector-config", lambda: live.follow(projector.follow)))
        if port is not None:
            limits = audit_limits or AuditLimits()
            lock_down(con, limits)
            auditor = Auditor(con, limits)
            access = Access.following(live, config_dir)
            routes = [*ops_routes(projector.metrics, readiness),
                      *history_routes(con, config, lambda: datetime.now(UTC), access,
                                     ownership.settled)]
            # Running audits are interrupted first, so the server stops promptly.
            # An instance asked for its share gets its own query time and a margin.
            fan_out = instances_asker(bootstrap, topics, limits.timeout_seconds + 5)
            services.append(http_part("projector-http",
                                      audit_app(auditor, access, routes, fan_out,
                                                lambda: sorted(projector.book.held),
                                                ownership.settled),
                                      bind(host, port), before_stop=auditor.stop))
        log.info("projector: %d users, reading %s", len(projector.mirror), topics.usage_events)
        await run_parts(stop, services)


async def _fold_until_stopped(projector: Projector, consumer: AIOKafkaConsumer,
                              ownership: Ownership,
                              follower: AIOKafkaConsumer | None = None) -> None:
    """Consume until cancelled; then the batch under way commits and its balances are
    acknowledged before the projector stops (exactly-once rests on its stored offsets)."""
    try:
        await projector.consume(consumer, lambda: ownership.generation, follower)
    except asyncio.CancelledError:
        await ownership.stop_restoring()
        await ownership.stop_dropping()
        await projector.finish()
        raise
    except InconsistentGroupProtocolError as error:  # the group's members offer other assignors
        raise refused(group_id(ownership.topics), ownership.standby) from error


# the command -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`tally projector` (options: tally.cli)."""
    settings = Settings.from_env()
    config = load_config(args.config)
    topics = Topics(args.namespace, settings.replication_factor)
    return run_service("tally projector", lambda stop: run_projector(
        config, settings.bootstrap_servers, topics, args.db, stop, port=args.port or None,
        partitions=settings.partitions, publish_before_commit=not args.publish_after_commit,
        host=args.host, audit_limits=AuditLimits.of(args), config_dir=args.config,
        session_timeout_ms=int(args.session_timeout * 1000), standby=args.standby,
        bulk_from=args.bulk_from))


main = command_main("projector")
