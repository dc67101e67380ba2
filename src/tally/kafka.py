"""The narrow Kafka seam every service shares: topic setup, producers, batch reads.

Built on aiokafka because the projector must seek to offsets it keeps in DuckDB and every
consumer reads in batches (`getmany`): both are outside FastStream's per-message model.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from tally.topics import Topics

__all__ = [
    "Record",
    "batches",
    "end_offsets",
    "ensure_topics",
    "fetch",
    "make_consumer",
    "make_producer",
    "partitions_of",
    "read_to_end",
]

log = logging.getLogger(__name__)

COMPACTED_CONFIG = {"cleanup.policy": "compact", "min.cleanable.dirty.ratio": "0.1",
                    "segment.ms": "600000"}


@dataclass(frozen=True, slots=True)
class Record:
    """One consumed message, stripped to what the services use."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int

    @property
    def source(self) -> str:
        """Where the record is, as logs and the DLQ name it: "kafka:usage.raw[0]@42"."""
        return f"kafka:{self.topic}[{self.partition}]@{self.offset}"


async def ensure_topics(bootstrap: str, topics: Topics, partitions: int) -> None:
    """Create the missing topics; compaction on the snapshot topics. Existing ones stay."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = [
            NewTopic(name, partitions, 1,
                     topic_configs=COMPACTED_CONFIG if name in topics.compacted() else {})
            for name in topics.all() if name not in existing
        ]
        if wanted:
            await _create(admin, wanted)
    finally:
        await admin.close()


async def _create(admin: AIOKafkaAdminClient, wanted: list[NewTopic]) -> None:
    try:
        await admin.create_topics(wanted)
    except TopicAlreadyExistsError:
        log.info("topics created concurrently by another service")
    names = {t.name for t in wanted}
    for _ in range(50):  # metadata propagates asynchronously after CreateTopics
        if names <= set(await admin.list_topics()):
            return
        await asyncio.sleep(0.1)


def make_producer(bootstrap: str, linger_ms: int = 1) -> AIOKafkaProducer:
    """An idempotent producer with acks=all: a retry never writes a message twice."""
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        enable_idempotence=True,
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        compression_type=None,
    )


def make_consumer(
    bootstrap: str, group_id: str | None = None, fetch_max_wait_ms: int = 5
) -> AIOKafkaConsumer:
    """A consumer that never auto-commits: offsets are committed after the work is done.

    Without a group, callers assign partitions and seek themselves (projector, caches).
    """
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=fetch_max_wait_ms,
        max_partition_fetch_bytes=4 * 1024 * 1024,
        isolation_level="read_committed",
    )


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    for _ in range(100):
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.05)
    raise RuntimeError(f"topic {topic!r} does not exist on the broker")


async def end_offsets(
    consumer: AIOKafkaConsumer, parts: Iterable[TopicPartition]
) -> dict[TopicPartition, int]:
    result: dict[TopicPartition, int] = await consumer.end_offsets(list(parts))
    return result


async def batches(
    consumer: AIOKafkaConsumer, max_records: int = 10_000, timeout_ms: int = 50
) -> AsyncIterator[list[Record]]:
    """Yield non-empty batches across all assigned partitions, forever."""
    while True:
        batch = await fetch(consumer, max_records, timeout_ms)
        if batch:
            yield batch


async def fetch(consumer: AIOKafkaConsumer, max_records: int, timeout_ms: int) -> list[Record]:
    """One getmany across all assigned partitions, possibly empty."""
    fetched = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_records)
    return [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp)
            for messages in fetched.values() for m in messages]


async def read_to_end(bootstrap: str, topic: str) -> list[Record]:
    """Every record of a topic from the beginning up to its end offsets at call time."""
    consumer = make_consumer(bootstrap)
    await consumer.start()
    try:
        parts = await partitions_of(consumer, topic)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        targets = await end_offsets(consumer, parts)
        found: list[Record] = []
        while any([await consumer.position(tp) < end for tp, end in targets.items()]):
            found.extend(await fetch(consumer, 10_000, 100))
        return found
    finally:
        await consumer.stop()

