"""A large usage.events history, produced fast: the bench's generator (raw JSON of
UsageRecorded, no pydantic), sent with librdkafka (aiokafka sends ~30,000 records/s here,
librdkafka several times as many). For the projector's tests that need 100,000 records or
more (a bulk restore of more than one batch, a large lost partition)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import orjson
from confluent_kafka import KafkaError, Producer

from bench.common import usage_values
from tally.services.enforcer.state import partition_of as partition_of_user

__all__ = ["event_ids", "history", "partition_of", "produce_fast"]

Message = tuple[bytes, bytes]


def history(count: int, users: int, seed: int, copies_every: int = 0) -> list[Message]:
    """`count` events of `users` users (key user_id), then a copy of each
    `copies_every`-th (the same key: a copy lands in its original's partition)."""
    values = list(usage_values(count, users=users, seed=seed))
    return values + (values[::copies_every] if copies_every else [])


def partition_of(message: Message, partitions: int) -> int:
    """The partition a message's key goes to (murmur2, as produce_fast and aiokafka do)."""
    return partition_of_user(message[0].decode(), partitions)


def event_ids(messages: Sequence[Message]) -> set[str]:
    return {orjson.loads(value)["event_id"] for _, value in messages}


async def produce_fast(bootstrap: str, topic: str, messages: Sequence[Message]) -> None:
    """Every message onto `topic`, acknowledged (in a thread: librdkafka's calls block)."""
    await asyncio.to_thread(_produce, bootstrap, topic, messages)


def _produce(bootstrap: str, topic: str, messages: Sequence[Message]) -> None:
    failed: list[KafkaError] = []

    def delivered(error: KafkaError | None, _: Any) -> None:
        if error is not None:
            failed.append(error)

    # murmur2, as the Java clients and aiokafka (the ingest) place a key: one user, one
    # partition, whichever client sent the event.
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20,
                         "enable.idempotence": True, "partitioner": "murmur2_random"})
    for key, value in messages:
        while True:
            try:
                producer.produce(topic, value, key, on_delivery=delivered)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.05)
        producer.poll(0)
    assert producer.flush(60) == 0, "messages left undelivered"
    assert not failed, failed[:3]
