"""Alert delivery: alerts with `notify_admin` on budget.alerts -> the configured webhook.

The body is Slack-compatible, `{"text": "..."}`: a headline naming the user, then the
alert's message, which is the template from budgets.yaml as the user sees it.

No duplicates after a restart: the notifier reads budget.alerts in a consumer group of
its own and commits an alert's offset right after handling it, so a restart resumes after
the last alert handled. The one gap is a crash between the webhook's 2xx and that commit:
that alert is delivered again (a webhook takes no idempotency key). Within a run, an
alert_id seen twice is delivered once.

Retries: a connection error, a timeout, 429 or 5xx is retried up to `max_attempts` times,
waiting `backoff_seconds`, doubling, at most 60 s (a longer Retry-After of a 429 is
honoured up to 60 s). Any other 4xx is not retried: the request itself is refused. Every
failed attempt counts in tally_alert_delivery_errors_total{reason}; an alert given up on
counts in tally_alert_deliveries_total{result="failed"}, is logged, and the notifier moves
on, so one undeliverable alert cannot hold back the others.

While budgets.yaml names no webhook the notifier waits without consuming: alerts stay on
the topic, and those still there are delivered once a webhook is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer
from faststream import AckPolicy
from faststream.kafka import KafkaBroker, KafkaMessage

from tally.config.models import AlertWebhook
from tally.kafka import Record, faststream_security
from tally.ops import Metrics, observe_lag
from tally.service import decimal
from tally.topics import Topics
from tally.wire import BudgetAlerted

__all__ = ["MAX_BACKOFF", "Notifier", "alert_broker", "backoff", "group_id", "run_notifier",
           "slack_text", "watch_lag"]

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0
Sleep = Callable[[float], Awaitable[bool]]  # waits; True when the service is stopping


def group_id(topics: Topics) -> str:
    return f"tally-notifier:{topics.budget_alerts}"


def slack_text(alert: BudgetAlerted) -> str:
    used = f"{alert.tokens_used:,}/{alert.tokens_limit:,} tokens, {alert.percent_used}%"
    budget = "" if alert.budget == "user" else f" ({alert.budget} budget)"
    headline = {
        "limit": f"{alert.user_id} is over the {alert.period} limit{budget}: {used}",
        "warning": f"{alert.user_id} reached {alert.threshold}% of the {alert.period} "
                   f"budget{budget}: {used}",
        "reset": f"{alert.user_id}'s {alert.period} budget{budget} has reset",
    }[alert.kind]
    return f"*Tally*: {headline}\n{alert.message.strip()}"


def backoff(webhook: AlertWebhook, attempt: int, retry_after: float | None = None) -> float:
    """The wait after failed attempt number `attempt` (1-based)."""
    delay: float = min(webhook.backoff_seconds * 2.0 ** (attempt - 1), MAX_BACKOFF)
    return max(delay, min(retry_after, MAX_BACKOFF)) if retry_after else delay


@dataclass(frozen=True)
class Attempt:
    error: str | None  # None: delivered
    retry: bool = False
    retry_after: float | None = None


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    seconds = decimal(value)
    return None if seconds is None else float(seconds)


class Notifier:
    """Delivers one alert at a time, with retries; `sleep` is the seam tests replace."""

    def __init__(self, client: httpx.AsyncClient, metrics: Metrics, sleep: Sleep) -> None:
        self.client, self.metrics, self.sleep = client, metrics, sleep
        self.delivered: set[str] = set()

    async def deliver(self, webhook: AlertWebhook, alert: BudgetAlerted) -> bool | None:
        """True delivered (or already), False given up on, None stopped before either."""
        if alert.alert_id in self.delivered:
            return True
        for attempt in range(1, webhook.max_attempts + 1):
            result = await self._attempt(webhook, alert)
            if result.error is None:
                self.delivered.add(alert.alert_id)
                self.metrics.alert_deliveries.labels("delivered").inc()
                return True
            self.metrics.alert_delivery_errors.labels(result.error).inc()
            if not result.retry or attempt == webhook.max_attempts:
                break
            if await self.sleep(backoff(webhook, attempt, result.retry_after)):
                return None
        self.metrics.alert_deliveries.labels("failed").inc()
        log.error("giving up on alert %s after %d attempt(s)", alert.alert_id, attempt)
        return False

    async def _attempt(self, webhook: AlertWebhook, alert: BudgetAlerted) -> Attempt:
        try:
            response = await self.client.post(webhook.url, json={"text": slack_text(alert)},
                                              timeout=webhook.timeout_seconds)
        except httpx.TimeoutException:
            return Attempt("timeout", retry=True)
        except httpx.TransportError:
            return Attempt("connection", retry=True)
        if response.is_success:
            return Attempt(None)
        code = response.status_code
        return Attempt(f"http_{code}", code == 429 or code >= 500, _retry_after(response))


def stop_aware_sleep(stop: asyncio.Event) -> Sleep:
    async def sleep(seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        return stop.is_set()

    return sleep


async def run_notifier(bootstrap: str, topics: Topics, webhook: Callable[[], AlertWebhook | None],
                       stop: asyncio.Event, metrics: Metrics, *, poll_seconds: float = 1.0,
                       sleep: Sleep | None = None) -> None:
    """Deliver alerts until `stop`; `webhook` is read per alert, so a reload applies.

    The one consumer on FastStream's KafkaBroker: one alert at a time in a consumer group,
    committed by hand once handled (AckPolicy.MANUAL: `ack` commits the position after
    it; `nack` on a stop seeks back, so the alert waits for the next run). It fits: no
    batches, no stored offsets, no end offsets to catch up to. The other consumers keep
    aiokafka (see tally.kafka's docstring for why, with the measurement)."""
    sleep = sleep or stop_aware_sleep(stop)
    while webhook() is None:  # no consumer group at all until there is somewhere to deliver
        if await sleep(poll_seconds):
            return
    async with httpx.AsyncClient() as client:
        broker = alert_broker(bootstrap, topics, Notifier(client, metrics, sleep), webhook)
        async with broker:
            await broker.start()
            watching = asyncio.ensure_future(watch_lag(broker, metrics))
            try:
                await stop.wait()
            finally:
                watching.cancel()


async def watch_lag(broker: KafkaBroker, metrics: Metrics, every: float = 0.5) -> None:
    """tally_consumer_lag of budget.alerts, from the aiokafka consumer FastStream runs
    under the subscriber (looked up each time: FastStream makes a new one on a restart)."""
    while True:
        for subscriber in broker.subscribers:
            consumer = getattr(subscriber, "consumer", None)
            if isinstance(consumer, AIOKafkaConsumer):
                await observe_lag(metrics, consumer)
        await asyncio.sleep(every)


def alert_broker(bootstrap: str, topics: Topics, notifier: Notifier,
                 webhook: Callable[[], AlertWebhook | None]) -> KafkaBroker:
    """The notifier's FastStream broker, not started: one subscriber on budget.alerts that
    delivers each alert (tests run it in memory with TestKafkaBroker, and on Kafka)."""
    # Its line per message at DEBUG; a handler's error at ERROR, in the service's log.
    broker = KafkaBroker(bootstrap, security=faststream_security(), logger=log,
                         log_level=logging.DEBUG, graceful_timeout=None)

    async def on_alert(message: KafkaMessage) -> None:
        record = _record(message.raw_message)
        notifier.metrics.count_in([record])
        if await _handle(record, notifier, webhook):
            await message.ack()
        else:
            await message.nack()  # stopping: this alert stays uncommitted, for the next run

    broker.subscriber(topics.budget_alerts, group_id=group_id(topics),
                      auto_offset_reset="earliest", ack_policy=AckPolicy.MANUAL,
                      isolation_level="read_committed")(on_alert)
    return broker


def _record(message: Any) -> Record:
    """An aiokafka ConsumerRecord as the services' Record."""
    return Record(message.topic, message.partition, message.offset, message.key,
                  message.value, message.timestamp)


async def _handle(record: Record, notifier: Notifier,
                  webhook: Callable[[], AlertWebhook | None]) -> bool:
    """False when stopped before the alert was handled."""
    try:
        alert = BudgetAlerted.model_validate_json(record.value or b"")
    except ValueError as error:
        log.warning("skipping an undecodable alert at %s[%d]@%d: %s",
                    record.topic, record.partition, record.offset, error)
        return True
    if not alert.notify_admin:
        return True
    while (target := webhook()) is None:  # removed by a reload: wait for one again
        if await notifier.sleep(1.0):
            return False
    return await notifier.deliver(target, alert) is not None
