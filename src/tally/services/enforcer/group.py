"""Which users this enforcer decides for, when several run: Kafka's group protocol.

Every instance reads all of budget.balances with a consumer that assigns itself every
partition (app.py): a shared budget (a department's, a project's) sums users of every
partition, so deciding for a few users needs everyone's usage. The cost is that each
instance reads and holds the whole topic, one compacted record per user (about 350 bytes
on the wire, 1.8 KB held: 180 MB at 100,000 users) and takes every balance in (about 100
µs each, against 260 µs to take it in and judge it; README "Scaling out: enforcers"); the
judging, the publishing and the alerts are what is shared. Ownership comes from a second
consumer, `Membership`, a member of the group `tally-enforcer:<budget.balances>`
subscribed to the same topic. It reads nothing (its
partitions are paused as soon as they are assigned, and it only polls so that the group
keeps it); its assignment says whose users this instance decides and alerts for.

The group's rebalances are eager (aiokafka's): every member gives up all of its partitions,
then gets its new share. Giving up waits for the batch under way (`turn`), so what a member
still publishes is out before another one is given the partition; gaining is only noted,
and the loop restores before it judges (app.py).

A member that stops answering (paused, or its machine cut off) is dropped by the group after
`session_timeout_ms`, and its partitions go to another without its consent. When it runs
again it must not judge from what it last believed: before judging, `confirm` asks the group
coordinator whether this member still belongs (an offset commit under its generation, which
the coordinator refuses from a dropped member) whenever the last answer is older than
CONFIRM_EVERY of the session timeout, and again after judging if that took long (app.py).
Dropped, it owns nothing until the group assigns again.

The check leaves a window: a member paused after its last check and before its batch is
out (about 50 ms under load) resumes with the batch in hand. For alerts, fencing closes it
(fence.py): a batch's alerts go out in a transaction of their partition's own producer,
which the next owner starts before it hears and judges the partition's users, fencing the
old one (asking `confirm` first: one dropped since it was given the partition would fence
its owner). The resumed zombie's transaction is aborted, unseen by every reader (all read
read_committed), and it gives the partition up (`fenced`). Its decisions go out on a plain
producer, unfenced: one it sends late is answered by the owner sending its own again
(state.py `restate`), so the compacted topic ends with the owner's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError
from aiokafka.structs import OffsetAndMetadata

from tally.kafka import make_consumer
from tally.topics import Topics

__all__ = ["CONFIRM_EVERY", "Membership", "group_id"]

log = logging.getLogger(__name__)

# A coordinator drops a member `session_timeout` after the last heartbeat it had from it,
# and heartbeats go every third of that; a commit accepted at time t (which may not count
# as a heartbeat) so proves membership until at least t + 2/3 of the session timeout.
# Asking again after a third leaves the other third for judging and sending a batch.
CONFIRM_EVERY = 1 / 3


def group_id(topics: Topics) -> str:
    return f"tally-enforcer:{topics.budget_balances}"


class Membership(ConsumerRebalanceListener):  # type: ignore[misc]
    """This instance's place in the enforcers' group: the partitions it owns now, the ones
    the group has given it and the loop has not yet taken (restored), and the turn."""

    def __init__(self, bootstrap: str, topics: Topics, session_timeout_ms: int,
                 lost: Callable[[frozenset[int]], None],
                 settled: Callable[[], Awaitable[None]] | None = None,
                 check_count: Callable[[int], None] | None = None) -> None:
        """`lost` is told the partitions still owned whenever some are lost, at once:
        the state must stop deciding for their users, and take their new owner's
        decisions when it hears them. `settled` waits until what was published is
        acknowledged (the loop does not wait for decisions' acks between batches): a
        partition is given up only then, so its new owner hears the last decisions.
        `check_count` raises if budget.balances' partition count (at an assignment) is
        not the one wanted (partitioncount.py): `keep_polling` raises it, which stops the
        service."""
        self.check_count = check_count
        self.failed: Exception | None = None
        self.topic, self.lost, self.settled = topics.budget_balances, lost, settled
        # The range assignor, as when this consumer was built apart: members of one group
        # must share a protocol, so a rolling upgrade's old and new instances still join.
        self.consumer = make_consumer(bootstrap, group_id(topics),
                                      session_timeout_ms=session_timeout_ms,
                                      assignors=(RangePartitionAssignor,))
        self.owned: frozenset[int] = frozenset()
        self.given: frozenset[int] | None = None  # assigned, not yet taken
        self.lock = asyncio.Lock()  # held while a batch is judged and published
        self._confirm_every = session_timeout_ms / 1000 * CONFIRM_EVERY
        self._confirmed_at = float("-inf")

    async def start(self) -> None:
        await self.consumer.start()
        self.consumer.subscribe([self.topic], listener=self)

    async def stop(self) -> None:
        await self.consumer.stop()  # leaves the group: the others take over at once

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """Judge and publish inside this: the group takes no partition away meanwhile."""
        async with self.lock:
            yield

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self.lock:  # the batch under way is published (and acknowledged) first
            if self.settled is not None:
                try:
                    await self.settled()
                except Exception:  # the next send fails the same way, in the loop
                    log.exception("decisions sent before giving partitions up failed")
            lost = {tp.partition for tp in revoked}
            self.owned, self.given = self.owned - lost, None
            self.lost(self.owned)
        if lost:
            log.info("gave up budget.balances partitions %s", sorted(lost))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        # Only noted: the loop restores, then takes them (this runs in the group's own
        # task, whose heartbeats wait for it). The partitions are never read here.
        self.consumer.pause(*assigned)
        found = self.consumer.partitions_for_topic(self.topic)
        if found and self.check_count is not None:  # partitions added while running
            try:
                self.check_count(len(found))
            except Exception as error:  # aiokafka would only log it: the service stops
                self.failed = error
                return
        self.given = frozenset(tp.partition for tp in assigned)
        self._confirmed_at = asyncio.get_running_loop().time()  # just joined: a member
        log.info("given budget.balances partitions %s", sorted(self.given))

    def took(self, partitions: frozenset[int]) -> None:
        """The loop restored and judged these: owned from now (under the turn)."""
        self.owned, self.given = partitions, None

    def fenced(self, partitions: frozenset[int]) -> None:
        """Another producer of these partitions' transactional ids fenced this one's off
        (fence.py): owned no longer, and the group is asked again before the next batch.
        Usually another instance took them, and the group's answer is that this one was
        dropped. Those the group still gives this instance (the fence came from outside
        the group: a producer started by hand with that id, or the broker aborting a
        transaction open past its timeout) are given again, and the loop takes them as
        any partition given (app.py `_take_given`: confirmed first, then a new producer,
        which fences the other, then their users judged, the alerts aborted sent again);
        else nobody would decide for their users until the next rebalance."""
        self.owned -= partitions
        self._confirmed_at = float("-inf")
        self.lost(self.owned)
        log.warning("fenced off budget.balances partitions %s: deciding for their users no "
                    "longer", sorted(partitions))
        still = partitions & {tp.partition for tp in self.consumer.assignment()}
        if still:
            self.given = self.owned | (self.given or frozenset()) | still
            log.warning("budget.balances partitions %s are still this instance's in the "
                        "group: taking them again once it confirms", sorted(still))

    async def keep_polling(self, stop: asyncio.Event) -> None:
        """A member that does not poll for max_poll_interval_ms leaves the group; nothing
        is read (every partition is paused), so a poll is a cheap local call."""
        while not stop.is_set():
            await self.consumer.getmany(timeout_ms=500)
            if self.failed is not None:
                raise self.failed

    async def confirm(self, reader: AIOKafkaConsumer) -> bool:
        """Whether this instance may still judge for its partitions (owned, or given and
        not yet taken), asked of the group coordinator when the last answer is getting
        old (after a pause, a stall, a cut). Under the turn. False: it was dropped, and
        owns nothing until assigned again.

        The commit carries `reader`'s positions in those partitions, so Kafka's own
        tools show the group's progress. Transient errors are retried by aiokafka."""
        held = self.owned | (self.given or frozenset())
        if not held:
            return True
        clock = asyncio.get_running_loop().time
        if clock() - self._confirmed_at < self._confirm_every:
            return True
        asked = clock()
        offsets = {tp: OffsetAndMetadata(await reader.position(tp), "")
                   for tp in reader.assignment() if tp.partition in held}
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as error:  # dropped, or rejoining
            log.warning("no longer a member of the enforcers' group (%s): deciding for "
                        "nobody until it assigns partitions again", error)
            self.owned, self.given = frozenset(), None
            self.lost(self.owned)
            return False
        self._confirmed_at = asked
        return True
