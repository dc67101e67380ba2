"""The ingest service in-process against the real broker: usage.raw -> events and DLQ."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable

import httpx
import orjson
import pytest

from tally.kafka import Record, make_producer
from tally.services.ingest.app import run_ingest
from tally.topics import Topics
from tally.wire import RejectedEvent, UsageRecorded

from .helpers import count_records, make_config, raw, read_topic, usage

pytestmark = pytest.mark.kafka

RunningIngest = Callable[..., contextlib.AbstractAsyncContextManager[None]]


@pytest.fixture
def topics(unique_name: str) -> Topics:
    return Topics(namespace=f"ingest-{unique_name}")


@pytest.fixture
def ingest(kafka_bootstrap: str, topics: Topics) -> RunningIngest:
    """Runs the service as a task; leaving the block sets its stop Event and awaits it."""

    @contextlib.asynccontextmanager
    async def running(port: int | None = None) -> AsyncIterator[None]:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_ingest(make_config(), kafka_bootstrap, topics, port, stop))
        try:
            yield
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)

    return running


async def send_raw(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


def decode_events(records: list[Record]) -> dict[str, tuple[bytes | None, UsageRecorded]]:
    decoded = {}
    for r in records:
        event = UsageRecorded.model_validate_json(r.value or b"")
        decoded[event.event_id] = (r.key, event)
    return decoded


async def test_valid_events_flow_and_bad_ones_go_to_the_dlq(
    kafka_bootstrap: str, topics: Topics, ingest: RunningIngest
) -> None:
    values = [raw("ok"), b'{"event_id": "broken"', raw("neg", input_tokens=-3),
              raw("id", user_id="openai-user:Alice")]
    async with ingest():
        await send_raw(kafka_bootstrap, topics.usage_raw, values)
        events = decode_events(await read_topic(kafka_bootstrap, topics.usage_events, 2))
        dlq = await read_topic(kafka_bootstrap, topics.usage_dlq, 2)
    assert {k: key for k, (key, _) in events.items()} == {"ok": b"alice", "id": b"alice"}
    assert events["id"][1].department == "research"  # filled from users.yaml
    rejected = sorted((RejectedEvent.model_validate_json(r.value or b"") for r in dlq),
                      key=lambda r: r.original)
    assert rejected[0].original == '{"event_id": "broken"'
    assert rejected[0].reason.startswith("invalid JSON: ")
    assert rejected[1].reason == "input_tokens: Input should be greater than or equal to 0"
    for record in rejected:
        assert record.source.startswith(f"kafka:{topics.usage_raw}[")


async def test_the_pipeline_keeps_going_and_resumes_where_it_committed(
    kafka_bootstrap: str, topics: Topics, ingest: RunningIngest
) -> None:
    async with ingest():
        await send_raw(kafka_bootstrap, topics.usage_raw, [b"\xff", raw("a")])
        await read_topic(kafka_bootstrap, topics.usage_events, 1)
        await send_raw(kafka_bootstrap, topics.usage_raw, [raw("b", user_id="telegram:123456")])
        await read_topic(kafka_bootstrap, topics.usage_events, 2)
    async with ingest():  # a restart reads on from the committed offsets
        await send_raw(kafka_bootstrap, topics.usage_raw, [raw("c", user_id="bob")])
        events = await read_topic(kafka_bootstrap, topics.usage_events, 3)
        await asyncio.sleep(1.0)  # room for any (wrong) re-delivery to show up
        assert await count_records(kafka_bootstrap, topics.usage_events) == 3
    assert sorted(decode_events(events)) == ["a", "b", "c"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def wait_for_http(client: httpx.AsyncClient) -> None:
    for _ in range(100):
        with contextlib.suppress(httpx.TransportError):
            await client.get("/healthz")
            return
        await asyncio.sleep(0.05)


async def test_http_and_kafka_in_one_service(
    kafka_bootstrap: str, topics: Topics, ingest: RunningIngest
) -> None:
    port = free_port()
    async with ingest(port), httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        await wait_for_http(client)
        response = await client.post("/v1/usage", content=orjson.dumps(usage("h", user_id="bob")),
                                     headers={"x-api-key": "ak_bob_0123456789"})
        assert response.status_code == 202
        await send_raw(kafka_bootstrap, topics.usage_raw, [raw("k")])
        events = decode_events(await read_topic(kafka_bootstrap, topics.usage_events, 2))
    assert {k: key for k, (key, _) in events.items()} == {"h": b"bob", "k": b"alice"}


async def test_a_busy_port_fails_the_start(kafka_bootstrap: str, topics: Topics) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            await asyncio.wait_for(
                run_ingest(make_config(), kafka_bootstrap, topics, port, asyncio.Event()), 30)
