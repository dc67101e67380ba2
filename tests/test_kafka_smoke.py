"""The session's real broker works end to end, and the local broker starts idempotently."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from faststream.kafka import KafkaBroker

from tally_dev import localkafka

pytestmark = pytest.mark.kafka


async def create_topic(bootstrap: str, name: str, partitions: int = 3) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1)])
    finally:
        await admin.close()


async def test_faststream_round_trip(kafka_bootstrap: str, unique_name: str) -> None:
    topic = f"smoke.{unique_name}"
    await create_topic(kafka_bootstrap, topic)
    received: asyncio.Future[dict[str, str]] = asyncio.get_running_loop().create_future()
    broker = KafkaBroker(kafka_bootstrap)

    @broker.subscriber(topic, group_id=f"smoke-{unique_name}", auto_offset_reset="earliest")
    async def handle(body: dict[str, str]) -> None:
        if not received.done():
            received.set_result(body)

    async with broker:
        await broker.start()
        await broker.publish({"hello": unique_name}, topic, key=b"user-1")
        assert await asyncio.wait_for(received, timeout=30) == {"hello": unique_name}


def test_start_twice_is_harmless(local_kafka: str, local_broker_args: dict[str, Any]) -> None:
    data_dir = local_broker_args["data_dir"]
    pid = localkafka.running_pid(data_dir)
    assert pid is not None
    first = localkafka.start(**local_broker_args)
    second = localkafka.start(**local_broker_args)
    assert first == second == local_kafka == f"127.0.0.1:{local_broker_args['port']}"
    assert localkafka.running_pid(data_dir) == pid
    assert localkafka.probe("127.0.0.1", local_broker_args["port"])
