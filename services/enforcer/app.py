"""The enforcer shell: budget.balances in; budget.decisions and budget.alerts out.

On start it reads what earlier runs published (decisions, alert ids), then consumes the
compacted budget.balances from the beginning and follows it. A clock tick ends periods
without new usage, and a changed budgets.yaml is reloaded (a bad one is refused and the
old policy stays).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from services.enforcer.state import Enforcer, Outcome
from tally.config.errors import ConfigError
from tally.config.loader import load_config
from tally.config.models import Config
from tally.kafka import (
    Record,
    ensure_topics,
    fetch,
    make_consumer,
    make_producer,
    partitions_of,
    read_to_end,
)
from tally.service import configure_logging, load_config_or_report, stop_on_signals
from tally.settings import Settings
from tally.topics import Topics
from tally.wire import BalanceUpdated, BudgetAlerted, BudgetDecided

__all__ = ["ConfigWatcher", "main", "run_enforcer"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class ConfigWatcher:
    """Notices a changed config file and loads it; a bad file keeps the old config."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp = self._read_stamp()

    def _read_stamp(self) -> tuple[float, ...]:
        names = ("auth.yaml", "users.yaml", "budgets.yaml")
        paths = [self.directory / name for name in names]
        return tuple(p.stat().st_mtime_ns if p.exists() else 0 for p in paths)

    def changed_config(self) -> Config | None:
        stamp = self._read_stamp()
        if stamp == self._stamp:
            return None
        self._stamp = stamp
        try:
            config = load_config(self.directory)
        except ConfigError as error:
            log.error("refusing the changed config in %s; the old policy stays:\n%s",
                      self.directory, error)
            return None
        log.info("reloaded the config from %s", self.directory)
        return config


async def restore(enforcer: Enforcer, bootstrap: str, topics: Topics) -> None:
    decisions = [BudgetDecided.model_validate_json(r.value)
                 for r in await read_to_end(bootstrap, topics.budget_decisions) if r.value]
    alerts = [BudgetAlerted.model_validate_json(r.value)
              for r in await read_to_end(bootstrap, topics.budget_alerts) if r.value]
    enforcer.restore(decisions, (a.alert_id for a in alerts))
    log.info("restored %d decisions and %d alert ids", len(decisions), len(alerts))


def decode_balances(records: Iterable[Record]) -> list[BalanceUpdated]:
    found = []
    for record in records:
        try:
            found.append(BalanceUpdated.model_validate_json(record.value or b""))
        except ValueError as error:
            log.warning("skipping undecodable balance at %s[%d]@%d: %s",
                        record.topic, record.partition, record.offset, error)
    return found


async def publish(producer: AIOKafkaProducer, topics: Topics, outcome: Outcome) -> None:
    """Decisions, then alerts; both acknowledged before the next step."""
    sends = [await producer.send(topics.budget_decisions, d.model_dump_json().encode(),
                                 key=d.user_id.encode()) for d in outcome.decisions]
    sends += [await producer.send(topics.budget_alerts, a.model_dump_json().encode(),
                                  key=a.user_id.encode()) for a in outcome.alerts]
    await asyncio.gather(*sends)
    for alert in outcome.alerts:
        log.info("alert %s: %s", alert.alert_id, alert.message.strip())


async def run_enforcer(
    config_dir: Path,
    bootstrap: str,
    topics: Topics,
    stop: asyncio.Event,
    *,
    clock: Clock = utc_now,
    tick_seconds: float = 1.0,
    partitions: int = 3,
) -> None:
    """Run until `stop` is set. `clock` is injectable so tests can cross a reset."""
    watcher = ConfigWatcher(config_dir)
    enforcer = Enforcer(load_config(config_dir))
    await ensure_topics(bootstrap, topics, partitions)
    await restore(enforcer, bootstrap, topics)
    producer, consumer = make_producer(bootstrap), make_consumer(bootstrap)
    await producer.start()
    await consumer.start()
    try:
        parts = await partitions_of(consumer, topics.budget_balances)
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        await publish(producer, topics, enforcer.on_tick(clock()))
        await _loop(enforcer, watcher, consumer, producer, topics, stop, clock, tick_seconds)
    finally:
        with contextlib.suppress(Exception):
            await producer.stop()
        await consumer.stop()


async def _loop(enforcer: Enforcer, watcher: ConfigWatcher, consumer: AIOKafkaConsumer,
                producer: AIOKafkaProducer, topics: Topics, stop: asyncio.Event,
                clock: Clock, tick_seconds: float) -> None:
    loop = asyncio.get_running_loop()
    next_tick = loop.time() + tick_seconds
    while not stop.is_set():
        records = await fetch(consumer, 10_000, 50)
        if records:
            await publish(producer, topics, enforcer.on_balances(decode_balances(records),
                                                                 clock()))
        if loop.time() >= next_tick:
            next_tick = loop.time() + tick_seconds
            await publish(producer, topics, _tick(enforcer, watcher, clock()))


def _tick(enforcer: Enforcer, watcher: ConfigWatcher, now: datetime) -> Outcome:
    config = watcher.changed_config()
    return enforcer.on_config(config, now) if config else enforcer.on_tick(now)


def main(argv: list[str]) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="tally enforcer", description=__doc__)
    parser.add_argument("--config", type=Path, default=settings.config_dir,
                        help="directory of auth.yaml, users.yaml, budgets.yaml")
    args = parser.parse_args(argv)
    if load_config_or_report(args.config, "tally enforcer") is None:
        return 1
    configure_logging()
    asyncio.run(_main(args.config, settings))
    return 0


async def _main(config_dir: Path, settings: Settings) -> None:
    stop = asyncio.Event()
    stop_on_signals(stop)
    await run_enforcer(config_dir, settings.bootstrap_servers, settings.topics, stop,
                       partitions=settings.partitions)
