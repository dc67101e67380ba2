"""POST /v1/usage through the real Starlette app.

Most tests inject an in-memory Publisher (the app's one I/O seam); the last one publishes
through a real idempotent producer to the session's Kafka broker.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from typing import Any

import httpx
import jwt
import orjson
import pytest

from tally.config.models import Config
from tally.kafka import ensure_topics, make_producer
from tally.ops import Metrics, Readiness
from tally.services.ingest.app import KafkaPublisher
from tally.services.ingest.http import MAX_BODY_BYTES, SOURCE, create_app
from tally.topics import Topics
from tally.wire import RejectedEvent, UsageRecorded

from .helpers import make_config, read_topic, usage

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
ALICE = {"x-api-key": "ak_alice_0123456789"}
GATEWAY = {"authorization": "Bearer ak_gateway_0123456789"}


class MemoryPublisher:
    def __init__(self, fail: bool = False) -> None:
        self.events: list[UsageRecorded] = []
        self.rejected: list[RejectedEvent] = []
        self.fail = fail

    async def publish(
        self, accepted: Sequence[UsageRecorded], rejected: Sequence[RejectedEvent]
    ) -> None:
        if self.fail:
            raise ConnectionError("broker unreachable")
        self.events += accepted
        self.rejected += rejected


async def post(config: Config, publisher: Any, body: object, headers: dict[str, str],
               raw: bytes | None = None) -> httpx.Response:
    app = create_app(config, publisher)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
        content = orjson.dumps(body) if raw is None else raw
        return await client.post("/v1/usage", content=content, headers=headers)


async def test_a_user_reports_their_own_usage() -> None:
    publisher = MemoryPublisher()
    response = await post(make_config(), publisher, usage(), ALICE)
    assert response.status_code == 202
    assert response.json() == {"accepted": 1, "rejected": 0, "results": [
        {"index": 0, "status": "accepted", "event_id": "e-1", "user_id": "alice"}]}
    [event] = publisher.events
    assert (event.user_id, event.role, event.department) == ("alice", "engineer", "research")


async def test_user_id_defaults_to_the_caller_and_identities_resolve() -> None:
    publisher = MemoryPublisher()
    body = [{k: v for k, v in usage("a").items() if k != "user_id"},
            usage("b", user_id="telegram:123456")]
    response = await post(make_config(), publisher, body, ALICE)
    assert response.status_code == 202
    assert [e.user_id for e in publisher.events] == ["alice", "alice"]


async def test_a_gateway_reports_for_the_users_it_names() -> None:
    publisher = MemoryPublisher()
    body = [usage("a", user_id="openai-user:Alice"), usage("b", user_id="bob"),
            usage("c", user_id="discord:77")]
    response = await post(make_config(), publisher, body, GATEWAY)
    assert response.status_code == 202
    assert [e.user_id for e in publisher.events] == ["alice", "bob", "discord:77"]


async def test_reporting_for_another_user_is_forbidden_and_nothing_recorded() -> None:
    publisher = MemoryPublisher()
    body = [usage("a"), usage("b", user_id="bob")]
    response = await post(make_config(), publisher, body, ALICE)
    assert response.status_code == 403
    assert response.json() == {"error": "you may only report your own usage",
                               "details": ["not allowed to report for 'bob'"]}
    assert publisher.events == [] and publisher.rejected == []


async def test_an_invalid_event_is_400_naming_the_fields_and_goes_to_the_dlq() -> None:
    publisher = MemoryPublisher()
    raw = orjson.dumps(usage(input_tokens=-1, model=""))
    response = await post(make_config(), publisher, None, ALICE, raw=raw)
    assert response.status_code == 400
    [detail] = response.json()["details"]
    assert detail["index"] == 0
    assert detail["reason"].startswith("model: String should have at least 1 character")
    assert "input_tokens: Input should be greater than or equal to 0" in detail["reason"]
    [dlq] = publisher.rejected
    assert (dlq.original.encode(), dlq.source) == (raw, SOURCE)


async def test_malformed_json_is_400_and_goes_to_the_dlq() -> None:
    publisher = MemoryPublisher()
    response = await post(make_config(), publisher, None, ALICE, raw=b'{"event_id": ')
    assert response.status_code == 400
    assert response.json()["details"][0].startswith("invalid JSON: ")
    assert publisher.rejected[0].original == '{"event_id": '


async def test_a_mixed_batch_accepts_the_good_events() -> None:
    publisher = MemoryPublisher()
    body = [usage("a"), usage("b", output_tokens="lots"), usage("c")]
    response = await post(make_config(), publisher, body, ALICE)
    assert response.status_code == 202
    payload = response.json()
    assert (payload["accepted"], payload["rejected"]) == (2, 1)
    assert payload["results"][1] == {"index": 1, "status": "rejected",
                                     "reason": "output_tokens: Input should be a valid integer"}
    assert [e.event_id for e in publisher.events] == ["a", "c"]
    assert orjson.loads(publisher.rejected[0].original)["event_id"] == "b"


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ({}, "missing credentials: send X-API-Key or Authorization"),
        ({"x-api-key": "ak_nobody"}, "unknown API key"),
        ({"authorization": "Basic eDp5"}, "Authorization must be 'Bearer <token or API key>'"),
    ],
)
async def test_unauthenticated_posts_are_401(headers: dict[str, str], reason: str) -> None:
    publisher = MemoryPublisher()
    response = await post(make_config(), publisher, usage(), headers)
    assert response.status_code == 401
    assert response.json() == {"error": reason, "details": []}
    assert publisher.events == [] and publisher.rejected == []


async def test_jwt_callers() -> None:
    config = make_config(method="jwt", secret=SECRET)
    good = jwt.encode({"sub": "bob", "exp": int(time.time()) + 60}, SECRET, "HS256")
    expired = jwt.encode({"sub": "bob", "exp": int(time.time()) - 5}, SECRET, "HS256")
    publisher = MemoryPublisher()
    ok = await post(config, publisher, usage(user_id="bob"), {"authorization": f"Bearer {good}"})
    assert ok.status_code == 202
    late = await post(config, publisher, usage(), {"authorization": f"Bearer {expired}"})
    assert (late.status_code, late.json()["error"]) == (401, "invalid token: Signature has expired")


@pytest.mark.parametrize("auth", [{"enabled": False}, {"require_auth": False}])
async def test_without_required_auth_the_event_names_its_user(auth: dict[str, bool]) -> None:
    publisher = MemoryPublisher()
    response = await post(make_config(**auth), publisher, usage(user_id="openai-user:ALICE"), {})
    assert response.status_code == 202
    assert publisher.events[0].user_id == "alice"


async def test_a_body_over_one_mib_is_413() -> None:
    publisher = MemoryPublisher()
    big = orjson.dumps([usage(str(i)) for i in range(MAX_BODY_BYTES // 100)])
    assert len(big) > MAX_BODY_BYTES
    response = await post(make_config(), publisher, None, ALICE, raw=big)
    assert response.status_code == 413
    assert publisher.events == []


async def test_a_chunked_body_is_cut_off_at_one_mib() -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length to trust
        for _ in range(20):
            yield b" " * 64 * 1024

    app = create_app(make_config(), MemoryPublisher())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
        response = await client.post("/v1/usage", content=chunks(), headers=ALICE)
    assert response.status_code == 413


async def test_kafka_failure_is_a_retryable_503() -> None:
    response = await post(make_config(), MemoryPublisher(fail=True), usage(), ALICE)
    assert response.status_code == 503


async def test_health_readiness_and_metrics() -> None:
    metrics, readiness = Metrics(), Readiness()
    app = create_app(make_config(), MemoryPublisher(), metrics=metrics, readiness=readiness)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://ingest") as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 503  # usage.raw not read yet
        readiness.ready = True
        assert (await client.get("/readyz")).status_code == 200
        await client.post("/v1/usage", content=orjson.dumps(
            [usage("a"), usage("b", input_tokens=-1)]), headers=ALICE)
        text = (await client.get("/metrics")).text.splitlines()
    assert 'tally_events_in_total{source="http"} 2.0' in text
    assert 'tally_events_rejected_total{reason="invalid_fields"} 1.0' in text


@pytest.fixture
async def kafka_publisher(kafka_bootstrap: str, unique_name: str
                          ) -> AsyncIterator[tuple[KafkaPublisher, Topics]]:
    topics = Topics(namespace=f"http-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, partitions=3)
    producer = make_producer(kafka_bootstrap)
    await producer.start()
    try:
        yield KafkaPublisher(producer, topics), topics
    finally:
        await producer.stop()


@pytest.mark.kafka
async def test_through_the_real_broker(
    kafka_bootstrap: str, kafka_publisher: tuple[KafkaPublisher, Topics]
) -> None:
    publisher, topics = kafka_publisher
    body = [usage("k1", user_id="openai-user:alice"), usage("k2", user_id="bob"),
            usage("k3", input_tokens=-1)]
    response = await post(make_config(), publisher, body, GATEWAY)
    assert response.status_code == 202
    events = await read_topic(kafka_bootstrap, topics.usage_events, 2)
    by_id = {UsageRecorded.model_validate_json(r.value or b"").event_id: r for r in events}
    assert {k: r.key for k, r in by_id.items()} == {"k1": b"alice", "k2": b"bob"}
    [dlq] = await read_topic(kafka_bootstrap, topics.usage_dlq, 1)
    rejected = RejectedEvent.model_validate_json(dlq.value or b"")
    assert rejected.reason == "input_tokens: Input should be greater than or equal to 0"
    assert rejected.rejected_at <= datetime.now(UTC)
