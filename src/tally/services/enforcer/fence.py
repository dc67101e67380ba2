"""The alerts an enforcer sends for the users of a budget.balances partition go out in a
Kafka transaction of that partition's own producer, with their alert memory records:
fenced per partition, so that an instance that lost the partition (a zombie) cannot send
them once another instance has taken it.

Only batches that carry alerts pay for a transaction (an alert is a threshold crossing,
per user and period: rare). Decisions go out on the loop's plain idempotent producer as
before: a zombie's late decision is already answered by the owner sending its own again
(state.py `restate`), and a transaction per batch cost the enforcer hop 40 to 140 ms at
p50 (bench/RESULTS.md, "Enforcer fencing").

So in a batch with alerts, the decisions of users without one go out unfenced too, at once
(app.py `_alert`; an alerted user's only once its alerts commit). That is safe for alerts:
such a decision carries none, so a new owner that hears it and judges on it loses none
(a threshold's alert is known by id from the alert memory, which only committed
transactions fill; a reset alert is due on the change from the decision held before,
which is the one on the topic (a withheld one is not held: state.py `withhold`), and a
change that brings one makes its user an alerted user, whose decision waits). What can
go wrong is brief: a zombie's late decision can be the latest on budget.decisions, and
gateways act on it (e.g. allow a user the owner has stopped) until the owner reads it
back and sends its own again (`restate`, at its next batch), or, still taking the
partition, judges its users on taking it. Decisions of batches without alerts have the
same window.

The producer of partition N has the transactional id `tally-enforcer:<budget.balances>:<N>`
(`transactional_id`). An instance that gains N starts a new one (`AlertSenders.own`) before
it hears what was sent and judges N's users, and starting it (InitProducerId) fences
every older producer with that id: the broker aborts the open transaction of the
instance that had N, and that instance's commit fails with ProducerFenced. Every reader of
budget.alerts and budget.alert_memory reads read_committed (tally.kafka, the notifier), so
none sees the zombie's alerts; the zombie rolls their ids out of its alert memory
(memory.py), holds their users' decisions unsent (state.py `withhold`) and gives the
partition up (app.py). A fence from outside the group (a producer started by hand with the
id, or the broker aborting a transaction open past tally.kafka's TRANSACTION_TIMEOUT_MS)
looks the same: the group still gives the partition to this instance, which takes it
again (group.py `fenced`) and sends what the fence aborted.

The producers cost one connection and one InitProducerId each, per owned partition: they
are started when partitions are taken and closed when they are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaProducer
from aiokafka.errors import IllegalOperation, InvalidProducerEpoch, KafkaError, ProducerFenced
from aiokafka.producer.transaction_manager import TransactionState

from tally.kafka import make_producer
from tally.services.enforcer.group import group_id
from tally.services.enforcer.memory import AlertMemory, AlertsSent
from tally.services.enforcer.state import partition_of
from tally.topics import Topics
from tally.wire import BudgetAlerted

__all__ = ["ATTEMPTS", "AlertSenders", "Sent", "Share", "account", "shares_of",
           "transactional_id"]

log = logging.getLogger(__name__)

FENCED = (ProducerFenced, InvalidProducerEpoch)
# Transactions tried for one share before the error is raised (and the service stops, as
# on any failed send: a restart judges everyone again from what was committed). aiokafka
# retries a transient error within one transaction already.
ATTEMPTS = 3

Share = tuple[list[BudgetAlerted], list[AlertsSent]]  # one partition's alerts, memory


@dataclass
class Sent:
    """What became of an outcome's shares (`AlertSenders.send`)."""

    committed: set[int] = field(default_factory=set)
    fenced: set[int] = field(default_factory=set)
    error: BaseException | None = None  # of a share that failed ATTEMPTS times


def account(memory: AlertMemory, alerts: list[BudgetAlerted], sent: Sent,
            count: int) -> list[BudgetAlerted]:
    """The alerts committed, settled in the alert memory; the others (fenced off, or
    failed) rolled out of it, so that none counts as sent that was not."""
    committed = [a for a in alerts if partition_of(a.user_id, count) in sent.committed]
    ids = {a.alert_id for a in committed}
    memory.settle(committed)
    memory.roll_back(a for a in alerts if a.alert_id not in ids)
    return committed


def transactional_id(topics: Topics, partition: int) -> str:
    return f"{group_id(topics)}:{partition}"


def shares_of(alerts: Iterable[BudgetAlerted], memory: Iterable[AlertsSent],
              count: int) -> dict[int, Share]:
    """Alerts and memory records by the budget.balances partition of their user."""
    shares: dict[int, Share] = {}
    for alert in alerts:
        shares.setdefault(partition_of(alert.user_id, count), ([], []))[0].append(alert)
    for record in memory:
        shares.setdefault(partition_of(record.user_id, count), ([], []))[1].append(record)
    return shares


class AlertSenders:
    """One transactional producer per owned partition of budget.balances."""

    def __init__(self, bootstrap: str, topics: Topics, count: int) -> None:
        self.bootstrap, self.topics, self.count = bootstrap, topics, count
        self.producers: dict[int, AIOKafkaProducer] = {}

    async def own(self, partitions: Iterable[int]) -> None:
        """Producers for exactly these partitions, each new: starting one fences the
        producer of whoever had the partition before (this instance's own too, if another
        instance had it meanwhile) and returns once its open transaction is aborted."""
        await self.keep(())
        new = {n: make_producer(self.bootstrap, transactional_id=transactional_id(
            self.topics, n)) for n in partitions}
        self.producers = new
        await asyncio.gather(*(p.start() for p in new.values()))

    async def keep(self, partitions: Iterable[int]) -> None:
        """Close the producers of partitions no longer owned."""
        kept = set(partitions)
        gone = [self.producers.pop(n) for n in list(self.producers) if n not in kept]
        await asyncio.gather(*(p.stop() for p in gone))

    async def send(self, shares: dict[int, Share]) -> Sent:
        """Each partition's share in a transaction of its producer, the partitions at once:
        which were committed, which fenced off (another instance owns them now; a share of
        a partition with no producer counts too), and the error of any that failed."""
        ends = await asyncio.gather(*(self._send(n, share) for n, share in shares.items()),
                                    return_exceptions=True)
        sent = Sent()
        for partition, end in zip(shares, ends, strict=True):
            if end is True:
                sent.committed.add(partition)
            elif end is False:
                sent.fenced.add(partition)
            elif sent.error is None:
                sent.error = end
        return sent

    async def _send(self, partition: int, share: Share) -> bool:
        producer = self.producers.get(partition)
        if producer is None or _failed(producer):
            log.error("no working producer for budget.balances partition %d (fenced off "
                      "before): %d alerts not sent", partition, len(share[0]))
            return False
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await self._transaction(producer, share)
            except KafkaError as error:
                with contextlib.suppress(KafkaError):  # a new one begins after an abort
                    await producer.abort_transaction()
                if attempt == ATTEMPTS:
                    raise
                log.warning("alerts' transaction for budget.balances partition %d failed "
                            "(%s): trying again", partition, error)
        raise AssertionError("unreachable")

    async def _transaction(self, producer: AIOKafkaProducer, share: Share) -> bool:
        """One transaction of the share: True once committed, False when fenced."""
        sends: list[asyncio.Future[object]] = []
        try:
            await producer.begin_transaction()
            for topic, key, value in self._records(share):
                sends.append(await producer.send(topic, value, key=key))
            await producer.commit_transaction()  # after every send is acknowledged
        except (*FENCED, IllegalOperation) as error:
            # Fenced while sending, the producer is out of its transaction: a later send
            # says only that; the earlier ones failed with the reason. (Not kept in a
            # local: the exceptions' tracebacks hold this frame.)
            if not any(isinstance(e, FENCED) for e in
                       [error, *await asyncio.gather(*sends, return_exceptions=True)]):
                raise
            _fenced_off(producer)
            log.warning("fenced off budget.balances partition %s (another producer with its "
                        "transactional id started, or the broker aborted the transaction "
                        "at its timeout: %s): %d alerts aborted",
                        _partition_of(producer), type(error).__name__, len(share[0]))
            return False
        return True

    def _records(self, share: Share) -> list[tuple[str, bytes, bytes]]:
        """(topic, key, value): the alerts, then their memory records."""
        alerts, memory = share
        return ([(self.topics.budget_alerts, a.user_id.encode(), a.model_dump_json().encode())
                 for a in alerts]
                + [(self.topics.budget_alert_memory, m.key.encode(),
                    m.model_dump_json().encode()) for m in memory])

    async def start(self) -> None:
        """Nothing until partitions are owned (`own`)."""

    async def stop(self) -> None:
        await self.keep(())


def _failed(producer: AIOKafkaProducer) -> bool:
    """Whether the producer can take no transaction any more (fenced off already; aiokafka
    would fail an assertion on the next one)."""
    return bool(producer._txn_manager.state == TransactionState.FATAL_ERROR)


def _partition_of(producer: AIOKafkaProducer) -> str:
    return str(producer._txn_manager.transactional_id).rsplit(":", 1)[-1]


def _fenced_off(producer: AIOKafkaProducer) -> None:
    """The transaction's end, failed with the fence, is taken: asyncio would log it as an
    error never retrieved (aiokafka sets it whether or not a commit waits for it)."""
    ended = producer._txn_manager.wait_for_transaction_end()
    if ended.done():
        ended.exception()
