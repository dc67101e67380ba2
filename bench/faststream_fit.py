"""Where FastStream fits: the read rate of one topic through aiokafka's batch reader (what
the ingest, the projector and the enforcer use), FastStream's batch subscriber and its
per-message subscriber, on the same records.

    .venv/bin/python -m bench.faststream_fit [--events 200000] [--runs 3]

usage.events of the bench broker (the synthetic usage of bench.common), read from the
start to its end by a consumer doing no work (FastStream's handlers take the raw
KafkaMessage: nothing is decoded), each reader in a consumer group of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage

from bench.common import bench_broker, ensure_usage, machine, median, print_table
from tally.kafka import batches, make_consumer
from tally.services.projector.app import assign_from
from tally.topics import Topics

Reader = Callable[[str, str, int], Awaitable[float]]


async def aiokafka_batches(bootstrap: str, topic: str, total: int) -> float:
    """Records per second through tally.kafka.batches (getmany, 10,000 at a time)."""
    consumer = make_consumer(bootstrap, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        await assign_from(consumer, (topic,), {})
        done, started = 0, time.perf_counter()
        async for records in batches(consumer, max_records=10_000):
            done += len(records)
            if done >= total:
                break
        return done / (time.perf_counter() - started)
    finally:
        await consumer.stop()


async def faststream(bootstrap: str, topic: str, total: int, *, batch: bool) -> float:
    """Records per second through a FastStream subscriber (a group of its own)."""
    broker = KafkaBroker(bootstrap, logger=None)
    done = 0
    finished = asyncio.Event()

    async def count(message: KafkaMessage) -> None:  # the raw message: no JSON decoding
        nonlocal done
        done += len(message.raw_message) if batch else 1
        if done >= total:
            finished.set()

    options: dict[str, Any] = {"max_records": 10_000} if batch else {}
    broker.subscriber(topic, group_id=f"fit-{uuid.uuid4()}", auto_offset_reset="earliest",
                      ack_policy=AckPolicy.ACK_FIRST, batch=batch, fetch_max_wait_ms=100,
                      max_partition_fetch_bytes=4 * 1024 * 1024, **options)(count)
    async with broker:
        await broker.start()
        started = time.perf_counter()  # from the start of consuming: joining the group excluded
        await finished.wait()
        return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    topics = Topics("bench-fit")
    readers: dict[str, Reader] = {
        "aiokafka getmany (tally.kafka.batches)": aiokafka_batches,
        "FastStream batch subscriber": lambda b, t, n: faststream(b, t, n, batch=True),
        "FastStream per-message subscriber": lambda b, t, n: faststream(b, t, n, batch=False),
    }
    with bench_broker() as bootstrap:
        asyncio.run(ensure_usage(bootstrap, topics, args.events))
        rows = []
        for name, reader in readers.items():
            rate, runs = median(args.runs, lambda r=reader: asyncio.run(
                r(bootstrap, topics.usage_events, args.events)))
            rows.append((name, f"{rate:,.0f}", ", ".join(f"{v:,.0f}" for v in runs)))
    print(machine())
    print_table(("reader", "records/s (median)", "runs"), rows)


if __name__ == "__main__":
    main()
