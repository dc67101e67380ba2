"""The enforcer shell: budget.balances in; budget.decisions and budget.alerts out.

On start it reads what earlier runs published (decisions, alert memory), then consumes the
compacted budget.balances from the beginning and follows it. A clock tick ends periods
without new usage, and a changed budgets.yaml is reloaded (a bad one is refused and the
old policy stays). In the same event loop it serves the budgets API and the dashboard
(api.py; ready on /readyz once caught up with budget.balances) and delivers alerts to the
configured webhook (notifier.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import BaseModel

from tally.cli import command_main
from tally.config.loader import ConfigWatcher, load_config
from tally.config.models import AlertWebhook, Config
from tally.kafka import (
    Record,
    ensure_topics,
    fetch,
    make_consumer,
    make_producer,
    partitions_of,
    read_to_end,
)
from tally.ops import Metrics, Readiness, observe_lag
from tally.service import (
    Part,
    bind,
    error_text,
    http_part,
    run_parts,
    run_service,
    started,
    watches_stop,
)
from tally.services.enforcer.api import create_app
from tally.services.enforcer.board import MAX_ALERTS, Board
from tally.services.enforcer.memory import AlertsSent
from tally.services.enforcer.notifier import run_notifier
from tally.services.enforcer.state import Enforcer, Outcome
from tally.settings import Settings
from tally.topics import Topics
from tally.wire import BalanceUpdated, BudgetAlerted, BudgetDecided, bounded_text

W = TypeVar("W", bound=BaseModel)

__all__ = ["main", "run_enforcer"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


async def restore(board: Board, bootstrap: str, topics: Topics) -> None:
    """What earlier runs said: each user's decision and the alerts sent in the current
    periods (compacted topics: one record per key), and the recent alerts for the board.
    Only the tail of budget.alerts is read, so its retention and length do not matter.
    A record that is none of these is logged and skipped."""
    decisions = decode_all(BudgetDecided,
                           await read_to_end(bootstrap, topics.budget_decisions))
    memory = decode_all(AlertsSent, await read_to_end(bootstrap, topics.budget_alert_memory))
    recent = decode_all(BudgetAlerted,
                        await read_to_end(bootstrap, topics.budget_alerts, last=MAX_ALERTS))
    board.enforcer.restore(decisions, memory, recent)
    board.restore_alerts(recent)
    log.info("restored %d decisions, %d alert memory records, %d recent alerts",
             len(decisions), len(memory), len(recent))


def decode_all(model: type[W], records: Iterable[Record]) -> list[W]:
    """Every record that is a valid `model`; the others are logged and skipped (a
    tombstone, value None, is skipped quietly)."""
    found = []
    for record in records:
        if record.value is None:
            continue
        try:
            found.append(model.model_validate_json(record.value))
        except ValueError as error:
            log.warning("skipping an undecodable %s at %s: %s", model.__name__, record.source,
                        bounded_text(str(error), 500))
    return found


def decode_balances(records: Iterable[Record]) -> list[BalanceUpdated]:
    return decode_all(BalanceUpdated, records)


async def publish(producer: AIOKafkaProducer, topics: Topics, outcome: Outcome) -> None:
    """Decisions and alerts, then (once they are acknowledged) the alert memory: a crash
    between the two can leave an alert unremembered (restore finds it in budget.alerts),
    never remembered but unsent."""
    await _sent(await queue(producer, topics, outcome))
    await _sent([await producer.send(topics.budget_alert_memory, m.model_dump_json().encode(),
                                     key=m.key.encode()) for m in outcome.memory])
    for alert in outcome.alerts:
        log.info("alert %s: %s", alert.alert_id, alert.message.strip())


async def queue(producer: AIOKafkaProducer, topics: Topics,
                outcome: Outcome) -> list[asyncio.Future[Any]]:
    """The outcome's decisions and alerts handed to the producer; the futures settle when
    the broker acknowledges them."""
    return ([await producer.send(topics.budget_decisions, d.model_dump_json().encode(),
                                 key=d.user_id.encode()) for d in outcome.decisions]
            + [await producer.send(topics.budget_alerts, a.model_dump_json().encode(),
                                   key=a.user_id.encode()) for a in outcome.alerts])


async def _sent(sends: list[asyncio.Future[Any]]) -> None:
    await asyncio.gather(*sends)


async def run_enforcer(
    config_dir: Path,
    bootstrap: str,
    topics: Topics,
    stop: asyncio.Event,
    *,
    clock: Clock = utc_now,
    tick_seconds: float = 1.0,
    partitions: int = 3,
    port: int | None = None,
    host: str = "127.0.0.1",
    metrics: Metrics | None = None,
    projector_url: str | None = None,
    config: Config | None = None,
) -> None:
    """Run until `stop` is set. `clock` is injectable so tests can cross a reset; with a
    `port`, serve the API and dashboard (api.py) on host:port, the usage history relayed
    from the projector at `projector_url`. `config`: the one loaded from `config_dir`
    already (else it is loaded here)."""
    board = Board(Enforcer(config or load_config(config_dir)), metrics)
    readiness = Readiness()
    await ensure_topics(bootstrap, topics, partitions)
    loop = Loop(board, ConfigWatcher(config_dir), readiness, topics, clock)
    # The loop and the notifier watch their stop Events: each ends its work under way.
    notifier_stop = asyncio.Event()

    async def stop_notifier() -> None:
        notifier_stop.set()

    parts = [
        Part("enforcer-loop", lambda: loop.run(bootstrap, stop, tick_seconds), watches_stop),
        Part("enforcer-notifier", lambda: run_notifier(
            bootstrap, topics, lambda: webhook_of(board), notifier_stop, board.metrics),
            stop_notifier),
    ]
    if port is not None:  # /healthz answers while the loop rebuilds the state
        app = create_app(board, readiness, config_dir=config_dir, clock=clock,
                         projector_url=projector_url)

        async def end_streams() -> None:  # open streams end, or the server waits on them
            board.hub.close()

        parts.append(http_part("enforcer-http", app, bind(host, port), end_streams))
    await run_parts(stop, parts)


def webhook_of(board: Board) -> AlertWebhook | None:
    return board.enforcer.config.budgets.per_user_budgets.alert_webhook


class Loop:
    """budget.balances in, decisions and alerts out, the board kept current."""

    def __init__(self, board: Board, watcher: ConfigWatcher, readiness: Readiness,
                 topics: Topics, clock: Clock) -> None:
        self.board, self.watcher, self.readiness = board, watcher, readiness
        self.topics, self.clock = topics, clock
        self._acks: asyncio.Future[list[Any]] | None = None  # decisions not yet acknowledged

    async def run(self, bootstrap: str, stop: asyncio.Event, tick_seconds: float) -> None:
        """What earlier runs said, then budget.balances to its end, then follow it."""
        await restore(self.board, bootstrap, self.topics)
        async with (started(make_producer(bootstrap)) as producer,
                    started(make_consumer(bootstrap)) as consumer):
            parts = await partitions_of(consumer, self.topics.budget_balances)
            consumer.assign(parts)
            await consumer.seek_to_beginning(*parts)
            if await self._caught_up(consumer, stop):
                await self.publish(producer, self.board.enforcer.on_tick(self.clock()))
                await self._follow(consumer, producer, stop, tick_seconds)
                await self.acked()

    async def _caught_up(self, consumer: AIOKafkaConsumer, stop: asyncio.Event) -> bool:
        """Read budget.balances to its end before judging anyone: judged on no usage (or
        half of it), a user past the limit would be told `allow` until the rest is read.
        False when stopped first."""
        while not await self.readiness.check(consumer):
            if stop.is_set():
                return False
            records = await fetch(consumer, 10_000, 50)
            self.board.metrics.count_in(records)
            self.board.enforcer.remember(decode_balances(records))
        return True

    async def publish(self, producer: AIOKafkaProducer, outcome: Outcome) -> None:
        """An outcome of decisions alone does not wait for the broker's acknowledgement: the
        next batch of balances is read meanwhile, and the acks are awaited before its sends
        (a failure raises there). Decisions are absolute and a restart judges everyone
        again, so one never acknowledged is made good; alerts keep the strict order."""
        await self.acked()
        if outcome.alerts or outcome.memory:
            await publish(producer, self.topics, outcome)
        elif outcome.decisions:
            self._acks = asyncio.gather(*await queue(producer, self.topics, outcome))
        self.board.record(outcome)

    async def acked(self) -> None:
        if self._acks is not None:
            acks, self._acks = self._acks, None
            await acks

    async def _follow(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                      stop: asyncio.Event, tick_seconds: float) -> None:
        enforcer, metrics = self.board.enforcer, self.board.metrics
        clock = asyncio.get_running_loop().time
        next_tick = clock() + tick_seconds
        while not stop.is_set():
            records = await fetch(consumer, 10_000, 50)
            if records:
                metrics.count_in(records)
                await self.publish(producer, self._judge(records))
            await observe_lag(metrics, consumer)
            await self.readiness.check(consumer)
            if clock() >= next_tick:
                next_tick = clock() + tick_seconds
                await self.publish(producer, _tick(enforcer, self.watcher, self.clock()))


    def _judge(self, records: list[Record]) -> Outcome:
        """The decisions a batch of balances brings; if judging them fails, each is judged
        alone and one that still fails is logged and skipped: no balance stops deciding."""
        enforcer, now = self.board.enforcer, self.clock()
        try:
            return enforcer.on_balances(decode_balances(records), now)
        except Exception:
            log.exception("judging %d balances failed: judging them one by one", len(records))
        outcome = Outcome()
        for record in records:
            try:
                step = enforcer.on_balances(decode_balances([record]), now)
            except Exception as error:
                log.error("skipping the balance at %s: %s", record.source, error_text(error))
                continue
            outcome.decisions += step.decisions
            outcome.alerts += step.alerts
        return outcome


def _tick(enforcer: Enforcer, watcher: ConfigWatcher, now: datetime) -> Outcome:
    config = watcher.changed_config()
    return enforcer.on_config(config, now) if config else enforcer.on_tick(now)


def run(args: argparse.Namespace) -> int:
    """`tally enforcer` (options: tally.cli)."""
    settings = Settings.from_env()
    config = load_config(args.config)
    port: int | None = args.port or None

    async def service(stop: asyncio.Event) -> None:
        if port is not None:
            log.info("enforcer API on http://%s:%d (dashboard: /admin)", args.host, port)
        await run_enforcer(args.config, settings.bootstrap_servers, settings.topics, stop,
                           partitions=settings.partitions, port=port, host=args.host,
                           projector_url=f"http://127.0.0.1:{settings.projector_port}",
                           config=config)

    return run_service("tally enforcer", service)


main = command_main("enforcer")
