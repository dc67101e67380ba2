"""Bulk reads of topics with librdkafka (confluent-kafka): what `tally replay` and the bulk
restore of a gained partition (services/projector/restore.py) read with.

aiokafka parses every record in Python (~4 us an event here, holding the GIL); librdkafka
parses in C in its own threads, and `Consumer.consume` hands over a batch of messages whose
Python part is a few attribute calls each. On the 1M-event topic of bench 1, in one run on
the shared 2-core machine (bench/RESULTS.md section 1): raw consume with aiokafka's
`getmany` ~85k events/s, with `consume` ~250k/s, and a CPU cost of ~2 us an event in this
process, librdkafka's threads included.

The live services stay on aiokafka (tally.kafka): they read small batches in an event loop
and share its producers and admin clients. This reader is synchronous (`consume` blocks
with the GIL released): replay runs it in a thread of its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from tally.kafka import Record
from tally.settings import KafkaSecurity

__all__ = ["Bounds", "Columns", "TopicReader", "librdkafka_security"]

log = logging.getLogger(__name__)

METADATA_TIMEOUT_S = 30.0
# Messages a `consume` call asks for. It returns when it has them or at its timeout, so a
# smaller ask keeps the messages moving: 10,000 read 92k/s where 122,880 read 56k/s.
CONSUME_AT_ONCE = 10_000


def librdkafka_security(security: KafkaSecurity | None = None) -> dict[str, Any]:
    """librdkafka's names for the settings tally.kafka.security_options gives aiokafka
    (SASL PLAIN/SCRAM, TLS with a CA file and an optional client certificate); both
    verify the broker's host name by default."""
    security = security or KafkaSecurity.from_env()
    config: dict[str, Any] = {"security.protocol": security.protocol}
    if security.sasl:
        config |= {"sasl.mechanisms": security.sasl_mechanism,
                   "sasl.username": security.sasl_username,
                   "sasl.password": security.sasl_password}
    if security.tls:
        for name, value in (("ssl.ca.location", security.ssl_ca_file),
                            ("ssl.certificate.location", security.ssl_cert_file),
                            ("ssl.key.location", security.ssl_key_file),
                            ("ssl.key.password", security.ssl_key_password)):
            if value is not None:
                config[name] = str(value)
    return config


@dataclass
class Columns:
    """One batch as columns: the values, partitions and offsets of one topic's records (the
    bulk of a batch, decoded column-wise), the other topics' records as Records, and the
    offset after the last record per (topic, partition)."""

    topic: str
    values: list[bytes | None] = field(default_factory=list)
    partitions: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    others: list[Record] = field(default_factory=list)
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values) + len(self.others)

    def records(self) -> list[Record]:
        """The main topic's records as Records (the per-record path needs them)."""
        return [Record(self.topic, p, o, None, v, 0)
                for v, p, o in zip(self.values, self.partitions, self.offsets, strict=True)]


Bounds = dict[tuple[str, int], int]  # an offset per (topic, partition)


class TopicReader:
    """Every partition of some topics read from its beginning up to its end offset at
    start (what a reader "up to its end" must compare with, or a busy topic never lets it
    finish), in batches; or, given `bounds` (starts, ends), those partitions between
    those offsets. Offsets are never committed: the caller keeps its own."""

    def __init__(self, bootstrap: str, topics: list[str], main: str,
                 security: KafkaSecurity | None = None,
                 bounds: tuple[Bounds, Bounds] | None = None) -> None:
        self.main = main
        self.consumer = Consumer({
            "bootstrap.servers": bootstrap,
            **librdkafka_security(security),
            "group.id": "tally-bulk-reader",  # never joined: partitions are assigned
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,  # an end reached, even past a gap in the offsets
            # Larger fetches than the default 1 MiB a partition: fewer round trips.
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
            # Past queued.min.messages (100,000 a partition, ~50 MB here) librdkafka stops
            # fetching for this long (default 1 s): replay takes 122,880 at a time, so the
            # default stalled the reader (raw consume 122k/s against 186k/s for aiokafka
            # in one bench run; 10 ms read 96k/s where 1 s read 74k/s, alternated).
            "fetch.queue.backoff.ms": 10,
        }, logger=log)
        try:
            self.starts, self.ends = bounds or self._bounds(topics)
        except BaseException:
            self.consumer.close()
            raise
        self.pending = {tp for tp, end in self.ends.items() if end > self.starts[tp]}
        self.consumer.assign([TopicPartition(t, p, self.starts[(t, p)]) for t, p in self.pending])

    def _bounds(self, topics: list[str]) -> tuple[Bounds, Bounds]:
        starts, ends = {}, {}
        metadata = self.consumer.list_topics(timeout=METADATA_TIMEOUT_S)
        for topic in topics:
            found = metadata.topics.get(topic)
            if found is None or found.error is not None:
                raise KafkaException(f"topic {topic!r} is not readable: "
                                     f"{found.error if found else 'it does not exist'}")
            for partition in sorted(found.partitions):
                low, high = self.consumer.get_watermark_offsets(
                    TopicPartition(topic, partition), timeout=METADATA_TIMEOUT_S)
                starts[(topic, partition)], ends[(topic, partition)] = low, high
        return starts, ends

    def partition_count(self, topic: str) -> int:
        """How many partitions of `topic` this reader reads."""
        return sum(1 for t, _ in self.ends if t == topic)

    @property
    def total(self) -> int:
        """How many records (offsets) lie between the starts and the ends."""
        return sum(self.ends[tp] - self.starts[tp] for tp in self.ends)

    def next_batch(self, size: int, timeout_s: float = 1.0) -> Columns | None:
        """Up to `size` records before the ends; None once every partition reached its end."""
        batch = Columns(self.main)
        while self.pending and len(batch) < size:
            messages = self.consumer.consume(num_messages=min(size - len(batch), CONSUME_AT_ONCE),
                                             timeout=timeout_s)
            self._add(batch, messages)
        return batch if len(batch) else None

    def _add(self, batch: Columns, messages: list[Message]) -> None:
        """The messages as columns. Usually all of them are records of the main topic
        before the ends: then the columns are taken whole (five C-level list builds,
        ~0.3 us a message, where a Python loop over them took ~1 us); otherwise (an end
        reached, an error or another topic) one by one."""
        # A consumed message always has these three (the stubs allow None: cast).
        topics = cast(list[str], [m.topic() for m in messages])
        partitions = cast(list[int], [m.partition() for m in messages])
        offsets = cast(list[int], [m.offset() for m in messages])
        last = dict(zip(partitions, offsets, strict=True))  # the messages are in offset order
        if (topics.count(self.main) == len(messages)
                and not any(m.error() for m in messages)
                and all(offset + 1 < self.ends[(self.main, p)] for p, offset in last.items())):
            batch.values += [m.value() for m in messages]
            batch.partitions += partitions
            batch.offsets += offsets
            batch.next_offsets |= {(self.main, p): offset + 1 for p, offset in last.items()}
        else:
            for message in messages:
                self._add_one(batch, message)

    def _add_one(self, batch: Columns, message: Message) -> None:
        error = message.error()
        topic, partition, offset = cast(
            tuple[str, int, int], (message.topic(), message.partition(), message.offset()))
        key = (topic, partition)
        if error is not None:
            if error.code() != KafkaError._PARTITION_EOF:
                raise KafkaException(error)
            if offset >= self.ends[key]:
                self._done(key)
            return
        if key not in self.pending or offset >= self.ends[key]:
            return  # written after the start: the live projector's business
        if topic == self.main:
            batch.values.append(message.value())
            batch.partitions.append(partition)
            batch.offsets.append(offset)
        else:
            batch.others.append(Record(topic, partition, offset, message.key(),
                                       message.value(), message.timestamp()[1]))
        batch.next_offsets[key] = offset + 1
        if offset + 1 >= self.ends[key]:
            self._done(key)

    def _done(self, key: tuple[str, int]) -> None:
        self.pending.discard(key)
        self.consumer.pause([TopicPartition(*key)])

    def close(self) -> None:
        self.consumer.close()
