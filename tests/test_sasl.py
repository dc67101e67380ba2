"""The pipeline through a SASL (SCRAM-SHA-256) listener, with credentials from the
environment as every service, the CLI and the decision cache take them; and the error a
wrong password gets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tally.config.loader import load_config
from tally.kafka import KafkaUnreachable
from tally.services.projector.app import run_projector
from tally.topics import Topics
from tally_dev import localkafka
from tests.secured import pipeline_round_trip, plugin_round_trip

pytestmark = pytest.mark.kafka


def sign_in(monkeypatch: pytest.MonkeyPatch, user: localkafka.SaslUser,
            password: str | None = None) -> None:
    monkeypatch.setenv("KAFKA_SECURITY_PROTOCOL", "SASL_PLAINTEXT")
    monkeypatch.setenv("KAFKA_SASL_MECHANISM", "SCRAM-SHA-256")
    monkeypatch.setenv("KAFKA_SASL_USERNAME", user.username)
    monkeypatch.setenv("KAFKA_SASL_PASSWORD", password or user.password)


async def test_the_pipeline_runs_through_a_sasl_listener(
        kafka_sasl: tuple[str, localkafka.SaslUser], unique_name: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap, user = kafka_sasl
    sign_in(monkeypatch, user)
    await pipeline_round_trip(bootstrap, Topics(f"sasl-{unique_name}"), tmp_path, monkeypatch)


def test_the_openclaw_plugin_signs_in_from_the_gateways_environment(
        kafka_sasl: tuple[str, localkafka.SaslUser], unique_name: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap, user = kafka_sasl
    sign_in(monkeypatch, user)
    plugin_round_trip(bootstrap, Topics(f"sasljs-{unique_name}"))


async def test_a_wrong_password_is_refused_with_the_brokers_reason(
        kafka_sasl: tuple[str, localkafka.SaslUser], unique_name: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    bootstrap, user = kafka_sasl
    sign_in(monkeypatch, user, password="not-the-password")
    (tmp_path / "budgets.yaml").write_text(
        "per_user_budgets:\n  default_limits: {daily_tokens: 10, monthly_tokens: 100}\n")
    with pytest.raises(KafkaUnreachable) as refused:
        await run_projector(load_config(tmp_path), bootstrap, Topics(f"bad-{unique_name}"),
                            tmp_path / "p.db", asyncio.Event())
    assert str(refused.value).startswith(
        f"cannot connect to Kafka at {bootstrap} over SASL_PLAINTEXT as 'tally': "
        "SaslAuthenticationFailed:")
    assert "invalid credentials with SASL mechanism SCRAM-SHA-256" in str(refused.value)
