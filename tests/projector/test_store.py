"""The DuckDB store alone: dedupe, atomic batches, balances that equal the ledger."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from services.projector import store

T0 = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
DAY0 = datetime(2025, 3, 10, tzinfo=UTC)
MONTH0 = datetime(2025, 3, 1, tzinfo=UTC)
TOPIC = "t.usage.events"


def event(event_id: str, user: str = "alice", tokens: int = 10, day: int = 0,
          offset: int = 0, role: str | None = "dev") -> dict[str, Any]:
    return {
        "event_id": event_id, "user_id": user, "occurred_at": T0 + timedelta(days=day),
        "model": "m1", "provider": "p", "input_tokens": tokens, "output_tokens": 0,
        "cache_read_tokens": 0, "cache_write_tokens": 0, "tokens": tokens,
        "daily_start": DAY0 + timedelta(days=day), "monthly_start": MONTH0,
        "session_key": None, "channel": None, "source": None, "role": role,
        "department": None, "project": None, "topic_partition": 0, "topic_offset": offset,
    }


def table(*rows: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=store.LEDGER_ARROW)


@pytest.fixture
def con(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    return store.connect(tmp_path / "p.duckdb")


def balances(con: duckdb.DuckDBPyConnection) -> set[tuple[Any, ...]]:
    return set(con.execute("SELECT user_id, period, period_start, tokens FROM balances")
               .fetchall())


def recount(con: duckdb.DuckDBPyConnection) -> set[tuple[Any, ...]]:
    return set(con.execute("""
        SELECT user_id, 'daily', daily_start, sum(tokens) FROM ledger GROUP BY ALL
        UNION ALL
        SELECT user_id, 'monthly', monthly_start, sum(tokens) FROM ledger GROUP BY ALL
    """).fetchall())


def test_dedupe_within_a_batch(con: duckdb.DuckDBPyConnection) -> None:
    applied = store.apply_batch(con, table(event("e1"), event("e1", offset=1), event("e2")),
                                {(TOPIC, 0): 3})
    assert applied.new.num_rows == 2
    assert balances(con) == {("alice", "daily", DAY0, 20), ("alice", "monthly", MONTH0, 20)}


def test_dedupe_across_batches(con: duckdb.DuckDBPyConnection) -> None:
    store.apply_batch(con, table(event("e1"), event("e2")), {(TOPIC, 0): 2})
    applied = store.apply_batch(con, table(event("e2"), event("e3", user="bob")),
                                {(TOPIC, 0): 4})
    assert applied.users == {"bob"}
    assert ("alice", "daily", DAY0, 20) in balances(con)
    assert con.execute("SELECT count(*) FROM ledger").fetchone() == (3,)


def test_offsets_are_written_with_the_batch(con: duckdb.DuckDBPyConnection) -> None:
    store.apply_batch(con, table(event("e1")), {(TOPIC, 0): 7, (TOPIC, 1): 3})
    store.apply_batch(con, table(), {(TOPIC, 1): 5})
    assert store.load_offsets(con) == {(TOPIC, 0): 7, (TOPIC, 1): 5}


def test_balances_equal_the_sum_of_the_ledger(con: duckdb.DuckDBPyConnection) -> None:
    for b in range(5):
        rows = [event(f"e{(b * 7 + i) % 23}", user=f"u{i % 3}", tokens=i + b, day=i % 4)
                for i in range(10)]
        store.apply_batch(con, table(*rows), {(TOPIC, 0): (b + 1) * 10})
    assert balances(con) == recount(con)


def test_a_failed_batch_leaves_nothing(con: duckdb.DuckDBPyConnection) -> None:
    store.apply_batch(con, table(event("e1")), {(TOPIC, 0): 1})
    bad_offsets = {(TOPIC, 0): None}  # NOT NULL: fails on the last statement of the batch
    with pytest.raises(duckdb.Error):
        store.apply_batch(con, table(event("e2"), event("e3")), bad_offsets)  # type: ignore[dict-item]
    assert con.execute("SELECT count(*) FROM ledger").fetchone() == (1,)
    assert balances(con) == {("alice", "daily", DAY0, 10), ("alice", "monthly", MONTH0, 10)}
    assert store.load_offsets(con) == {(TOPIC, 0): 1}


def test_users_keep_the_latest_known_attributes(con: duckdb.DuckDBPyConnection) -> None:
    store.apply_batch(con, table(event("e1", role="dev"), event("e2", day=1, role=None)), {})
    store.apply_batch(con, table(event("e3", day=-1, role="ops")), {})
    row = con.execute("SELECT role, last_event_at FROM users").fetchone()
    assert row == ("dev", T0 + timedelta(days=1))


def test_rejected_rows_and_views(con: duckdb.DuckDBPyConnection) -> None:
    rejected = pa.Table.from_pylist([
        {"reason": "bad json", "source": "http", "original": "{", "rejected_at": T0,
         "partition": 0, "offset": 0},
        {"reason": "bad json", "source": "http", "original": "[", "rejected_at": T0,
         "partition": 0, "offset": 1},
    ], schema=store.REJECTED_ARROW)
    store.apply_batch(con, table(event("e1")), {("t.usage.dlq", 0): 2}, rejected)
    assert con.execute("SELECT reason, events FROM rejected_by_reason").fetchall() == [
        ("bad json", 2)]
    assert con.execute("SELECT model, tokens FROM usage_by_model").fetchall() == [("m1", 10)]
