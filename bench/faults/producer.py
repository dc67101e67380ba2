"""The gateway's side of a fault run: send every message to usage.raw, paced, until acked.

A message counts as produced only once Kafka acknowledged it. A send that fails (the broker
is restarting, a batch expired) is sent again with a fresh producer until it is acked, so a
broker restart loses nothing; a retried message may land twice, which the checks read back
from usage.raw rather than assume.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from tally.kafka import make_producer

__all__ = ["Produced", "produce_paced"]

log = logging.getLogger(__name__)

CHUNK = 500


@dataclass
class Produced:
    """What the producer saw: acknowledged messages and how many sends were repeated."""

    acked: int = 0
    resent: int = 0
    seconds: float = 0.0


def _no_key(_: bytes) -> bytes | None:
    return None


async def produce_paced(bootstrap: str, topic: str, messages: Sequence[bytes],
                        seconds: float,
                        key: Callable[[bytes], bytes | None] = _no_key) -> Produced:
    """Send `messages` in order, spread evenly over about `seconds`; each one until acked.
    `key` gives a message's key (usage.events is keyed by user: the gateway's usage.raw
    needs none)."""
    loop = asyncio.get_running_loop()
    began, produced = loop.time(), Produced()
    sender = _Sender(bootstrap, topic, produced, key)
    try:
        for start in range(0, len(messages), CHUNK):
            await sender.until_acked(messages[start:start + CHUNK])
            due = began + seconds * (start + CHUNK) / len(messages)
            await asyncio.sleep(max(0.0, due - loop.time()))
    finally:
        await sender.close()
    produced.seconds = loop.time() - began
    return produced


class _Sender:
    """One idempotent producer at a time; replaced after a round with failed sends."""

    def __init__(self, bootstrap: str, topic: str, produced: Produced,
                 key: Callable[[bytes], bytes | None]) -> None:
        self.bootstrap, self.topic, self.produced, self.key = bootstrap, topic, produced, key
        self.producer: AIOKafkaProducer | None = None

    async def until_acked(self, chunk: Sequence[bytes]) -> None:
        pending = list(chunk)
        while pending:
            producer = await self._producer()
            acked = await asyncio.gather(*(self._send(producer, m) for m in pending))
            pending = [m for m, ok in zip(pending, acked, strict=True) if not ok]
            self.produced.acked += len(acked) - len(pending)
            if pending:
                self.produced.resent += len(pending)
                log.warning("%d sends failed; sending them again", len(pending))
                await self.close()
                await asyncio.sleep(1.0)

    async def _send(self, producer: AIOKafkaProducer, value: bytes) -> bool:
        try:
            await (await producer.send(self.topic, value, key=self.key(value)))
        except KafkaError as error:
            log.debug("send failed: %r", error)
            return False
        return True

    async def _producer(self) -> AIOKafkaProducer:
        while self.producer is None:
            producer = make_producer(self.bootstrap, linger_ms=5)
            try:
                await producer.start()
            except KafkaError as error:
                log.warning("producer cannot start yet: %r", error)
                await producer.stop()
                await asyncio.sleep(1.0)
                continue
            self.producer = producer
        return self.producer

    async def close(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            try:
                await producer.stop()
            except KafkaError as error:
                log.warning("producer did not stop cleanly: %r", error)
