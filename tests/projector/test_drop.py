"""The deletion of lost partitions outside the rebalance listener (drop.py): which to delete
after an assignment, the slices, and a partition regained in the middle of its deletion,
on a real DuckDB file without Kafka; and the audit's wait for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pytest

from tally.services.projector import store
from tally.services.projector.atrest import HELD_SQL
from tally.services.projector.audit import AuditError
from tally.services.projector.drop import (
    Lost,
    drop_all,
    drop_slice,
    marked,
    next_slice,
    reopen,
    still_to_drop,
)
from tally.services.projector.query import settled as audit_settled
from tally.topics import Topics
from tests.projector.test_store import event, table

TOPICS = Topics("t")
EVENTS = TOPICS.usage_events


def test_a_partition_regained_before_its_deletion_is_kept_and_a_lost_one_added() -> None:
    pending = Lost.of({1, 2}, {1})
    after = still_to_drop(pending, lost=Lost.of({4}, {4}), assigned=Lost.of({0, 2}, {0, 2}))
    assert after == Lost.of({1, 4}, {1, 4})
    assert not still_to_drop(after, Lost(), assigned=Lost.of({1, 4}, {1, 4}))


def test_a_slice_takes_whole_users_up_to_the_budget_and_at_least_one() -> None:
    rows = [("a", 3), ("b", 4), ("c", 1)]
    assert next_slice(rows, budget=7) == ["a", "b"]
    assert next_slice(rows, budget=2) == ["a"]  # never a user split, never nothing
    assert next_slice([], budget=2) == []


def history() -> list[dict[str, Any]]:
    """Users a, b, c in partition 0 (three events each), d in 1, whose event b copies."""
    rows = [{**event(f"{u}{i}", user=u, tokens=i + 1, offset=3 * n + i), "topic_partition": 0}
            for n, u in enumerate("abc") for i in range(3)]
    rows[4]["event_id"] = "shared"
    return [*rows, {**event("shared", user="d", tokens=7, offset=0), "topic_partition": 1}]


def fill(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
    for part in (1, 0):  # d's event first: b's copy of it is not counted
        mine = [r for r in rows if r["topic_partition"] == part]
        store.apply_batch(con, table(*mine), {(EVENTS, part): len(mine)})
    store.apply_batch(con, store.no_events(), {(TOPICS.usage_dlq, 0): 2})
    con.execute("INSERT INTO rejected VALUES ('bad', 'kafka:x', '{}', NULL, 0, 0)")


def contents(con: duckdb.DuckDBPyConnection) -> tuple[Any, ...]:
    """What the fold left in the file: ledger ids, balances, event id hashes."""
    return tuple(sorted(con.execute(sql).fetchall()) for sql in (
        "SELECT event_id, user_id FROM ledger",
        "SELECT user_id, period, period_start, tokens FROM balances",
        "SELECT h FROM event_ids"))


@pytest.fixture
def con(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    con = store.connect(tmp_path / "p.duckdb")
    fill(con, history())
    return con


def test_slices_delete_whole_users_and_the_offsets_last(con: duckdb.DuckDBPyConnection) -> None:
    lost = Lost.of({0}, {0})
    assert not drop_slice(con, TOPICS, lost, budget=3)
    # One user gone whole; the partition still held (the audit at rest sees it), marked.
    users = {u for (u,) in con.execute("SELECT DISTINCT user_id FROM ledger").fetchall()}
    assert users == {"b", "c", "d"} and marked(con) == {0}
    assert (EVENTS, 0, 9) in con.execute(HELD_SQL).fetchall()
    assert con.execute("SELECT count(*) FROM rejected").fetchone() == (0,)
    drop_all(con, TOPICS, lost, budget=3)
    assert con.execute(HELD_SQL).fetchall() == [(EVENTS, 1, 1)] and marked(con) == set()
    (ids, balances, hashes) = contents(con)
    assert ids == [("shared", "d")] and {b[0] for b in balances} == {"d"}
    # The id d's event shares with a deleted one stays known: d's event is still a copy.
    assert len(hashes) == 1


def test_a_partition_regained_mid_deletion_is_replayed_once(
        con: duckdb.DuckDBPyConnection, tmp_path: Path) -> None:
    whole = store.connect(tmp_path / "whole.duckdb")
    fill(whole, history())
    drop_slice(con, TOPICS, Lost.of({0}), budget=3)  # user a deleted, b and c left
    reopen(con, TOPICS, marked(con) & {0})
    assert (EVENTS, 0) not in store.load_offsets(con) and marked(con) == set()
    # Replayed from the beginning, as the live fold or the bulk restore would.
    replay = [r for r in history() if r["topic_partition"] == 0]
    store.apply_batch(con, table(*replay), {(EVENTS, 0): len(replay)})
    assert contents(con) == contents(whole)
    assert store.load_offsets(con)[(EVENTS, 0)] == 9


async def test_the_audit_waits_for_the_deletion_and_refuses_past_its_time_limit() -> None:
    asked: list[float] = []

    async def still(timeout: float) -> str | None:
        asked.append(timeout)
        return "partitions 2 of t.usage.events" if len(asked) > 1 else None

    await audit_settled(still, 5.0)  # nothing left: the query runs
    with pytest.raises(AuditError, match="still deleting partitions 2 of") as refused:
        await audit_settled(still, 5.0)
    assert refused.value.status == 503 and asked == [5.0, 5.0]
