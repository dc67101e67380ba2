"""The enforcer shell: budget.balances in; budget.decisions and budget.alerts out.

On start it reads what earlier runs published (decisions, alert memory: heard.py), then
consumes the compacted budget.balances from the beginning and follows it. A clock tick ends
periods without new usage, and a changed budgets.yaml is reloaded (a bad one is refused and
the old policy stays). In the same event loop it serves the budgets API and the dashboard
(api.py; ready on /readyz once caught up with budget.balances) and delivers alerts to the
configured webhook (notifier.py).

Any number of instances share the work (group.py): each decides and alerts for the users of
the budget.balances partitions the enforcers' consumer group gives it, and hears what the
others decide, so each answers the API for every user. The alerts it sends for a
partition's users go out in transactions of that partition's own producer, fenced when the
partition moves (fence.py); decisions go out on one plain producer. Like a projector's,
each instance says in the instances topic (tally.instances) what it decides for and its
lag (`tally status --instances`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tally.cli import command_main
from tally.config.loader import LiveConfig, load_config
from tally.config.models import AlertWebhook, Config
from tally.instances import heartbeat, instance_id
from tally.kafka import (
    Record,
    ensure_topics,
    fetch,
    make_consumer,
    make_producer,
    partitions_of,
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
from tally.services.enforcer.board import Board
from tally.services.enforcer.fence import AlertSenders, Sent, account, shares_of
from tally.services.enforcer.group import Membership
from tally.services.enforcer.heard import Heard, Said, decode_all
from tally.services.enforcer.notifier import run_notifier
from tally.services.enforcer.state import Enforcer, Outcome, Ownership
from tally.services.projector.partitioncount import check_same_count
from tally.settings import Settings
from tally.topics import Topics
from tally.wire import BalanceUpdated, BudgetDecided

__all__ = ["main", "run_enforcer"]

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def decode_balances(records: Iterable[Record]) -> list[BalanceUpdated]:
    return decode_all(BalanceUpdated, records)


async def queue(producer: AIOKafkaProducer, topics: Topics, decisions: list[BudgetDecided],
                said: Said) -> list[asyncio.Future[Any]]:
    """Decisions handed to the (plain) producer; the futures settle when the broker
    acknowledges them. `said` notes the decisions, to know them when heard."""
    return [await producer.send(topics.budget_decisions, said.encode(d),
                                key=d.user_id.encode()) for d in decisions]


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
    session_timeout_ms: int = 10_000,
) -> None:
    """Run until `stop` is set. `clock` is injectable so tests can cross a reset; with a
    `port`, serve the API and dashboard (api.py) on host:port, the usage history relayed
    from the projector at `projector_url`. `config`: the one loaded from `config_dir`
    already (else it is loaded here). `session_timeout_ms`: how long the enforcers' group
    waits for a silent instance before its partitions go to the others."""
    live = LiveConfig(config or load_config(config_dir), config_dir)
    board = Board(Enforcer(live.current), metrics)
    readiness = Readiness()
    await ensure_topics(bootstrap, topics, partitions)
    loop = Loop(board, live, readiness, topics, clock,
                session_timeout_ms=session_timeout_ms, instance=instance_id("enforcer", port),
                url=f"http://{host}:{port}" if port else None)
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


# Users judged between two awaits when many are (all those of partitions gained, everyone
# at a reset): one long judgement would hold up the event loop, and the group's heartbeats
# with it, past the session timeout (about 0.3 ms a user on a loaded 2-core machine).
SLICE = 2000


class Loop:
    """budget.balances in, decisions and alerts out, the board kept current."""

    # Set by `run` once the clients are started.
    heard: Heard
    membership: Membership
    partitions: list[TopicPartition]  # of budget.balances
    consumer: AIOKafkaConsumer  # reads every partition of budget.balances
    check_count: Callable[[int], None]  # raises unless budget.balances has this count
    producer: AIOKafkaProducer  # decisions and heartbeats
    senders: AlertSenders  # alerts: a transactional producer per owned partition
    stop: asyncio.Event

    def __init__(self, board: Board, live: LiveConfig, readiness: Readiness,
                 topics: Topics, clock: Clock, *, session_timeout_ms: int = 10_000,
                 instance: str | None = None, url: str | None = None) -> None:
        """`instance` and `url`: how this instance is named and reached in the instances
        topic (instances.py)."""
        self.board, self.live, self.readiness = board, live, readiness
        self.topics, self.clock = topics, clock
        self.session_timeout_ms = session_timeout_ms
        self.instance, self.url = instance or instance_id("enforcer", None), url
        self._lags: dict[int, int] = {}  # per budget.balances partition, at the last batch
        self._acks: asyncio.Future[list[Any]] | None = None  # decisions not yet acknowledged

    async def run(self, bootstrap: str, stop: asyncio.Event, tick_seconds: float) -> None:
        """What earlier runs said (heard.py), then budget.balances to its end, then follow
        it, in the enforcers' group (group.py): deciding for the users of the partitions
        it gives this instance, and for nobody before."""
        self.heard = Heard(bootstrap, self.topics, self.board)
        async with (started(make_producer(bootstrap)) as producer,
                    started(make_consumer(bootstrap)) as consumer):
            parts = await partitions_of(consumer, self.topics.budget_balances)
            self.partitions = parts
            # Refused if budget.balances has another partition count than usage.events
            # (partitioncount.py); a rebalance that shows another count stops it too.
            events = len(await partitions_of(consumer, self.topics.usage_events))
            self.check_count = functools.partial(
                check_same_count, self.topics.budget_balances,
                reference=self.topics.usage_events, expected=events)
            self.check_count(len(parts))
            self.senders = AlertSenders(bootstrap, self.topics, len(parts))
            self._lost(frozenset())
            # The follower ends (on `stop`) before its consumer is stopped.
            async with (started(self.senders), started(self.heard),
                        asyncio.TaskGroup() as tasks):
                tasks.create_task(self.heard.follow(stop))
                if not await self.heard.caught_up(stop):
                    return
                consumer.assign(parts)
                await consumer.seek_to_beginning(*parts)
                if await self._caught_up(consumer, stop):
                    await self.publish(producer, self.board.enforcer.on_tick(self.clock()))
                    await self._in_group(bootstrap, consumer, producer, stop, tick_seconds)

    async def _in_group(self, bootstrap: str, consumer: AIOKafkaConsumer,
                        producer: AIOKafkaProducer, stop: asyncio.Event,
                        tick_seconds: float) -> None:
        self.membership = Membership(bootstrap, self.topics, self.session_timeout_ms,
                                     self._lost, settled=self.acked,
                                     check_count=self.check_count)
        self.consumer, self.producer, self.stop = consumer, producer, stop
        async with started(self.membership), asyncio.TaskGroup() as tasks:
            tasks.create_task(self.membership.keep_polling(stop))
            beating = tasks.create_task(heartbeat(producer, self.topics, self.instance,
                                                  "enforcer", self.url, self.describe))
            await self._follow(consumer, producer, stop, tick_seconds)
            await self.acked()
            beating.cancel()  # its tombstone: a stopped instance leaves the list at once

    def describe(self) -> dict[str, Any]:
        """What the instances topic says of this instance's share: the budget.balances
        partitions it decides for or has been given (restoring until it has heard what
        their last owner said and judged their users), and its lag in them."""
        given = self.membership.given or frozenset()
        mine = self.membership.owned | given
        return {"topic": self.topics.budget_balances, "partitions": sorted(mine),
                "restoring": sorted(given),
                "lag": {str(p): n for p, n in sorted(self._lags.items()) if p in mine}}

    def _lost(self, owned: frozenset[int]) -> None:
        """Decide for the users of `owned` only (some partitions were given up), and show
        it. Also the start: nobody, and every decision heard is taken as it is."""
        self.board.enforcer.lose(Ownership(owned, len(self.partitions)))
        self._show(owned, restoring=False)

    def _show(self, owned: frozenset[int], restoring: bool) -> None:
        """/readyz and /metrics: the partitions owned, and whether they are restoring."""
        facts = {"partitions": sorted(owned), "restoring": restoring}
        self.readiness.describe = lambda: facts
        metrics = self.board.metrics
        for tp in self.partitions:
            labels = (tp.topic, str(tp.partition))
            metrics.partitions_owned.labels(*labels).set(tp.partition in owned)
            metrics.partitions_restoring.labels(*labels).set(restoring and tp.partition in owned)

    async def _turn(self, records: list[Record]) -> None:
        """Judge a batch of balances and publish what it brings, in this instance's turn:
        the group takes no partition away meanwhile. Partitions just given are taken
        first; the group is asked first whether this instance still belongs, when its
        last answer is getting old (group.py)."""
        async with self.membership.turn():
            await self._take_given()
            await self._publish_confirmed(self.board.enforcer.restate())
            if records:
                await self.membership.confirm(self.consumer)
                await self._publish_confirmed(self._judge(records))

    async def _tick_turn(self) -> None:
        """Periods ending on the clock, or a changed budgets.yaml."""
        async with self.membership.turn():
            await self._take_given()
            config, enforcer = self.live.refresh(), self.board.enforcer
            await self._judge_many(enforcer.reconfigure(config) if config
                                   else enforcer.tick(self.clock()))

    async def _judge_many(self, users: set[str]) -> None:
        """Judge these users in slices of SLICE, publishing each (under the turn)."""
        enforcer, now = self.board.enforcer, self.clock()
        owned = sorted(u for u in users if enforcer.ownership.owns(u))
        for start in range(0, len(owned), SLICE):
            await self.membership.confirm(self.consumer)
            await self._publish_confirmed(enforcer.evaluate(set(owned[start:start + SLICE]),
                                                            now))

    async def _publish_confirmed(self, outcome: Outcome) -> None:
        """Publish, unless judging took seconds (a stall, a pause) and the group dropped
        this instance meanwhile: then the outcome is dropped, for another instance judges
        these users now. The state had taken it as said; hearing what the new owner
        publishes puts that right (a decision it sends replaces the one held; an alert id
        held but not sent is one the new owner sends, being due)."""
        if not outcome:
            return
        if not await self.membership.confirm(self.consumer):
            log.warning("dropped from the enforcers' group while judging: %d decisions and "
                        "%d alerts not sent", len(outcome.decisions), len(outcome.alerts))
            return
        await self.publish(self.producer, outcome)

    async def _take_given(self) -> None:
        """Partitions the group has given: hear everything published until now (their
        last owner's last batch included), then judge their users (group.py, heard.py).
        First the producers of partitions lost are closed, and those of the partitions
        given started (fence.py): that fences their last owner, whose open transaction is
        aborted, so its alerts are either committed and heard next or never seen."""
        await self.senders.keep(self.membership.owned)
        given = self.membership.given
        # Paused since the group gave them, this instance may have been dropped meanwhile:
        # starting their producers would then fence their new owner off.
        if given is None or not await self.membership.confirm(self.consumer):
            return
        self._show(self.membership.owned, restoring=True)
        await self.senders.own(given)
        if not await self.heard.caught_up(self.stop):
            return
        gained = self.board.enforcer.gain(Ownership(given, len(self.partitions)))
        self.membership.took(given)
        await self._judge_many(gained)
        self._show(self.membership.owned, restoring=False)
        log.info("deciding for the users of budget.balances partitions %s (%d users judged "
                 "on taking them)", sorted(given), len(gained))

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
        """Decisions are not waited for: the next batch of balances is read meanwhile, and
        their acks are awaited before its sends (a failure raises there). Decisions are
        absolute and a restart judges everyone again, so one never acknowledged is made
        good. Alerts are waited for (`_alert`): the next batch is judged on what they
        left in the alert memory."""
        await self.acked()
        if outcome.alerts:
            sends, outcome = await self._alert(producer, outcome)
        else:
            sends = await queue(producer, self.topics, outcome.decisions, self.heard.said)
        self._acks = asyncio.gather(*sends)
        self.board.record(outcome)

    async def _alert(self, producer: AIOKafkaProducer,
                     outcome: Outcome) -> tuple[list[asyncio.Future[Any]], Outcome]:
        """Send an outcome's alerts with their memory records, in a transaction per
        partition (fence.py), and hand its decisions to the producer: those of users
        without an alert at once, those of alerted users once their alerts are committed.
        So no decision of an alerted user is seen without its alerts: a new owner that
        heard it would judge on it, and a reset alert (sent on the change from the old
        decision to the new) would be lost. It costs those few decisions one transaction
        (bench/RESULTS.md). The decisions' acks to await, and what was sent; the alerts not
        committed are rolled out of the alert memory (memory.py), their users' decisions are
        not sent (the state holds the ones before again: state.py `withhold`), and fenced
        partitions are given up: their new owner decides (or this instance, taking them
        again if the group still gives them to it: group.py `fenced`)."""
        alerted = {a.user_id for a in outcome.alerts}
        sends = await queue(producer, self.topics,
                            [d for d in outcome.decisions if d.user_id not in alerted],
                            self.heard.said)
        count = len(self.partitions)
        sent = await self.senders.send(shares_of(outcome.alerts, outcome.memory, count))
        alerts = account(self.board.enforcer.memory, outcome.alerts, sent, count)
        committed = {a.user_id for a in alerts}
        self.board.enforcer.withhold(outcome, alerted - committed)
        self._given_up(sent)
        for alert in alerts:
            log.info("alert %s: %s", alert.alert_id, alert.message.strip())
        decisions = [d for d in outcome.decisions if d.user_id in committed]
        sends += await queue(producer, self.topics, decisions, self.heard.said)
        return sends, Outcome([d for d in outcome.decisions if d.user_id not in alerted]
                              + decisions, alerts)

    def _given_up(self, sent: Sent) -> None:
        """Partitions fenced off are another instance's now; a failure stops the service
        (as any failed send does: a restart judges everyone again from what was sent)."""
        if sent.error is not None:
            raise sent.error
        if sent.fenced:
            self.membership.fenced(frozenset(sent.fenced))

    async def acked(self) -> None:
        if self._acks is not None:
            acks, self._acks = self._acks, None
            await acks

    async def _follow(self, consumer: AIOKafkaConsumer, producer: AIOKafkaProducer,
                      stop: asyncio.Event, tick_seconds: float) -> None:
        metrics = self.board.metrics
        clock = asyncio.get_running_loop().time
        next_tick = clock() + tick_seconds
        while not stop.is_set():
            records = await fetch(consumer, 10_000, 50)
            metrics.count_in(records)
            await self._turn(records)
            lags = await observe_lag(metrics, consumer)
            self._lags = {tp.partition: n for tp, n in lags.items()}
            await self.readiness.check(consumer)
            if clock() >= next_tick:
                next_tick = clock() + tick_seconds
                await self._tick_turn()


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
            outcome.then(step)
        return outcome


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
                           config=config,
                           session_timeout_ms=round(args.session_timeout * 1000))

    return run_service("tally enforcer", service)


main = command_main("enforcer")
