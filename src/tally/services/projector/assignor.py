"""Who owns which usage.events partition: the projectors' own partition assignor.

Kafka's round-robin assignor deals every partition out anew at each rebalance, blind to
what each instance's DuckDB file already holds, so a partition that moves is replayed
from offset 0 into its new owner's file. This assignor is told, by each member when it
joins (its subscription's user data, a `Claim`), its role, the partitions it owns now and
how far its file holds each partition; the group's leader then places the partitions
(`place`, a pure function of the claims):

(a) a partition stays with its live owner (sticky); claimed by two (a fenced zombie still
    claims what it lost), it stays with the one whose file holds it further;
(b) a partition nobody owns (its owner is gone) goes to the member whose file holds it
    furthest, so the new owner replays only the tail; a `--standby` instance follows every
    partition, so it wins; on a tie (fresh files) an active instance with fewest takes it;
(c) an active instance that owns nothing yet (started or restarted) takes back from the
    standbys, up to its share among the active instances, the partitions its file holds
    furthest: a standby returns to waiting and the restarted instance replays only what
    it missed;
(d) the active instances are balanced (their counts differ by one at most) by moving to
    the one with fewest the partitions its file holds furthest. A standby's partitions are
    not balanced: an active instance that owns some already replays from offset 0 what it
    did not own, the very replay a standby is there to spare.

usage.dlq partition q goes with usage.events partition q modulo the count (its rejected
records are in the same file as the events beside them).

Every projector offers this assignor first; an active one offers round-robin after it, so
a group being upgraded from instances offering only round-robin still forms (the broker
picks the protocol every member offers). A standby offers this assignor alone (`offered`):
under round-robin it would be dealt a share like an active instance. So the broker refuses
it while an instance from before this assignor is in the group, and it stops saying so
(`StandbyRefused`): upgrade the active instances first, then start the standby.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from aiokafka.cluster import ClusterMetadata
from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import (
    ConsumerProtocolMemberAssignment,
    ConsumerProtocolMemberMetadata,
)

from tally.errors import ClusterError
from tally.topics import Topics

__all__ = ["NAME", "Claim", "StandbyRefused", "offered", "place", "refused", "warm_assignor"]

log = logging.getLogger(__name__)

NAME = "tally-warm"


@dataclass(frozen=True)
class Claim:
    """What a member says of itself when it joins: standby or not, the usage.events
    partitions it owns now, and the next offset its file holds per partition."""

    standby: bool = False
    owned: frozenset[int] = frozenset()
    at: Mapping[int, int] = field(default_factory=dict)

    def encode(self) -> bytes:
        return json.dumps({"standby": self.standby, "owned": sorted(self.owned),
                           "at": {str(p): n for p, n in sorted(self.at.items())}}).encode()

    @classmethod
    def decode(cls, data: bytes) -> Claim:
        """A member's user data; one that says nothing readable is an active instance that
        owns and holds nothing."""
        try:
            said = json.loads(data or b"{}")
            return cls(bool(said.get("standby", False)),
                       frozenset(int(p) for p in said.get("owned", [])),
                       {int(p): int(n) for p, n in said.get("at", {}).items()})
        except (ValueError, TypeError, AttributeError):
            return cls()

    def holds(self, partition: int) -> int:
        return self.at.get(partition, 0)


def place(partitions: Sequence[int], claims: Mapping[str, Claim]) -> dict[str, set[int]]:
    """Each member's partitions, by rules (a) to (d) of the module doc. Deterministic: the
    members are considered in the order of their ids."""
    members = sorted(claims)
    placed: dict[str, set[int]] = {m: set() for m in members}
    if not members:
        return placed
    actives = [m for m in members if not claims[m].standby]

    def furthest(candidates: Iterable[str], p: int) -> str:
        # Further in the file first; then an active before a standby; then fewest owned.
        return max(candidates, key=lambda m: (claims[m].holds(p), not claims[m].standby,
                                              -len(placed[m])))

    for p in partitions:  # (a) and (b)
        owners = [m for m in members if p in claims[m].owned]
        placed[furthest(owners or members, p)].add(p)
    if not actives:
        return placed
    share = len(partitions) // len(actives)
    standbys = [m for m in members if claims[m].standby]
    for m in actives:  # (c)
        if claims[m].owned:
            continue
        while len(placed[m]) < share and (held := [(s, p) for s in standbys for p in placed[s]]):
            s, p = max(held, key=lambda sp: (claims[m].holds(sp[1]), -sp[1]))
            placed[s].discard(p)
            placed[m].add(p)
    _balance(actives, placed, claims)  # (d)
    return placed


def _balance(actives: list[str], placed: dict[str, set[int]],
             claims: Mapping[str, Claim]) -> None:
    while True:
        most = max(actives, key=lambda m: len(placed[m]))
        fewest = min(actives, key=lambda m: len(placed[m]))
        if len(placed[most]) - len(placed[fewest]) <= 1:
            return
        p = max(placed[most], key=lambda q: (claims[fewest].holds(q), -q))
        placed[most].discard(p)
        placed[fewest].add(p)


def dlq_follows(events: Mapping[str, set[int]], event_count: int,
                dlq_partitions: Iterable[int]) -> dict[str, set[int]]:
    """usage.dlq partition q to the owner of usage.events partition q modulo the count."""
    owner = {p: m for m, ps in events.items() for p in ps}
    placed: dict[str, set[int]] = {m: set() for m in events}
    for q in dlq_partitions:
        m = owner.get(q % event_count) if event_count else None
        if m is not None:
            placed[m].add(q)
    return placed


# the aiokafka side --------------------------------------------------------------------------


def warm_assignor(topics: Topics, claim: Callable[[], Claim]) -> type[AbstractPartitionAssignor]:
    """An assignor class for one consumer (aiokafka calls an assignor's classmethods, so
    the state it sends, `claim()` at each join, is bound into a class of its own)."""

    class WarmAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
        name = NAME
        version = 0

        @classmethod
        def metadata(cls, topics_: Iterable[str]) -> ConsumerProtocolMemberMetadata:
            return ConsumerProtocolMemberMetadata(cls.version, sorted(topics_), claim().encode())

        @classmethod
        def assign(cls, cluster: ClusterMetadata,
                   members: Mapping[str, ConsumerProtocolMemberMetadata],
                   ) -> dict[str, ConsumerProtocolMemberAssignment]:
            return assign(cluster, members, topics, cls.version)

        @classmethod
        def on_assignment(cls, assignment: ConsumerProtocolMemberAssignment) -> None:
            pass

    return WarmAssignor


def offered(warm: type[AbstractPartitionAssignor], standby: bool,
            ) -> tuple[type[AbstractPartitionAssignor], ...]:
    """The assignors an instance offers the group, preferred first (module doc)."""
    return (warm,) if standby else (warm, RoundRobinPartitionAssignor)


class StandbyRefused(ClusterError):
    """The group has no assignor in common with this instance: an instance of a version
    before the warm assignor offers round-robin only."""


def refused(group: str, standby: bool) -> ClusterError:
    """What the broker's InconsistentGroupProtocol means for this instance, and the fix."""
    if standby:
        return StandbyRefused(
            f"the consumer group {group} refused this standby: an instance in it offers "
            f"only round-robin (a projector from before the {NAME} assignor), under which "
            "a standby would be dealt partitions like an active instance. Upgrade every "
            "active projector instance first (a rolling restart; they offer both), then "
            "start the standby")
    return ClusterError(
        f"the consumer group {group} refused this projector: its members offer no "
        f"partition assignor in common with this one ({NAME}, roundrobin); is another "
        "program using the group's name?")


def assign(cluster: ClusterMetadata, members: Mapping[str, ConsumerProtocolMemberMetadata],
           topics: Topics, version: int = 0) -> dict[str, ConsumerProtocolMemberAssignment]:
    """The leader's assignment: `place` over usage.events, usage.dlq following it."""
    events = sorted(cluster.partitions_for_topic(topics.usage_events) or [])
    dlq = sorted(cluster.partitions_for_topic(topics.usage_dlq) or [])
    claims = {m: Claim.decode(meta.user_data) for m, meta in members.items()}
    placed = place(events, claims)
    with_dlq = dlq_follows(placed, len(events), dlq)
    log.info("projector group: placed %s", {m: sorted(ps) for m, ps in placed.items()})
    return {m: ConsumerProtocolMemberAssignment(
                version, [(t, sorted(ps)) for t, ps in ((topics.usage_events, placed[m]),
                                                       (topics.usage_dlq, with_dlq[m])) if ps],
                b"")
            for m in members}
