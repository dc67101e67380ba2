"""Alert delivery to a webhook: a local HTTP receiver on 127.0.0.1 stands in for Slack.

Retries with backoff, no retry of a refused request, failures counted in /metrics, and,
on a real broker, no duplicate delivery after a restart. The notifier's FastStream handler
runs one test body twice: in memory (TestKafkaBroker) and on the real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import yaml
from faststream.kafka import KafkaBroker, TestKafkaBroker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tally.config.errors import ConfigError
from tally.config.loader import load_config
from tally.config.models import AlertWebhook
from tally.kafka import ensure_topics, make_producer
from tally.ops import Metrics
from tally.service import serving
from tally.services.enforcer.notifier import (
    Notifier,
    alert_broker,
    backoff,
    run_notifier,
    slack_text,
)
from tally.topics import Topics
from tally.wire import AlertKind, BudgetAlerted

from .kit import free_port

AT = datetime(2026, 5, 10, 12, tzinfo=UTC)


class Receiver:
    """Answers POSTs with the scripted statuses (then 200) and keeps every body; a 429
    carries `Retry-After: retry_after` when given."""

    def __init__(self, *statuses: int, retry_after: str | None = None) -> None:
        self.statuses, self.retry_after = list(statuses), retry_after
        self.texts: list[str] = []

    async def receive(self, request: Request) -> Response:
        self.texts.append(orjson.loads(await request.body())["text"])
        status = self.statuses.pop(0) if self.statuses else 200
        headers = {"retry-after": self.retry_after} if status == 429 and self.retry_after else {}
        return Response("ok" if status < 400 else "no", status, headers=headers)


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[str]:
    port = free_port()
    app = Starlette(routes=[Route("/hook", receiver.receive, methods=["POST"])])
    async with serving(app, port):
        yield f"http://127.0.0.1:{port}/hook"


def alert(user: str = "bob", kind: AlertKind = "limit", notify: bool = True,
          n: int = 0) -> BudgetAlerted:
    return BudgetAlerted(alert_id=f"{user}|daily|{AT.isoformat()}|{kind}|{n}", user_id=user,
                         kind=kind, period="daily", period_start=AT, threshold=100,
                         percent_used=104, tokens_used=26000, tokens_limit=25000,
                         message="You've reached your daily token limit.\nYour budget "
                                 "resets at 2026-05-11T00:00:00+00:00.\n",
                         notify_admin=notify, as_of=AT)


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> bool:
        self.waits.append(seconds)
        return False


async def deliver(receiver: Receiver, **webhook: Any) -> tuple[bool | None, Metrics, Sleeps]:
    metrics, sleeps = Metrics(), Sleeps()
    async with receiving(receiver) as url, httpx.AsyncClient() as client:
        target = AlertWebhook(url=webhook.pop("url", url), **webhook)
        result = await Notifier(client, metrics, sleeps).deliver(target, alert())
    return result, metrics, sleeps


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_slack_body_names_the_user_and_carries_the_rendered_message() -> None:
    receiver = Receiver()
    delivered, metrics, sleeps = await deliver(receiver)
    assert delivered and sleeps.waits == []
    assert receiver.texts == [
        "*Tally*: bob is over the daily limit: 26,000/25,000 tokens, 104%\n"
        "You've reached your daily token limit.\n"
        "Your budget resets at 2026-05-11T00:00:00+00:00."]
    assert sample(metrics, "tally_alert_deliveries_total", result="delivered") == 1


async def test_5xx_and_429_are_retried_with_doubling_backoff_and_counted() -> None:
    receiver = Receiver(500, 503, 429, retry_after="3")
    delivered, metrics, sleeps = await deliver(receiver, backoff_seconds=0.5)
    assert delivered and len(receiver.texts) == 4
    assert sleeps.waits == [0.5, 1.0, 3.0]  # 2.0 after the 429, but it asked for 3 s
    assert sample(metrics, "tally_alert_delivery_errors_total", reason="http_500") == 1
    assert sample(metrics, "tally_alert_delivery_errors_total", reason="http_429") == 1


async def test_after_max_attempts_the_alert_is_given_up_and_counted_as_failed() -> None:
    receiver = Receiver(*[502] * 10)
    delivered, metrics, sleeps = await deliver(receiver, max_attempts=3)
    assert delivered is False and len(receiver.texts) == 3 and len(sleeps.waits) == 2
    assert sample(metrics, "tally_alert_deliveries_total", result="failed") == 1
    assert sample(metrics, "tally_alert_delivery_errors_total", reason="http_502") == 3


async def test_a_refused_request_is_not_retried() -> None:
    delivered, metrics, sleeps = await deliver(Receiver(400))
    assert delivered is False and sleeps.waits == []
    assert sample(metrics, "tally_alert_deliveries_total", result="failed") == 1


async def test_nobody_listening_counts_connection_errors() -> None:
    delivered, metrics, _ = await deliver(Receiver(), url=f"http://127.0.0.1:{free_port()}/x",
                                          max_attempts=2)
    assert delivered is False
    assert sample(metrics, "tally_alert_delivery_errors_total", reason="connection") == 2


def test_backoff_doubles_up_to_a_minute() -> None:
    webhook = AlertWebhook(url="http://127.0.0.1/x", backoff_seconds=1)
    assert [backoff(webhook, n) for n in (1, 2, 3, 7, 8)] == [1, 2, 4, 60, 60]


def test_headlines_for_warnings_resets_and_shared_budgets() -> None:
    warning = alert(kind="warning").model_copy(update={"threshold": 75})
    assert slack_text(warning).startswith("*Tally*: bob reached 75% of the daily budget:")
    reset = alert(kind="reset").model_copy(update={"budget": "department:research"})
    assert slack_text(reset).startswith("*Tally*: bob's daily budget (department:research "
                                        "budget) has reset\n")


def test_the_webhook_is_checked_at_startup(tmp_path: Path) -> None:
    budgets = {"per_user_budgets": {"default_limits": {"daily_tokens": 1, "monthly_tokens": 1},
                                    "alert_webhook": {"url": "ftp://x", "max_attempts": 0}}}
    (tmp_path / "budgets.yaml").write_text(yaml.safe_dump(budgets))
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value).splitlines() == [
        "budgets.yaml: per_user_budgets.alert_webhook.url: must be an http:// or https:// "
        "URL, got 'ftp://x'",
        "budgets.yaml: per_user_budgets.alert_webhook.max_attempts: must be at least 1, got 0"]


@pytest.mark.kafka
async def test_no_duplicate_delivery_after_a_restart(kafka_bootstrap: str,
                                                     unique_name: str) -> None:
    topics = Topics(f"notify-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, 3)
    receiver = Receiver(500)  # the first attempt fails: retried, delivered once
    async with receiving(receiver) as url:
        webhook = AlertWebhook(url=url, backoff_seconds=0.01)
        await publish(kafka_bootstrap, topics, [alert("bob", n=1), alert("amy", notify=False),
                                                alert("dave", n=2)])
        metrics = await notify_until(kafka_bootstrap, topics, webhook, receiver, 3)
        await publish(kafka_bootstrap, topics, [alert("erin", n=3)])
        await notify_until(kafka_bootstrap, topics, webhook, receiver, 4)
    posted = sorted(text.split(" ")[1] for text in receiver.texts)
    # One of the first two was refused once and retried; amy's alert is not for the admin.
    assert posted in (["bob", "bob", "dave", "erin"], ["bob", "dave", "dave", "erin"])
    assert sample(metrics, "tally_alert_delivery_errors_total", reason="http_500") == 1
    assert sample(metrics, "tally_events_in_total", source=topics.budget_alerts) == 3
    # The lag of budget.alerts is seen through FastStream's consumer: none left behind.
    lags = {partition: metrics.registry.get_sample_value(
                "tally_consumer_lag", {"topic": topics.budget_alerts, "partition": partition})
            for partition in "012"}
    assert lags == {"0": 0.0, "1": 0.0, "2": 0.0}


async def publish(bootstrap: str, topics: Topics, alerts: list[BudgetAlerted]) -> None:
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        for item in alerts:
            await producer.send_and_wait(topics.budget_alerts, item.model_dump_json().encode(),
                                         key=item.user_id.encode())
    finally:
        await producer.stop()


async def notify_until(bootstrap: str, topics: Topics, webhook: AlertWebhook,
                       receiver: Receiver, posts: int) -> Metrics:
    """Run a notifier until the receiver has `posts` requests, then a moment more."""
    stop, metrics = asyncio.Event(), Metrics()
    task = asyncio.create_task(run_notifier(bootstrap, topics, lambda: webhook, stop, metrics))
    async with asyncio.timeout(60):
        while len(receiver.texts) < posts:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # a duplicate would arrive now
    stop.set()
    await asyncio.wait_for(task, 30)
    assert len(receiver.texts) == posts
    return metrics


@contextlib.asynccontextmanager
async def in_memory(broker: KafkaBroker, bootstrap: str | None) -> AsyncIterator[KafkaBroker]:
    async with TestKafkaBroker(broker) as running:
        yield running


@contextlib.asynccontextmanager
async def on_kafka(broker: KafkaBroker, bootstrap: str | None) -> AsyncIterator[KafkaBroker]:
    assert bootstrap is not None
    async with broker:
        await broker.start()
        yield broker


@pytest.mark.parametrize("run_broker", [
    pytest.param(in_memory, id="TestKafkaBroker"),
    pytest.param(on_kafka, id="kafka", marks=pytest.mark.kafka),
])
async def test_the_notifier_handler_delivers_each_alert_for_the_admin_once(
        run_broker: Any, request: pytest.FixtureRequest, unique_name: str) -> None:
    """The same body in memory (FastStream's TestKafkaBroker: the handler alone, fast)
    and on the real broker (consumer group, acks)."""
    bootstrap = (request.getfixturevalue("kafka_bootstrap")
                 if run_broker is on_kafka else "127.0.0.1:1")
    topics = Topics(f"notify-fs-{unique_name}")
    if run_broker is on_kafka:
        await ensure_topics(bootstrap, topics, 3)
    receiver, metrics = Receiver(), Metrics()
    async with receiving(receiver) as url, httpx.AsyncClient() as client:
        webhook = AlertWebhook(url=url, backoff_seconds=0.01)
        broker = alert_broker(bootstrap, topics, Notifier(client, metrics, Sleeps()),
                              lambda: webhook)
        async with run_broker(broker, bootstrap) as running:
            for item in [alert("bob", n=1), alert("amy", notify=False), alert("bob", n=1),
                         alert("dave", n=2)]:
                await running.publish(item.model_dump_json().encode(), topics.budget_alerts,
                                      key=item.user_id.encode())
            async with asyncio.timeout(60):  # the records are in three partitions
                while len(receiver.texts) < 2 or sample(
                        metrics, "tally_events_in_total", source=topics.budget_alerts) < 4:
                    await asyncio.sleep(0.05)
    # amy's alert is not for the admin; bob's, seen twice, is delivered once.
    assert sorted(text.split(" ")[1] for text in receiver.texts) == ["bob", "dave"]
    assert sample(metrics, "tally_events_in_total", source=topics.budget_alerts) == 4
