"""The pipeline and the OpenClaw plugin through a TLS listener (`tally kafka start --tls`),
trusting the CA from the environment (KAFKA_SSL_CA_FILE); and the errors a client gets
for the wrong CA and for plaintext."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tally.config.loader import load_config
from tally.kafka import KafkaUnreachable
from tally.services.projector.app import run_projector
from tally.topics import Topics
from tally_dev.localtls import ensure_tls_files
from tests.secured import pipeline_round_trip, plugin_round_trip

pytestmark = pytest.mark.kafka


def trust(monkeypatch: pytest.MonkeyPatch, ca: Path, protocol: str = "SSL") -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", protocol)
    monkeypatch.setenv("KAFKA_SSL_CA_FILE", str(ca))


async def test_the_pipeline_runs_through_a_tls_listener(
        kafka_tls: tuple[str, Path], unique_name: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap, ca = kafka_tls
    trust(monkeypatch, ca)
    await pipeline_round_trip(bootstrap, Topics(f"tls-{unique_name}"), tmp_path, monkeypatch)


def test_the_openclaw_plugin_trusts_the_ca_from_the_gateways_environment(
        kafka_tls: tuple[str, Path], unique_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap, ca = kafka_tls
    trust(monkeypatch, ca)
    plugin_round_trip(bootstrap, Topics(f"tlsjs-{unique_name}"))


async def refusal(bootstrap: str, tmp_path: Path) -> str:
    (tmp_path / "budgets.yaml").write_text(
        "per_user_budgets:\n  default_limits: {daily_tokens: 10, monthly_tokens: 100}\n")
    with pytest.raises(KafkaUnreachable) as refused:
        await run_projector(load_config(tmp_path), bootstrap, Topics("tls-refused"),
                            tmp_path / "p.db", asyncio.Event())
    return str(refused.value)


async def test_a_certificate_from_another_ca_is_refused_by_name(
        kafka_tls: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap, _ = kafka_tls
    other = ensure_tls_files(tmp_path / "other-ca", "127.0.0.1")
    trust(monkeypatch, other.ca)
    said = await refusal(bootstrap, tmp_path)
    assert said.startswith(f"cannot connect to Kafka at {bootstrap} over SSL: "
                           "SSLCertVerificationError:"), said
    assert "certificate verify failed" in said


async def test_plaintext_against_a_tls_listener_is_refused(
        kafka_tls: tuple[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap, _ = kafka_tls
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    said = await refusal(bootstrap, tmp_path)
    assert said.startswith(f"cannot connect to Kafka at {bootstrap} over PLAINTEXT:"), said
