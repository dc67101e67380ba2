"""`tally ingest`: usage.raw and POST /v1/usage in; usage.events and usage.dlq out.

One event loop runs both the Kafka loop and (with a port) the HTTP server. The Kafka loop
reads usage.raw in batches of up to 10k, validates and identifies each record (see
tally/identity.py for how identities map to users.yaml ids), sends the whole batch without
awaiting each send, waits for every ack, and only then commits the batch's offsets:
at-least-once. A crash between the acks and the commit re-sends a batch; the projector
dedupes by event_id, so that costs nothing but time. Invalid records go to usage.dlq and
the loop keeps going.

Events on usage.raw are trusted as to who they are for: whoever may write that topic is a
gateway (guard it with Kafka ACLs). HTTP callers are authenticated (see tally/auth.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import CommitFailedError

from tally.config.models import Config, EventTimeWindow
from tally.identity import Directory
from tally.kafka import Record, ensure_topics, fetch, make_consumer, make_producer
from tally.ops import Metrics, Readiness, observe_lag
from tally.service import (
    QuietServer,
    bind,
    configure_logging,
    load_config_or_report,
    run_or_report,
    stop_on_signals,
)
from tally.services.ingest.http import count_rejected, create_app
from tally.services.ingest.identify import identify
from tally.services.ingest.validate import admit, parse_event, rejection
from tally.topics import Topics
from tally.wire import RejectedEvent, UsageRecorded

__all__ = ["Intake", "KafkaPublisher", "main", "run_ingest", "triage_records"]

log = logging.getLogger("tally.ingest")


class KafkaPublisher:
    """The `Publisher` both paths use: events keyed by user, rejections to the DLQ."""

    def __init__(self, producer: AIOKafkaProducer, topics: Topics) -> None:
        self._producer = producer
        self._topics = topics

    async def publish(
        self, accepted: Sequence[UsageRecorded], rejected: Sequence[RejectedEvent]
    ) -> None:
        # `send` only appends to the producer's buffer; the acks are awaited together.
        send = self._producer.send
        acks = [await send(self._topics.usage_events, e.model_dump_json().encode(),
                           key=e.user_id.encode()) for e in accepted]
        # Keyed by source: copies of a record rejected again after a crash share a partition,
        # in order, so the projector keeps the same first copy live and in replay.
        acks += [await send(self._topics.usage_dlq, r.model_dump_json().encode(),
                            key=r.source.encode()) for r in rejected]
        await asyncio.gather(*acks)


@dataclass(frozen=True)
class Intake:
    """What deciding on one usage.raw record needs: who the users are, which times count."""

    directory: Directory
    window: EventTimeWindow

    @classmethod
    def of(cls, config: Config) -> Intake:
        return cls(Directory.from_config(config), config.budgets.per_user_budgets.event_time_window)

    def triage(self, record: Record, now: datetime) -> UsageRecorded | str:
        outcome = parse_event(record.value)
        if not isinstance(outcome, str):
            outcome = admit(outcome, self.window, now)
        if isinstance(outcome, str):
            return outcome
        # Only gateways may write usage.raw: they may label identities nobody claims.
        return identify(outcome, self.directory, from_gateway=True)


def triage_records(
    records: Sequence[Record], intake: Intake, now: datetime
) -> tuple[list[UsageRecorded], list[RejectedEvent]]:
    """Each record becomes an identified event or a DLQ record; none is dropped, and
    none stops the loop: what fails unforeseen is dead-lettered with the error."""
    accepted: list[UsageRecorded] = []
    rejected: list[RejectedEvent] = []
    for record in records:
        try:
            outcome = intake.triage(record, now)
        except Exception as error:  # a bug must not freeze counting for everyone
            log.exception("usage.raw record %s could not be triaged", record.source)
            outcome = f"ingest could not process this record: {type(error).__name__}"
        if isinstance(outcome, str):
            rejected.append(rejection(record.value, outcome, record.source, now))
        else:
            accepted.append(outcome)
    return accepted, rejected


def next_offsets(records: Sequence[Record]) -> dict[TopicPartition, int]:
    """What to commit after `records`: one past the last offset seen per partition."""
    offsets: dict[TopicPartition, int] = {}
    for r in records:
        tp = TopicPartition(r.topic, r.partition)
        offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
    return offsets


async def consume(
    consumer: AIOKafkaConsumer, publisher: KafkaPublisher, intake: Intake,
    metrics: Metrics, readiness: Readiness,
) -> None:
    while True:
        batch = await fetch(consumer, 10_000, 50)
        if batch:
            await handle(batch, consumer, publisher, intake, metrics)
        # Also when idle: an empty usage.raw is caught up too.
        await observe_lag(metrics, consumer)
        await readiness.check(consumer)


async def handle(batch: list[Record], consumer: AIOKafkaConsumer, publisher: KafkaPublisher,
                 intake: Intake, metrics: Metrics) -> None:
    accepted, rejected = triage_records(batch, intake, datetime.now(UTC))
    await publisher.publish(accepted, rejected)
    await commit(consumer, batch)
    metrics.count_in(batch)
    count_rejected(metrics, rejected)
    if rejected:
        log.info("batch of %d: %d to usage.dlq", len(batch), len(rejected))


async def commit(consumer: AIOKafkaConsumer, batch: Sequence[Record]) -> None:
    """Commit a published batch. A group rebalance meanwhile refuses the commit; the batch
    is then read again from the last commit, by us or the partitions' new owner."""
    try:
        await consumer.commit(next_offsets(batch))
    except CommitFailedError:
        log.warning("group rebalanced before the commit: %d records will be read again",
                    len(batch))


async def serve_http(server: QuietServer, sock: socket.socket) -> None:
    try:
        await server.serve(sockets=[sock])
    finally:
        sock.close()


def http_server(config: Config, publisher: KafkaPublisher, config_dir: Path | None,
                metrics: Metrics, readiness: Readiness) -> QuietServer:
    app = create_app(config, publisher, config_dir=config_dir, metrics=metrics,
                     readiness=readiness)
    return QuietServer(uvicorn.Config(app, lifespan="off", log_level="warning", access_log=False))


async def run_ingest(
    config: Config,
    bootstrap: str,
    topics: Topics,
    port: int | None,
    stop: asyncio.Event,
    *,
    host: str = "127.0.0.1",
    partitions: int = 3,
    config_dir: Path | None = None,
    metrics: Metrics | None = None,
) -> None:
    """Run until `stop` is set (or a part fails, which is re-raised). The HTTP port also
    serves /metrics (into `metrics`, when given), /healthz and /readyz."""
    await ensure_topics(bootstrap, topics, partitions)
    producer = make_producer(bootstrap)
    consumer = make_consumer(bootstrap, group_id=f"tally-ingest:{topics.usage_raw}")
    await producer.start()
    try:
        await consumer.start()
        consumer.subscribe([topics.usage_raw])
        publisher = KafkaPublisher(producer, topics)
        ops = (metrics or Metrics(), Readiness())
        await _run_parts(consumer, publisher, config, port, stop, host, config_dir, ops)
    finally:
        await consumer.stop()
        await producer.stop()  # flushes whatever the cancelled loop had buffered


async def _run_parts(
    consumer: AIOKafkaConsumer, publisher: KafkaPublisher, config: Config, port: int | None,
    stop: asyncio.Event, host: str, config_dir: Path | None, ops: tuple[Metrics, Readiness],
) -> None:
    # Bind first: a busy port fails the start before anything else is running.
    sock = bind(host, port) if port is not None else None
    loop = asyncio.create_task(consume(consumer, publisher, Intake.of(config), *ops),
                               name="ingest-kafka")
    server: QuietServer | None = None
    parts = [loop]
    if sock is not None:
        server = http_server(config, publisher, config_dir, *ops)
        log.info("ingest HTTP on http://%s:%d/v1/usage", host, sock.getsockname()[1])
        parts.append(asyncio.create_task(serve_http(server, sock), name="ingest-http"))
    try:
        await _until_stop_or_failure(stop, parts)
    finally:
        await _shut_down(loop, server, parts)


async def _until_stop_or_failure(stop: asyncio.Event, parts: list[asyncio.Task[None]]) -> None:
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, *parts], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    for task in done - {stopper}:
        task.result()  # re-raise a part's failure
        raise RuntimeError(f"{task.get_name()} ended unexpectedly")


async def _shut_down(
    loop: asyncio.Task[None], server: QuietServer | None, parts: list[asyncio.Task[None]]
) -> None:
    loop.cancel()  # uncommitted work is redone after a restart: at-least-once
    if server is not None:
        server.should_exit = True  # graceful: finish in-flight requests first
    # A part that already failed was re-raised by _until_stop_or_failure; not again here.
    await asyncio.gather(*parts, return_exceptions=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tally ingest", description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, help="config directory (default: settings)")
    parser.add_argument("--port", type=int, help="HTTP port (default: TALLY_INGEST_PORT)")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP bind address")
    parser.add_argument("--no-http", action="store_true", help="consume usage.raw only")
    return parser.parse_args(argv)


async def _main(config: Config, bootstrap: str, topics: Topics, args: argparse.Namespace,
                port: int | None, partitions: int) -> None:
    stop = asyncio.Event()
    stop_on_signals(stop)
    log.info("ingest: %s -> %s, %s (Kafka %s; %d users in %s)", topics.usage_raw,
             topics.usage_events, topics.usage_dlq, bootstrap,
             len(config.users.user_identification.users), args.config)
    await run_ingest(config, bootstrap, topics, port, stop, host=args.host,
                     partitions=partitions, config_dir=args.config)
    log.info("ingest stopped")


def main(argv: list[str]) -> int:
    from tally.settings import Settings

    args = parse_args(argv)
    settings = Settings.from_env()
    args.config = args.config or settings.config_dir
    config = load_config_or_report(args.config, "tally ingest")
    if config is None:
        return 1
    configure_logging()
    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # group chatter at INFO
    port = None if args.no_http else (settings.ingest_port if args.port is None else args.port)
    return run_or_report(_main(config, settings.bootstrap_servers, settings.topics, args, port,
                               settings.partitions), "tally ingest")
