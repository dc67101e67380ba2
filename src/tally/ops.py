"""What an operator sees of every service: /metrics, /healthz and /readyz.

Each service run makes its own `Metrics` (its own Prometheus registry, so two services in
one test process never share a counter) and its own `Readiness`, feeds them from its loop,
and mounts `ops_routes` in its Starlette app.

- /healthz: 200 while the process serves HTTP at all (alive).
- /readyz: 503 until the service has caught up with its topics (every assigned partition
  read up to the end offset it had when the service looked), then 200 for good: a lag
  that builds up later is a /metrics matter, not a reason to pull the service out.
- /metrics: the Prometheus text format; no user ids in any label.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
)
from prometheus_client import generate_latest as _generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tally.kafka import CatchUp, Record

__all__ = ["Metrics", "Readiness", "observe_lag", "ops_routes", "watch"]

# Every counter would also get a `_created` timestamp series: twice the lines, and nothing
# here reads them. (A process-wide switch; only Tally's own registries live in it.)
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    """Every metric a Tally service may report; each service fills the ones it has."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.events_in = Counter("tally_events_in", "Records taken in, by source topic "
                                 "(or 'http' for POST /v1/usage)", ["source"], registry=r)
        self.events_rejected = Counter("tally_events_rejected", "Usage events sent to "
                                       "usage.dlq, by kind of reason", ["reason"], registry=r)
        self.consumer_lag = Gauge("tally_consumer_lag", "Records behind the partition's "
                                  "high watermark", ["topic", "partition"], registry=r)
        self.decisions = Gauge("tally_decisions", "Users by the status of their current "
                               "decision", ["status"], registry=r)
        self.decisions_published = Counter("tally_decisions_published", "Decisions published "
                                           "to budget.decisions, by status", ["status"],
                                           registry=r)
        self.alerts_published = Counter("tally_alerts_published", "Alerts published to "
                                        "budget.alerts, by kind", ["kind"], registry=r)
        self.alert_deliveries = Counter("tally_alert_deliveries", "Alerts handed to the "
                                        "webhook (delivered) or given up on (failed)",
                                        ["result"], registry=r)
        self.partitions_owned = Gauge("tally_partitions_owned", "1 for each partition "
                                      "this instance owns in its consumer group, 0 once "
                                      "given up", ["topic", "partition"], registry=r)
        self.partitions_following = Gauge("tally_partitions_following", "1 for each "
                                          "partition a projector standby follows without "
                                          "owning it (its lag: tally_consumer_lag)",
                                          ["topic", "partition"], registry=r)
        self.partitions_restoring = Gauge("tally_partitions_restoring", "1 for each owned "
                                          "partition being restored (the projector replays "
                                          "it, the enforcer hears what was said) before the "
                                          "instance acts on it", ["topic", "partition"],
                                          registry=r)
        self.alert_delivery_errors = Counter("tally_alert_delivery_errors", "Failed webhook "
                                             "attempts, retried or not, by reason", ["reason"],
                                             registry=r)

    def count_in(self, records: Iterable[Record]) -> None:
        by_topic: dict[str, int] = {}
        for record in records:
            by_topic[record.topic] = by_topic.get(record.topic, 0) + 1
        for topic, count in by_topic.items():
            self.events_in.labels(topic).inc(count)

    def exposition(self) -> bytes:
        return _generate_latest(self.registry)


async def observe_lag(metrics: Metrics,
                      consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
    """Set the lag of every assigned partition whose high watermark a fetch has seen; the
    lags set."""
    # A rebalance may revoke a partition while we look, or the broker be away: the loop
    # itself must not fail for a metric. Look again next time.
    lags: dict[TopicPartition, int] = {}
    with contextlib.suppress(KafkaError):
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lags[tp] = lag = max(highwater - await consumer.position(tp), 0)
                metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(lag)
    return lags


class Readiness:
    """Ready once the consumer has read every assigned partition up to its end offset.

    The end offsets are taken once per assignment (a consumer group may reassign), so a
    busy topic cannot keep a service from ever becoming ready. Once ready, ready for good.
    """

    def __init__(self, describe: Callable[[], dict[str, Any]] | None = None) -> None:
        self.ready = False
        self.detail = "starting"
        self._targets = CatchUp({})
        # What else /readyz says, e.g. a group member's partitions (projector/ownership.py).
        self.describe = describe or dict

    async def check(self, consumer: AIOKafkaConsumer) -> bool:
        if self.ready:
            return True
        assigned = consumer.assignment()
        if not assigned:
            self.detail = "waiting for partitions"
            return False
        try:
            if set(self._targets.ends) != assigned:
                self._targets = await CatchUp.taken(consumer, assigned)
            behind = await self._targets.behind(consumer)
        except KafkaError:  # a partition revoked meanwhile, or the broker away: next time
            return False
        self.ready = not behind
        self.detail = (f"catching up on {len(behind)} of {len(self._targets.ends)} partitions"
                       if behind else "caught up")
        return self.ready


async def watch(readers: Callable[[], Sequence[AIOKafkaConsumer]], metrics: Metrics,
                readiness: Readiness, every: float = 0.5) -> None:
    """Every `every` seconds until cancelled, beside a loop that does not (the projector's):
    the lag of every partition the `readers()` read (a partition none reads any more loses
    its lag line, not keeps a stale one), and readiness, judged by the first of them."""
    shown: set[tuple[str, str]] = set()
    while True:
        found = readers()
        for reader in found:
            shown |= {(tp.topic, str(tp.partition)) for tp in await observe_lag(metrics, reader)}
        read = {(tp.topic, str(tp.partition)) for reader in found for tp in reader.assignment()}
        for labels in shown - read:
            metrics.consumer_lag.remove(*labels)
        shown &= read
        if found:
            await readiness.check(found[0])
        await asyncio.sleep(every)


def ops_routes(metrics: Metrics, readiness: Readiness) -> list[Route]:
    """GET /metrics, /healthz and /readyz, to mount in a service's Starlette app."""

    async def serve_metrics(request: Request) -> Response:
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if readiness.ready:
            return JSONResponse({"status": "ready", **readiness.describe()})
        return JSONResponse({"status": "not ready", "detail": readiness.detail,
                             **readiness.describe()}, 503)

    return [Route("/metrics", serve_metrics, methods=["GET"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"])]
