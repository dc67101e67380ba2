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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import CommitFailedError

from tally.cli import command_main
from tally.config.loader import LiveConfig, load_config
from tally.config.models import Config, EventTimeWindow
from tally.identity import Directory
from tally.kafka import Record, commit_offsets, ensure_topics, fetch, make_consumer, make_producer
from tally.ops import Metrics, Readiness, observe_lag
from tally.service import Part, bind, http_part, run_parts, run_service, started
from tally.services.ingest.http import count_rejected, create_app
from tally.services.ingest.identify import identify
from tally.services.ingest.validate import admit, parse_event, rejection
from tally.settings import Settings
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


async def consume(
    consumer: AIOKafkaConsumer, publisher: KafkaPublisher, intake: Callable[[], Intake],
    metrics: Metrics, readiness: Readiness,
) -> None:
    """Until cancelled; each batch under the `intake` of the config as it is then."""
    while True:
        batch = await fetch(consumer, 10_000, 50)
        if batch:
            await handle(batch, consumer, publisher, intake(), metrics)
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
        await consumer.commit(commit_offsets(batch))
    except CommitFailedError:
        log.warning("group rebalanced before the commit: %d records will be read again",
                    len(batch))


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
    group = f"tally-ingest:{topics.usage_raw}"
    # The producer stops last: it flushes whatever the cancelled loop had buffered.
    async with (started(make_producer(bootstrap)) as producer,
                started(make_consumer(bootstrap, group_id=group)) as consumer):
        consumer.subscribe([topics.usage_raw])
        publisher = KafkaPublisher(producer, topics)
        ops = (metrics or Metrics(), Readiness())
        # Bound before the parts start: a busy port fails the start.
        sock = bind(host, port) if port is not None else None
        # A changed users.yaml (a new user, a revoked key) applies to both paths at once.
        live = LiveConfig(config, config_dir)
        # Cancelled on stop: uncommitted work is redone after a restart (at-least-once).
        parts = [Part("ingest-kafka", lambda: consume(consumer, publisher,
                                                      live.derived(Intake.of), *ops)),
                 Part("ingest-config", live.follow)]
        if sock is not None:
            app = create_app(live, publisher, config_dir=config_dir, metrics=ops[0],
                             readiness=ops[1])
            log.info("ingest HTTP on http://%s:%d/v1/usage", host, sock.getsockname()[1])
            parts.append(http_part("ingest-http", app, sock))
        await run_parts(stop, parts)


def run(args: argparse.Namespace) -> int:
    """`tally ingest` (options: tally.cli)."""
    settings = Settings.from_env()
    config = load_config(args.config)
    port = None if args.no_http or not args.port else args.port

    async def service(stop: asyncio.Event) -> None:
        log.info("ingest: %s -> %s, %s (Kafka %s; %d users in %s)", settings.topics.usage_raw,
                 settings.topics.usage_events, settings.topics.usage_dlq,
                 settings.bootstrap_servers, len(config.users.user_identification.users),
                 args.config)
        await run_ingest(config, settings.bootstrap_servers, settings.topics, port, stop,
                         host=args.host, partitions=settings.partitions, config_dir=args.config)

    return run_service("tally ingest", service)


main = command_main("ingest")
