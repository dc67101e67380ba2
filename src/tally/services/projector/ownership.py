"""Projector instances in a consumer group: which usage.events partitions this one owns.

Any number of `tally projector` processes, each with its own DuckDB file, join one consumer
group (`group_id`) on usage.events and usage.dlq; the broker's group protocol shares the
partitions out. Offsets stay in each file with the results they produced (nothing is
committed to Kafka), so exactly-once holds per partition as it did for one instance.

A user's events all go to one usage.events partition (the topic is keyed by user_id), so
the instance owning the partition owns the user: its ledger rows, balances and the
balances sent. On each rebalance (`Ownership`, the consumer's rebalance listener):

- revoked: the batch under way finishes (commit and acks) before the group moves on, and
  whatever was read ahead is dropped (`Ownership.generation`);
- assigned (placed by assignor.py: sticky, and where the file holds most): the partitions
  this instance no longer owns are no longer read, and deleted from its file afterwards,
  outside the listener, a slice at a time (drop.py), so each event is in exactly one
  active instance's ledger and audits over their files count it once (the audit waits for
  the deletion); a standby keeps them, see Ownership;
  every assigned partition is read again from the offset stored with it, a gained one from
  the beginning if the file lacks it: that replay IS the restore (in bulk, with replay's
  path, for one far behind: restore.py). A partition's balances
  are held back ("restoring") until it reaches the end offset seen at assignment. A partition
  kept across a rebalance is not held back: if the instance was fenced meanwhile (a zombie
  given its partitions back), what it sends while catching up is older than what the other
  owner sent, and readers ignore it (below).

Zombie fencing. An instance paused past its session timeout (SIGSTOP, a long GC, a frozen
VM) loses its partitions without knowing; resumed, it may finish a batch and send its
balances before its consumer learns it was fenced. Those balances cannot change a balance
or decision: each carries (source_partition, source_offset), the position in the user's
partition it was folded up to, and a reader keeps the latest position
(BalanceUpdated.superseded_by). The fold of a partition up to an offset is a function of
that partition's records alone, so a zombie's balance at offset o equals the new owner's
at o; the new owner sends nothing below the end offset it saw at assignment, which is past
every record the zombie held then. So a zombie's balance is either older than what the new
owner sent (ignored) or the same figure the new owner reaches at that offset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition

from tally.core.usage import Offsets, UserUsage
from tally.kafka import Record, end_offsets, partitions_of
from tally.ops import Metrics
from tally.services.projector import store
from tally.services.projector.assignor import Claim
from tally.services.projector.drop import Lost, drop_slice, marked, reopen, still_to_drop
from tally.services.projector.restore import BULK_FROM, BulkRestore
from tally.topics import Topics

if TYPE_CHECKING:
    from tally.services.projector.app import Projector

__all__ = ["Ownership", "PartitionBook", "group_id", "stored_partitions", "user_partitions"]

log = logging.getLogger(__name__)

Stamped = tuple[int, list[Record]]  # a batch read ahead, with the generation it was read in


def group_id(topics: Topics) -> str:
    """The consumer group of the projector instances on these topics."""
    return f"tally-projector:{topics.usage_events}"


@dataclass
class PartitionBook:
    """What this instance owns of usage.events, and where it stands in each partition.

    `owned`: the partitions assigned. `held`: those restoring, with the end offset to reach
    before their balances go out. `positions`: the next offset folded per partition (a
    balance's source_offset). `partition_of`: each user's partition, from the ledger rows."""

    topic: str
    owned: set[int] = field(default_factory=set)
    held: dict[int, int] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)
    partition_of: dict[str, int] = field(default_factory=dict)

    def note(self, rows: pa.Table, offsets: Offsets) -> None:
        """A batch folded: its users' partitions and the partitions' new positions."""
        users = rows.column("user_id").to_pylist()
        parts = rows.column("topic_partition").to_pylist()
        self.partition_of.update(zip(users, parts, strict=True))
        for (topic, partition), offset in offsets.items():
            if topic == self.topic:
                self.positions[partition] = offset

    def source(self, user: str) -> tuple[int, int] | None:
        partition = self.partition_of.get(user)
        if partition is None:
            return None
        return partition, self.positions.get(partition, 0)

    def sendable(self, users: Iterable[str]) -> list[str]:
        """Of `users`, those whose partition this instance owns and is not restoring."""
        return sorted(user for user in users
                      if (p := self.partition_of.get(user)) in self.owned and p not in self.held)

    def users_in(self, partitions: Iterable[int]) -> set[str]:
        wanted = set(partitions)
        return {user for user, p in self.partition_of.items() if p in wanted}

    def hold(self, partitions: Iterable[int], stored: Offsets,
             ends: Mapping[tuple[str, int], int]) -> None:
        """Hold back each partition's balances until it reaches its end at assignment."""
        for p in partitions:
            at = stored.get((self.topic, p), 0)
            self.positions[p] = at
            end = ends.get((self.topic, p), 0)
            if end > at:
                self.held[p] = end
            else:
                self.held.pop(p, None)

    def reached(self, offsets: Offsets) -> set[int]:
        """The held partitions `offsets` (a batch's next offsets) bring to their end."""
        done = {p for (topic, p), at in offsets.items()
                if topic == self.topic and self.held.get(p, at + 1) <= at}
        for p in done:
            del self.held[p]
        return done

    def disown(self, partitions: Iterable[int]) -> None:
        """Partitions no longer owned, still followed (a standby's): nothing sent for them."""
        lost = set(partitions)
        for p in lost:
            self.held.pop(p, None)
        self.owned -= lost

    def forget(self, partitions: Iterable[int]) -> set[str]:
        """Partitions lost: their users, no longer this instance's."""
        lost = set(partitions)
        users = self.users_in(lost)
        for user in users:
            del self.partition_of[user]
        for p in lost:
            self.positions.pop(p, None)
        self.disown(lost)
        return users


# the file's side ----------------------------------------------------------------------------


def user_partitions(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Each stored user's usage.events partition (of their latest event, should a topic
    have been re-keyed)."""
    rows = con.execute("SELECT user_id, arg_max(topic_partition, topic_offset) "
                       "FROM ledger GROUP BY user_id").fetchall()
    return {user: int(partition) for user, partition in rows}


def stored_partitions(con: duckdb.DuckDBPyConnection, topic: str) -> set[int]:
    rows = con.execute("SELECT partition FROM offsets WHERE topic = ?", [topic]).fetchall()
    return {int(p) for (p,) in rows}


# the rebalance listener ---------------------------------------------------------------------


class Ownership(ConsumerRebalanceListener):  # type: ignore[misc]
    """The projector's rebalance listener: see the module doc. A failure in a callback
    (aiokafka would only log it) is kept in `failed`, which stops the service.

    A standby's (`follower` given: a consumer of its own, outside the group) keeps every
    partition in its file: the follower reads those the group did not assign it, folded
    like the owned ones but nothing sent for them (Projector.send sends only for owned
    partitions), and a partition it loses is not dropped, only no longer sent for. When
    the group gives it a partition, its file is a tail behind, not empty."""

    def __init__(self, projector: Projector, consumer: AIOKafkaConsumer, topics: Topics,
                 on_change: Callable[[], None] | None = None,
                 follower: AIOKafkaConsumer | None = None,
                 check_count: Callable[[int], None] | None = None,
                 bootstrap: str | None = None, bulk_from: int = BULK_FROM) -> None:
        """`check_count` raises if usage.events' partition count (at an assignment) is not
        the one the file was written under: that stops the service (partitioncount.py).
        With `bootstrap`, a partition gained `bulk_from` records behind or more is restored
        in bulk (restore.py)."""
        self.check_count = check_count
        self.bulk = (BulkRestore(projector, consumer, bootstrap, self._load, self._fail,
                                 bulk_from=bulk_from)
                     if bootstrap is not None else None)
        self.projector = projector
        self.consumer = consumer
        self.follower = follower
        self.topics = topics
        self.generation = 0
        self.failed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.on_change = on_change or (lambda: None)
        self.assigned: set[TopicPartition] = set()
        # The partitions lost whose deletion from the file is pending (drop.py), and the
        # task deleting them; `_dropped` is set while none is pending.
        self._pending = Lost()
        self._dropper: asyncio.Future[None] | None = None
        self._dropped = asyncio.Event()
        self._dropped.set()
        self._stopping = False
        # How far the file holds each partition: what this instance claims when it joins
        # (assignor.py), so a partition goes where the least is left to replay. Not one
        # whose deletion began before a stop (drop.py): it is partly deleted.
        half = marked(projector.writer)
        self.book.positions.update({p: at for (t, p), at in projector.store.load_offsets()
                                    .items() if t == topics.usage_events and p not in half})
        if follower is None:
            projector.mirror.clear()  # nothing is owned until the group says so
        else:  # a standby folds every partition: its mirror and users stay whole
            # (a partition left half deleted by an active run before is followed anew)
            reopen(projector.writer, topics, half)
            self.book.partition_of.update(user_partitions(projector.writer))

    @property
    def standby(self) -> bool:
        return self.follower is not None

    def claim(self) -> Claim:
        """What this instance says of itself when it joins the group (assignor.py)."""
        return Claim(self.standby, frozenset(self.book.owned), dict(self.book.positions))

    @property
    def book(self) -> PartitionBook:
        return self.projector.book

    def current(self, stamped: Stamped) -> bool:
        """Whether a batch was read since the last assignment (else it is dropped: every
        partition is sought anew on assignment, so it would be read twice)."""
        return stamped[0] == self.generation

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        if self.follower is not None:
            # Reads nothing more until the assignment seeks it: a batch read after this
            # bump, kept, would store offsets past one read before it and dropped.
            self.follower.pause(*self.follower.assignment())
        self.generation += 1  # what was read ahead is not folded
        try:
            await self.stop_restoring()
            await self.projector.finish()  # the batch under way commits; its acks arrive
        except BaseException as error:
            self._fail(error)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await self._take(assigned)
        except BaseException as error:
            self.generation += 1
            self._fail(error)

    async def _take(self, assigned: set[TopicPartition]) -> None:
        projector, events, dlq = self.projector, self.topics.usage_events, self.topics.usage_dlq
        found = self.consumer.partitions_for_topic(events)
        if found and self.check_count is not None:  # partitions added while running
            self.check_count(len(found))
        mine = {tp.partition for tp in assigned if tp.topic == events}
        mine_dlq = {tp.partition for tp in assigned if tp.topic == dlq}
        async with projector.writing():
            # The write under way (balances go out before it) is stored first: the offsets
            # sought below and the partitions dropped are then the file's final ones.
            await projector.drain()
            if self.standby:
                lost = self.book.owned - mine
                self.book.disown(lost)  # still followed: its file keeps them
            else:
                lost = await self._lose_all_but(mine, mine_dlq)
            gained = mine - self.book.owned
            if gained and not self.standby:  # a standby's mirror holds them already
                await self._load(gained)
            stored = projector.store.load_offsets()
            followed = await self._rest(assigned)
            starts = await self.consumer.beginning_offsets(list(assigned | followed))
            sought = {tp: stored.get((tp.topic, tp.partition), starts[tp]) for tp in assigned}
            for tp, at in sought.items():
                self.consumer.seek(tp, at)
            # A partition still restoring is sought back too: it is held anew.
            restoring = gained | (mine & set(self.book.held))
            if self.bulk is not None:  # read by nobody until the ends say how (restore.py)
                self.bulk.pause(restoring)
            if self.follower is not None:
                self.follower.assign(sorted(followed))
                for tp in followed:
                    self.follower.seek(tp, stored.get((tp.topic, tp.partition), starts[tp]))
            # At once, with no await since the seeks: a batch read from now on was read
            # from these positions; one read before is dropped (and read again).
            self.generation += 1
            ends = {(tp.topic, tp.partition): end
                    for tp, end in (await end_offsets(self.consumer, assigned)).items()}
            self.book.owned = mine
            self.book.hold(restoring, stored, ends)
            if self.bulk is not None:  # those far behind in bulk, the rest live
                self.bulk.start(restoring, {tp.partition: at for tp, at in sought.items()
                                            if tp.topic == events}, ends)
            self.assigned = set(assigned)
            log.info("projector: owns partitions %s of %s (lost %s, gained %s, restoring %s)",
                     sorted(mine), events, sorted(lost), sorted(gained), sorted(self.book.held))
            # Heals a crash between a commit and its publish: the balances of the gained
            # partitions already caught up, once (the restoring ones follow once caught up).
            await projector.publish(self.book.users_in(restoring))
        self._start_dropping()
        self.on_change()

    async def _lose_all_but(self, mine: set[int], mine_dlq: set[int]) -> set[int]:
        """An active instance's file keeps only the partitions it owns: the others are no
        longer read nor sent for, and their deletion is left pending (drop.py: it runs
        after the listener). The usage.events partitions lost."""
        projector, con = self.projector, self.projector.writer
        lost = (self.book.owned | stored_partitions(con, self.topics.usage_events)) - mine
        lost_dlq = stored_partitions(con, self.topics.usage_dlq) - mine_dlq
        self.pending = still_to_drop(self.pending, Lost.of(lost, lost_dlq),
                                     Lost.of(mine, mine_dlq))
        for user in self.book.forget(lost):
            projector.mirror.pop(user, None)
        # Regained (or given back after a stop) once their deletion began: replayed from
        # the beginning (drop.reopen); the recent ids forget the deleted events.
        if reopened := await asyncio.to_thread(marked, con) & mine:
            await asyncio.to_thread(reopen, con, self.topics, reopened)
            await asyncio.to_thread(projector.forget_recent)
        return lost

    @property
    def pending(self) -> Lost:
        """The partitions lost whose deletion from the file has not ended."""
        return self._pending

    @pending.setter
    def pending(self, lost: Lost) -> None:
        self._pending = lost
        if lost:
            self._dropped.clear()
        else:
            self._dropped.set()

    def _start_dropping(self) -> None:
        if self.pending and self._dropper is None and not self._stopping:
            self._dropper = asyncio.ensure_future(self._drop_pending())
            self._dropper.add_done_callback(self._dropping_ended)

    def _dropping_ended(self, task: asyncio.Future[None]) -> None:
        self._dropper = None
        if not task.cancelled() and (error := task.exception()) is not None:
            self._fail(error)

    async def _drop_pending(self) -> None:
        """Delete the pending partitions a slice at a time, each under the writing lock
        after the batches taken are stored (one writer on the file); the live batches and
        the listener take the lock between slices. What is pending is read anew for each
        slice: a partition regained meanwhile is no longer deleted."""
        projector = self.projector
        while True:
            async with projector.writing():
                lost = self.pending
                if not lost:
                    return
                await projector.drain()
                if await asyncio.to_thread(drop_slice, projector.writer, self.topics, lost):
                    self.pending = Lost()
                    # The recent ids forget the deleted events: regained, they are new.
                    await asyncio.to_thread(projector.forget_recent)
                    log.info("projector: deleted partitions %s of %s (and %s of %s) from "
                             "its file", sorted(lost.events), self.topics.usage_events,
                             sorted(lost.dlq), self.topics.usage_dlq)

    async def settled(self, timeout: float) -> str | None:
        """Until no deletion is pending, at most `timeout` seconds; then the partitions
        still being deleted, if any (an audit would count their rows too). Waits again
        when a deletion begins while it is being told none is pending (wait_for yields to
        the loop: a rebalance may come between the two), rather than answer at once."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.pending and (left := deadline - loop.time()) > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dropped.wait(), left)
        lost = self.pending
        if not lost:
            return None
        return " and ".join(f"partitions {','.join(map(str, sorted(parts)))} of {topic}"
                            for topic, parts in ((self.topics.usage_events, lost.events),
                                                 (self.topics.usage_dlq, lost.dlq)) if parts)

    async def stop_dropping(self) -> None:
        """Until the pending deletion has ended (the service stopping): a file at rest
        then holds only the partitions it owned, as before. Killed meanwhile, the file
        holds the rest, marked, and the next start goes on (drop.py)."""
        if self._dropper is not None:
            await asyncio.wait([self._dropper])
        self._stopping = True

    async def _rest(self, assigned: set[TopicPartition]) -> set[TopicPartition]:
        """A standby's partitions to follow: all of both topics but those `assigned`."""
        if self.follower is None:
            return set()
        every = [tp for name in (self.topics.usage_events, self.topics.usage_dlq)
                 for tp in await partitions_of(self.consumer, name)]
        return set(every) - assigned

    async def stop_restoring(self) -> None:
        """Until a bulk restore under way has stopped (a rebalance, or the service
        stopping): the file then holds its partitions up to their stored offsets."""
        if self.bulk is not None:
            await self.bulk.stop()

    async def _load(self, gained: set[int]) -> None:
        """The gained partitions' users, from the file into the mirror and the book: read
        in a thread, taken in on the event loop, where the fold reads both (a dict a thread
        changes while the loop iterates it fails the loop)."""
        def read() -> tuple[dict[str, UserUsage], dict[str, int]]:
            con = self.projector.writer
            partitions = user_partitions(con)
            return (store.load_usages_of(con, gained),
                    {u: p for u, p in partitions.items() if p in gained})

        usages, partition_of = await asyncio.to_thread(read)
        self.projector.mirror.update(usages)
        self.book.partition_of.update(partition_of)

    def lag(self) -> dict[int, int]:
        """Per owned usage.events partition, the records not folded yet (against the high
        watermark the last fetch saw; a partition not fetched yet counts its end at
        assignment). A standby's also per partition it follows: how warm it is."""
        found = {}
        readers = {p: self.consumer for p in self.book.owned}
        if self.follower is not None:
            readers |= {tp.partition: self.follower for tp in self.follower.assignment()
                        if tp.topic == self.topics.usage_events}
        for p, reader in sorted(readers.items()):
            tp = TopicPartition(self.topics.usage_events, p)
            try:
                highwater = reader.highwater(tp)
            except (AssertionError, KeyError, ValueError):  # revoked meanwhile
                continue
            end = highwater if highwater is not None else self.book.held.get(p, 0)
            found[p] = max(end - self.book.positions.get(p, 0), 0)
        return found

    def readers(self) -> list[AIOKafkaConsumer]:
        """The consumers whose partitions this instance reads, the one its readiness is
        judged by first: a standby's follower while it follows any partition; else (an
        active instance, or a standby owning every partition because no active instance
        is there) the group's consumer, so such a standby becomes ready as an owner."""
        if self.follower is None:
            return [self.consumer]
        if self.follower.assignment():
            return [self.follower, self.consumer]
        return [self.consumer, self.follower]

    def describe(self) -> dict[str, Any]:
        """What /readyz (and the instances topic) say of this instance's share."""
        return {"topic": self.topics.usage_events, "partitions": sorted(self.book.owned),
                "standby": self.standby, "restoring": sorted(self.book.held),
                "dropping": sorted(self.pending.events),
                "lag": {str(p): n for p, n in self.lag().items()}}

    def report(self, metrics: Metrics) -> None:
        """The tally_partitions_owned and _restoring gauges, for the partitions owned now,
        and a standby's tally_partitions_following."""
        topic = self.topics.usage_events
        followed = {tp.partition for tp in (self.follower.assignment() if self.follower
                                            else ()) if tp.topic == topic}
        for gauge, partitions in ((metrics.partitions_owned, self.book.owned),
                                  (metrics.partitions_restoring, set(self.book.held)),
                                  (metrics.partitions_following, followed)):
            gauge.clear()
            for p in partitions:
                gauge.labels(topic, str(p)).set(1)

    async def keep_reporting(self, metrics: Metrics, every: float = 0.5) -> None:
        """The partition gauges, every `every` seconds, until cancelled."""
        while True:
            self.report(metrics)
            await asyncio.sleep(every)

    async def broken(self) -> None:
        """Until a rebalance fails, then its error (a part of the service: it stops it)."""
        await asyncio.shield(self.failed)

    def _fail(self, error: BaseException) -> None:
        log.error("projector: a rebalance failed: %r", error)
        if not self.failed.done():
            self.failed.set_exception(error)
