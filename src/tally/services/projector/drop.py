"""Deleting from an active instance's file the partitions it lost, outside the rebalance
listener.

aiokafka sends no heartbeat while a rebalance listener runs, so a deletion inside it (500,000
ledger rows took long enough for both instances of a benchmark to drop out of the group)
could outlast the session timeout. So the listener only records the loss (`still_to_drop`)
and stops reading it; `drop_slice` then deletes, a slice of users at a time, each slice one
transaction under the projector's writing lock, so the live batches of the owned
partitions wait for one slice at most and the group's heartbeats go on.

Every state a slice commits is one the projector can go on from (a user's rows, balances
and event id hashes go together, so a user is in the file whole or not at all):

- The first slice marks the usage.events partitions as being dropped (`DROPPING`, in
  store_settings) and deletes the lost usage.dlq partitions whole (their rejected rows
  and offsets: few). The offsets of a usage.events partition go with its last slice, so
  until then the file still says it holds it and the audit of files at rest (atrest.py)
  refuses to count it twice.
- A partition regained before its deletion began is kept as it is (its rows and offset
  agree). One regained (or given back after a restart) once marked is `reopen`ed: its
  offset and mark are deleted, so it is replayed from the beginning; the users still in
  the file are found by the ledger-wide dedupe by event_id, and the deleted ones written
  again, so each event is counted once.
- A file stopped mid-deletion keeps the mark: the instance claims nothing of those
  partitions when it joins (assignor.py), and the next assignment deletes on or reopens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import duckdb

from tally.services.projector import store
from tally.topics import Topics

__all__ = ["DROPPING", "SLICE_ROWS", "Lost", "drop_all", "drop_slice", "marked", "next_slice",
           "reopen", "still_to_drop"]

# Ledger rows deleted per transaction: what a live batch may wait for (tens of milliseconds).
SLICE_ROWS = 50_000
# The store setting naming the usage.events partitions whose deletion has begun.
DROPPING = "dropping_partitions"


@dataclass(frozen=True)
class Lost:
    """Partitions of usage.events and of usage.dlq."""

    events: frozenset[int] = frozenset()
    dlq: frozenset[int] = frozenset()

    @classmethod
    def of(cls, events: Iterable[int] = (), dlq: Iterable[int] = ()) -> Lost:
        return cls(frozenset(events), frozenset(dlq))

    def __bool__(self) -> bool:
        return bool(self.events or self.dlq)


def still_to_drop(pending: Lost, lost: Lost, assigned: Lost) -> Lost:
    """After an assignment: the partitions to delete, those pending or just `lost`, but
    none `assigned` now (a partition regained is kept: `reopen` if its deletion began)."""
    return Lost(frozenset((pending.events | lost.events) - assigned.events),
                frozenset((pending.dlq | lost.dlq) - assigned.dlq))


def next_slice(rows_per_user: Sequence[tuple[str, int]], budget: int = SLICE_ROWS) -> list[str]:
    """The users, in the order given, whose rows make up the next slice: up to `budget`
    rows, at least one user (a user's rows are never split)."""
    chosen: list[str] = []
    total = 0
    for user, rows in rows_per_user:
        if chosen and total + rows > budget:
            break
        chosen.append(user)
        total += rows
    return chosen


# the file's side ----------------------------------------------------------------------------


def marked(con: duckdb.DuckDBPyConnection) -> set[int]:
    """The usage.events partitions whose deletion began and has not ended."""
    value = store.setting(con, DROPPING)
    return {int(p) for p in value.split(",") if p} if value else set()


def _mark(con: duckdb.DuckDBPyConnection, partitions: set[int]) -> None:
    store.record_setting(con, DROPPING, ",".join(map(str, sorted(partitions))))


def _in(partitions: Iterable[int]) -> str:
    return ", ".join(map(str, sorted(partitions))) or "NULL"


def drop_slice(con: duckdb.DuckDBPyConnection, topics: Topics, lost: Lost,
               budget: int = SLICE_ROWS) -> bool:
    """Delete, in one transaction, the next slice of what the file holds of `lost`: the
    usage.dlq partitions whole (rejected rows, offsets), then users of the usage.events
    partitions (balances, ledger rows, event id hashes no kept row shares), and once none
    is left their offsets. True once nothing of `lost` is left."""
    ev, dl = _in(lost.events), _in(lost.dlq)
    with store.transaction(con):
        if lost.events:
            _mark(con, marked(con) | set(lost.events))
        if lost.dlq:
            con.execute(f"DELETE FROM rejected WHERE partition IN ({dl})")
            con.execute(f"DELETE FROM offsets WHERE topic = ? AND partition IN ({dl})",
                        [topics.usage_dlq])
        users = next_slice(con.execute(
            f"SELECT user_id, count(*) FROM ledger WHERE topic_partition IN ({ev}) "
            "GROUP BY user_id ORDER BY user_id").fetchall(), budget)
        if users:
            _drop_users(con, users, ev)
        elif lost.events:
            con.execute(f"DELETE FROM offsets WHERE topic = ? AND partition IN ({ev})",
                        [topics.usage_events])
            _mark(con, marked(con) - set(lost.events))
    return not users


def _drop_users(con: duckdb.DuckDBPyConnection, users: list[str], ev: str) -> None:
    slice_rows = f"user_id IN (SELECT unnest(?::VARCHAR[])) AND topic_partition IN ({ev})"
    con.execute("DELETE FROM balances WHERE user_id IN (SELECT unnest(?::VARCHAR[]))", [users])
    # A hash another kept event shares stays: dedupe must still know that event.
    con.execute(f"""DELETE FROM event_ids WHERE h IN (
                        SELECT hash(event_id) FROM ledger WHERE {slice_rows}
                        EXCEPT
                        SELECT hash(event_id) FROM ledger WHERE NOT ({slice_rows}))""",
                [users, users])
    con.execute(f"DELETE FROM ledger WHERE {slice_rows}", [users])


def drop_all(con: duckdb.DuckDBPyConnection, topics: Topics, lost: Lost,
             budget: int = SLICE_ROWS) -> None:
    """Every slice of `lost`, one after the other (a file no projector runs on)."""
    while not drop_slice(con, topics, lost, budget):
        pass


def reopen(con: duckdb.DuckDBPyConnection, topics: Topics, partitions: set[int]) -> None:
    """Regained partitions whose deletion began: their offsets and mark are deleted, so
    they are replayed from the beginning (the users left in the file are deduplicated)."""
    if not partitions:
        return
    with store.transaction(con):
        con.execute(f"DELETE FROM offsets WHERE topic = ? AND partition IN ({_in(partitions)})",
                    [topics.usage_events])
        _mark(con, marked(con) - partitions)
