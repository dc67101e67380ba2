"""The projector: usage.events (and usage.dlq) -> DuckDB -> budget.balances.

It assigns every partition itself (no consumer group) and resumes from the offsets stored
in DuckDB with the results they produced, so a crash at any point neither loses nor
double-counts an event. After each commit it publishes the absolute balance of every user
the batch changed; republishing after a crash is harmless.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from services.projector import store
from services.projector.audit import audit_app
from services.projector.decode import Decoder, rejected
from services.projector.sandbox import AuditLimits, Auditor, add_limit_options, lock_down
from tally.access import Access
from tally.config.errors import ConfigError
from tally.config.loader import load_config
from tally.config.models import Config
from tally.core.usage import UserUsage, to_balance
from tally.kafka import (
    Record,
    batches,
    end_offsets,
    ensure_topics,
    make_consumer,
    make_producer,
    partitions_of,
)
from tally.ops import Metrics, Readiness, ops_routes, watching
from tally.service import serving
from tally.settings import Settings
from tally.topics import Topics

__all__ = ["BATCH_SIZE", "Decoded", "assign_from", "base_parser", "main", "run_projector"]

log = logging.getLogger(__name__)

BATCH_SIZE = 10_000
READ_AHEAD = 8  # fetched batches held while one is handled
K = TypeVar("K", AIOKafkaConsumer, AIOKafkaProducer)


@dataclass(frozen=True)
class Decoded:
    """A batch of both topics, decoded, with the offsets to store along with it."""

    events: pa.Table
    rejected: pa.Table
    offsets: dict[tuple[str, int], int]

    @classmethod
    def of(cls, decoder: Decoder, topics: Topics, records: list[Record]) -> Decoded:
        events, dlq = topics.usage_events, topics.usage_dlq
        return cls(decoder.events(r for r in records if r.topic == events),
                   rejected(r for r in records if r.topic == dlq),
                   next_offsets(records))

    def apply(self, con: duckdb.DuckDBPyConnection) -> store.Applied:
        """One transaction: the same write path for the live projector and replay."""
        return store.apply_batch(con, self.events, self.offsets, self.rejected)


def next_offsets(records: Iterable[Record]) -> dict[tuple[str, int], int]:
    """Per partition, the offset after the last record: where a restart resumes."""
    offsets: dict[tuple[str, int], int] = {}
    for r in records:
        key = (r.topic, r.partition)
        offsets[key] = max(offsets.get(key, 0), r.offset + 1)
    return offsets


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

    By default a batch's balances are sent before its transaction commits, from the mirror
    updated inside that transaction: a DuckDB commit takes milliseconds (and a checkpoint
    hundreds), the send one. That is safe because a balance is an absolute snapshot: if
    the commit never happens, a restart re-reads the same events from the stored offsets
    and sends the same values again. `publish_before_commit=False` waits for the commit.
    """

    def __init__(self, con: duckdb.DuckDBPyConnection, config: Config, topics: Topics,
                 producer: AIOKafkaProducer, publish_before_commit: bool = True) -> None:
        # A cursor of its own: the audit endpoint makes its cursors from `con` meanwhile.
        self.writer = con.cursor()
        store.index_event_ids(self.writer)  # small live batches: dedupe by index lookups
        self.decoder = Decoder.of(config.budgets.per_user_budgets)
        self.topics = topics
        self.producer = producer
        self.mirror: dict[str, UserUsage] = store.load_usages(self.writer)
        self.publish_before_commit = publish_before_commit
        self._work: asyncio.Future[None] | None = None
        self._acks: asyncio.Future[list[object]] | None = None
        self.metrics = Metrics()
        self.held: dict[tuple[str, int], int] = {}  # see hold_until

    def hold_until(self, stored: store.Offsets, ends: store.Offsets) -> None:
        """Send no balance until the consumer reaches `ends` (the topics' ends at start).
        Balances go out before their commit, so a killed run may have sent more than it
        stored: sent before then, the stored (older) figures would make decisions go back."""
        self.held = {key: end for key, end in ends.items() if end > stored.get(key, 0)}

    async def release(self, records: list[Record]) -> None:
        """After a batch: once the ends are reached, every balance, once."""
        if not self.held:
            return
        for key, reached in next_offsets(records).items():
            if self.held.get(key, reached + 1) <= reached:
                del self.held[key]
        if not self.held:
            await self.publish(self.mirror)

    def begin(self, records: list[Record]) -> tuple[Decoded, store.Applied]:
        """Decode a batch, open its transaction to find its new events, and fold them into
        the mirror: all a publish needs. `complete` writes the rest and commits."""
        decoded = Decoded.of(self.decoder, self.topics, records)
        applied = store.begin_batch(self.writer, decoded.events)
        store.merge_usages(self.mirror, store.usages_of(applied.new))
        return decoded, applied

    def complete(self, decoded: Decoded, applied: store.Applied) -> None:
        store.finish_batch(self.writer, applied, decoded.offsets, decoded.rejected)

    async def handle(self, records: list[Record]) -> None:
        # DuckDB releases the GIL: in a thread, the audit endpoint and fetches go on.
        decoded, applied = await asyncio.to_thread(self.begin, records)
        if self.publish_before_commit:
            sent = await self.send(applied.users)
            await asyncio.to_thread(self.complete, decoded, applied)
        else:
            await asyncio.to_thread(self.complete, decoded, applied)
            sent = await self.send(applied.users)
        # The acks are awaited while the next batch is read, before its balances are sent.
        await self.acked()
        self._acks = asyncio.gather(*sent)

    async def acked(self) -> None:
        """Until the broker has acknowledged every balance sent (a failure raises here)."""
        if self._acks is not None:
            acks, self._acks = self._acks, None
            await acks

    async def send(self, users: Iterable[str]) -> list[asyncio.Future[object]]:
        """Queue each user's absolute balance; the futures settle when the broker acks."""
        if self.held:
            return []  # held back until caught up (see hold_until)
        as_of = datetime.now(UTC)
        return [
            await self.producer.send(self.topics.budget_balances, key=user.encode(),
                                     value=to_balance(self.mirror[user], as_of)
                                     .model_dump_json().encode())
            for user in sorted(users)
        ]

    async def publish(self, users: Iterable[str]) -> None:
        await asyncio.gather(*await self.send(users))

    async def consume(self, consumer: AIOKafkaConsumer) -> None:
        # Read ahead while a batch is handled: aiokafka sends the next fetch only once the
        # records it holds are taken, so a reader that waited for each batch's commit left
        # new events at the broker for up to two batch times (~65 ms at 1,000 events/s).
        ahead: asyncio.Queue[list[Record]] = asyncio.Queue(maxsize=READ_AHEAD)
        reader = asyncio.ensure_future(_read_ahead(consumer, ahead))
        try:
            while True:
                records = await _take(ahead, reader)
                # Shielded: a stop lets the batch under way commit and publish (see finish).
                self._work = asyncio.ensure_future(self.handle(records))
                await asyncio.shield(self._work)
                self.metrics.count_in(records)
                await self.release(records)
        finally:
            reader.cancel()  # what it read and nobody took is read again after a restart

    async def finish(self) -> None:
        if self._work is not None:
            await self._work
        await self.acked()


async def _read_ahead(consumer: AIOKafkaConsumer, ahead: asyncio.Queue[list[Record]]) -> None:
    async for records in batches(consumer, max_records=BATCH_SIZE):
        await ahead.put(records)


async def _take(ahead: asyncio.Queue[list[Record]], reader: asyncio.Future[None],
                ) -> list[Record]:
    """Everything read ahead (up to about BATCH_SIZE), once there is something."""
    if ahead.empty():
        getting: asyncio.Future[Any] = asyncio.ensure_future(ahead.get())
        waiting: set[asyncio.Future[Any]] = {getting, reader}
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if not getting.done():
            getting.cancel()
            reader.result()  # the reader's error, if it failed
            raise RuntimeError("the projector's reader stopped")
        records: list[Record] = getting.result()
    else:
        records = ahead.get_nowait()
    while not ahead.empty() and len(records) < BATCH_SIZE:
        records = records + ahead.get_nowait()
    return records


async def run_projector(config: Config, bootstrap: str, topics: Topics, db_path: Path,
                        stop: asyncio.Event, port: int | None = None,
                        partitions: int = 3, publish_before_commit: bool = True,
                        audit_limits: AuditLimits | None = None,
                        config_dir: Path | None = None) -> None:
    """Run until `stop` is set; with a port, serve POST /audit (sandboxed within
    `audit_limits`, for admins as `config`'s auth says; `config_dir` resolves its key file),
    /metrics, /healthz and /readyz (ready once caught up with usage.events and usage.dlq)
    on 127.0.0.1:port."""
    await ensure_topics(bootstrap, topics, partitions)
    db_path.parent.mkdir(parents=True, exist_ok=True)
    async with contextlib.AsyncExitStack() as stack:
        con = stack.enter_context(store.connect(db_path))
        consumer = await stack.enter_async_context(_started(make_consumer(bootstrap)))
        producer = await stack.enter_async_context(_started(make_producer(bootstrap)))
        projector = Projector(con, config, topics, producer, publish_before_commit)
        stored = store.load_offsets(projector.writer)
        parts = await assign_from(consumer, (topics.usage_events, topics.usage_dlq), stored)
        if publish_before_commit:
            ends = await end_offsets(consumer, parts)
            projector.hold_until(stored, {(tp.topic, tp.partition): n for tp, n in ends.items()})
        # Heals a crash between a commit and its publish: every balance, once (when held
        # back, once caught up).
        await projector.publish(projector.mirror)
        readiness = Readiness()
        await stack.enter_async_context(watching(consumer, projector.metrics, readiness))
        if port is not None:
            limits = audit_limits or AuditLimits()
            lock_down(con, limits)
            auditor = Auditor(con, limits)
            app = audit_app(auditor, Access.build(config, config_dir),
                            ops_routes(projector.metrics, readiness))
            await stack.enter_async_context(serving(app, port))
            # Unwound first: running audits are interrupted, so the server stops promptly.
            stack.push_async_callback(auditor.stop)
        log.info("projector: %d users, reading %s", len(projector.mirror), topics.usage_events)
        await _until(stop, projector, consumer)


async def _until(stop: asyncio.Event, projector: Projector, consumer: AIOKafkaConsumer) -> None:
    """Consume until stopped; a failure of the loop ends the projector with its error."""
    loop = asyncio.ensure_future(projector.consume(consumer))
    waiter = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({loop, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if loop in done:
        loop.result()
        return
    loop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await loop
    await projector.finish()


@contextlib.asynccontextmanager
async def _started(client: K) -> AsyncIterator[K]:
    await client.start()
    try:
        yield client
    finally:
        await client.stop()


# the command -------------------------------------------------------------------------------


def base_parser(prog: str, settings: Settings) -> argparse.ArgumentParser:
    """The options the projector and replay share; the caller adds its own and parses."""
    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--config", type=Path, default=settings.config_dir,
                        help="directory of auth.yaml, users.yaml, budgets.yaml")
    parser.add_argument("--db", type=Path, default=store.default_db_path(settings.data_dir),
                        help="the projector's DuckDB file")
    parser.add_argument("--namespace", default=settings.topic_namespace,
                        help="topic name prefix (default: TALLY_TOPIC_NAMESPACE)")
    return parser


def main(argv: list[str]) -> int:
    settings = Settings.from_env()
    parser = base_parser("tally projector", settings)
    parser.add_argument("--port", type=int, default=settings.projector_port,
                        help="audit endpoint port on 127.0.0.1; 0 serves none")
    parser.add_argument("--publish-after-commit", action="store_true",
                        help="send balances only once their batch has committed "
                             "(slower; the default sends them just before the commit)")
    add_limit_options(parser)
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"tally projector: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(_run_until_signalled(config, settings, args))
    return 0


async def _run_until_signalled(config: Config, settings: Settings,
                               args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await run_projector(config, settings.bootstrap_servers, Topics(args.namespace), args.db,
                        stop, port=args.port or None, partitions=settings.partitions,
                        publish_before_commit=not args.publish_after_commit,
                        audit_limits=AuditLimits.of(args), config_dir=args.config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
