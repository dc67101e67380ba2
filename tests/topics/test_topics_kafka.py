"""The topic table on a real broker: created as it says, a misconfigured topic refused at
start with the fixing command, `tally topics check` and `apply`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka.admin import NewTopic

from tally import topicadmin
from tally.config.loader import load_config
from tally.kafka import check_topics, ensure_topics, make_admin
from tally.services.projector.app import main as projector_main
from tally.services.projector.app import run_projector
from tally.topiccheck import TopicsMisconfigured
from tally.topics import Topics

pytestmark = pytest.mark.kafka

WEEK_MS = str(7 * 86_400_000)


async def create_events_with_a_week_of_retention(bootstrap: str, topics: Topics) -> None:
    admin = make_admin(bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topics.usage_events, 3, 1,
                                            topic_configs={"retention.ms": WEEK_MS})])
        while topics.usage_events not in await admin.list_topics():  # metadata propagates
            await asyncio.sleep(0.05)
    finally:
        await admin.close()


def config_dir(tmp_path: Path) -> Path:
    (tmp_path / "budgets.yaml").write_text(
        "per_user_budgets:\n  default_limits: {daily_tokens: 10, monthly_tokens: 100}\n")
    return tmp_path


async def test_topics_are_created_as_the_table_says(kafka_bootstrap: str,
                                                    unique_name: str) -> None:
    topics = Topics(f"table-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, 3)
    assert await check_topics(kafka_bootstrap, topics, 3) == []


async def test_finite_retention_on_usage_events_stops_the_projector_at_start(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    topics = Topics(f"badret-{unique_name}")
    await create_events_with_a_week_of_retention(kafka_bootstrap, topics)
    config = load_config(config_dir(tmp_path))
    with pytest.raises(TopicsMisconfigured) as refused:
        await run_projector(config, kafka_bootstrap, topics, tmp_path / "p.duckdb",
                            asyncio.Event())
    message = str(refused.value)
    assert f"{topics.usage_events}: retention.ms is 604800000 (7 days), wanted -1 (forever)" \
        in message
    assert (f"kafka-configs.sh --bootstrap-server {kafka_bootstrap} --alter --entity-type "
            f"topics --entity-name {topics.usage_events} --add-config retention.ms=-1"
            in message)
    assert "tally topics apply" in message
    assert not (tmp_path / "p.duckdb").exists()  # refused before anything was written


def test_the_projector_command_says_why_and_exits_1(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    topics = Topics(f"badcli-{unique_name}")
    asyncio.run(create_events_with_a_week_of_retention(kafka_bootstrap, topics))
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("TALLY_DATA_DIR", str(tmp_path))
    args = ["--config", str(config_dir(tmp_path)), "--namespace", topics.namespace,
            "--port", "0"]
    assert projector_main(args) == 1
    assert capsys.readouterr().err.startswith(
        "tally projector: Kafka topics differ from Tally's topic table")


def run_cli(action: str, bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("TALLY_TOPIC_NAMESPACE", topics.namespace)
    code = topicadmin.main([action])
    return code, capsys.readouterr().out


def test_check_names_the_difference_and_apply_fixes_it(
        kafka_bootstrap: str, unique_name: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    topics = Topics(f"apply-{unique_name}")
    asyncio.run(create_events_with_a_week_of_retention(kafka_bootstrap, topics))
    code, out = run_cli("check", kafka_bootstrap, topics, monkeypatch, capsys)
    assert code == 1
    assert f"[REFUSED] {topics.usage_events}: retention.ms is 604800000 (7 days)" in out
    assert f"[REFUSED] {topics.budget_decisions}: topic is missing" in out
    code, out = run_cli("apply", kafka_bootstrap, topics, monkeypatch, capsys)
    assert (code, out.splitlines()[0]) == (0, "applied the safe changes; 0 left")
    code, out = run_cli("check", kafka_bootstrap, topics, monkeypatch, capsys)
    assert (code, out.strip()) == (0, f"topics agree with the table ({kafka_bootstrap}, "
                                      f"namespace {topics.namespace})")
