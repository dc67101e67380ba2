"""The SASL and TLS settings in librdkafka's names (replay's reader; the SASL test replays
through a real SCRAM listener, the TLS names are checked here)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tally.kafka import ensure_topics
from tally.kafka_bulk import TopicReader, librdkafka_security
from tally.settings import KafkaSecurity
from tally.topics import Topics
from tests.test_pipeline import produce


def test_sasl_over_tls_with_a_client_certificate_maps_to_librdkafkas_names(
        tmp_path: Path) -> None:
    for name in ("ca.pem", "cert.pem", "key.pem"):
        (tmp_path / name).write_text("-")
    security = KafkaSecurity.from_env({
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "tally", "KAFKA_SASL_PASSWORD": "secret",
        "KAFKA_SSL_CA_FILE": str(tmp_path / "ca.pem"),
        "KAFKA_SSL_CERT_FILE": str(tmp_path / "cert.pem"),
        "KAFKA_SSL_KEY_FILE": str(tmp_path / "key.pem"), "KAFKA_SSL_KEY_PASSWORD": "k"})
    assert librdkafka_security(security) == {
        "security.protocol": "SASL_SSL", "sasl.mechanisms": "SCRAM-SHA-512",
        "sasl.username": "tally", "sasl.password": "secret",
        "ssl.ca.location": str(tmp_path / "ca.pem"),
        "ssl.certificate.location": str(tmp_path / "cert.pem"),
        "ssl.key.location": str(tmp_path / "key.pem"), "ssl.key.password": "k"}


def test_plaintext_sets_nothing_else() -> None:
    assert librdkafka_security(KafkaSecurity.from_env({})) == {
        "security.protocol": "PLAINTEXT"}


@pytest.mark.kafka
async def test_the_reader_stops_at_the_ends_taken_at_start(kafka_bootstrap: str,
                                                           unique_name: str) -> None:
    """Records written after the reader started are left to the live projector; the other
    topic's records come as Records; next_offsets is where each partition was read to."""
    topics = Topics(f"bulk-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, 1)
    await produce(kafka_bootstrap, topics.usage_events, [b"a", b"b", b"c"])
    await produce(kafka_bootstrap, topics.usage_dlq, [b"dead"])
    reader = await asyncio.to_thread(TopicReader, kafka_bootstrap,
                                     [topics.usage_events, topics.usage_dlq], topics.usage_events)
    try:
        await produce(kafka_bootstrap, topics.usage_events, [b"later"])
        assert reader.total == 4
        batches = []
        while (batch := await asyncio.to_thread(reader.next_batch, 2)) is not None:
            batches.append(batch)
    finally:
        reader.close()
    assert [v for b in batches for v in b.values] == [b"a", b"b", b"c"]
    assert [(r.topic, r.offset, r.value) for b in batches for r in b.others] == [
        (topics.usage_dlq, 0, b"dead")]
    read_to: dict[tuple[str, int], int] = {}
    for batch in batches:
        read_to |= batch.next_offsets
    assert read_to == {(topics.usage_events, 0): 3, (topics.usage_dlq, 0): 1}
