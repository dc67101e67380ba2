"""The AsyncAPI document of every topic and message (`schemas/asyncapi.json`).

Declared on a FastStream KafkaBroker that never connects: for each topic of the table
(tally.topics), who publishes it and who reads it, with the wire model of its messages
(tally.wire, and the enforcer's alert memory). FastStream renders the channels, the
operations and the messages' JSON Schemas from these declarations; `tally schemas write`
writes the file and `tally schemas check` (and tests/test_schemas.py) fails when it is
stale, like the JSON Schema files beside it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from faststream.kafka import KafkaBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel

from tally.instances import InstanceSeen
from tally.services.enforcer.memory import AlertsSent
from tally.topics import TABLE, TopicSpec
from tally.wire import BalanceUpdated, BudgetAlerted, BudgetDecided, RejectedEvent, UsageRecorded

__all__ = ["CHANNELS", "Channel", "render"]


@dataclass(frozen=True)
class Channel:
    """One topic as the document shows it: its message, who writes it, who reads it."""

    topic: str
    message: type[BaseModel]
    publishers: tuple[str, ...]
    subscribers: tuple[str, ...]
    note: str = ""  # what a reader must know besides


# The enforcer writes alerts in transactions (services/enforcer/fence.py).
TRANSACTIONAL = (" Written in Kafka transactions: read with isolation.level=read_committed, "
                 "or the alerts of aborted ones (a fenced-off instance's, some sent again) "
                 "are seen too.")


CHANNELS: tuple[Channel, ...] = (
    Channel("usage.raw", UsageRecorded, ("gateway (OpenClaw plugin)",), ("ingest",)),
    Channel("usage.events", UsageRecorded, ("ingest",), ("projector", "replay")),
    Channel("usage.dlq", RejectedEvent, ("ingest", "projector"), ("projector", "replay")),
    Channel("budget.balances", BalanceUpdated, ("projector",), ("enforcer",)),
    Channel("budget.decisions", BudgetDecided, ("enforcer",),
            ("enforcer (at start)", "gateway decision caches", "tally status")),
    Channel("budget.alerts", BudgetAlerted, ("enforcer",),
            ("notifier (webhook)", "enforcer (recent alerts, at start)"), TRANSACTIONAL),
    Channel("budget.alert_memory", AlertsSent, ("enforcer",), ("enforcer (at start)",),
            TRANSACTIONAL),
    Channel("tally.instances", InstanceSeen, ("projector",), ("tally status --instances",)),
)


def _describe(spec: TopicSpec, channel: Channel) -> str:
    return (f"{spec.purpose}. Key: {spec.key}; cleanup.policy={spec.cleanup_policy}. "
            f"Written by {', '.join(channel.publishers)}; read by "
            f"{', '.join(channel.subscribers)}.{channel.note}")


def _declare(broker: KafkaBroker, spec: TopicSpec, channel: Channel) -> None:
    description = _describe(spec, channel)
    model = channel.message
    for who in channel.publishers:
        broker.publisher(spec.base, title=f"{who} -> {spec.base}", description=description,
                         schema=model)
    for who in channel.subscribers:
        broker.subscriber(spec.base, title=f"{spec.base} -> {who}",
                          description=description)(_reader_of(model))


def _reader_of(model: type[BaseModel]) -> Callable[..., Awaitable[None]]:
    """A handler taking `model`: FastStream reads the message's schema off its signature."""

    async def handler(message: BaseModel) -> None:
        """Declared for the document only: this broker never runs."""

    handler.__annotations__ = {"message": model, "return": None}  # resolved, not a string
    return handler


def render() -> str:
    """The AsyncAPI 3.0 document, as stable JSON text."""
    broker = KafkaBroker("127.0.0.1:9092", description="Tally's Kafka cluster "
                         "(KAFKA_BOOTSTRAP_SERVERS; TALLY_TOPIC_NAMESPACE prefixes the names)")
    specs = {spec.base: spec for spec in TABLE}
    assert {c.topic for c in CHANNELS} == set(specs), "every topic of the table, once"
    for channel in CHANNELS:
        _declare(broker, specs[channel.topic], channel)
    document = AsyncAPI(broker, title="Tally", version="0.1.0", schema_version="3.0.0",
                        description="Per-user token budgets: every topic and message.")
    return json.dumps(document.to_specification().to_jsonable(), indent=2,
                      sort_keys=True) + "\n"
