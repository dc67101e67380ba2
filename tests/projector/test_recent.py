"""The recent event ids (RecentIds) beside the DuckDB store: inside the window a copy is
found in memory; older than the window the window declines and DuckDB finds it; a restart
loads the window from the ledger. The projector's recovery when DuckDB disagrees is in
test_projector_kafka.py."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import duckdb
import pyarrow as pa

from tally.services.projector import store
from tally.services.projector.recent import SPAN, RecentIds
from tests.projector.test_store import T0, TOPIC, event, table

NOW = T0 + timedelta(minutes=1)  # the events of test_store.event(day=0) are a minute old


def ids(rows: pa.Table | None) -> set[str]:
    assert rows is not None, "the window declined a batch of recent events"
    return set(rows.column("event_id").to_pylist())


def stored_new(con: duckdb.DuckDBPyConnection, rows: pa.Table) -> set[str]:
    """What DuckDB's own dedupe finds new (its transaction rolled back)."""
    applied = store.begin_batch(con, store.first_of_each(rows))
    con.execute("ROLLBACK")
    return ids(applied.new)


def test_a_copy_inside_the_window_is_counted_once(tmp_path: Path) -> None:
    con = store.connect(tmp_path / "p.duckdb")
    recent = RecentIds.load(con, NOW)
    first = recent.new_of(table(event("a"), event("b", offset=1)), NOW)
    assert ids(first) == {"a", "b"}
    assert first is not None
    store.apply_batch(con, first, {(TOPIC, 0): 2})
    copies = table(event("a", offset=2), event("c", offset=3), event("b", offset=4))
    assert ids(recent.new_of(copies, NOW)) == {"c"}
    assert stored_new(con, copies) == {"c"}  # DuckDB, the authority, agrees
    assert ids(recent.new_of(table(event("c", offset=5)), NOW)) == set()  # judged, not yet stored


def test_a_copy_older_than_the_window_is_left_to_duckdb(tmp_path: Path) -> None:
    con = store.connect(tmp_path / "p.duckdb")
    recent = RecentIds.load(con, NOW)
    first = recent.new_of(table(event("a")), NOW)
    assert first is not None
    store.apply_batch(con, first, {(TOPIC, 0): 1})
    later = NOW + SPAN + timedelta(minutes=2)  # "a" is now older than the window
    copy_and_new = table(event("a", offset=1), event("d", offset=2, day=1))
    assert recent.new_of(copy_and_new, later) is None
    assert recent.floor > event("a")["occurred_at"]
    assert stored_new(con, copy_and_new) == {"d"}
    assert len(recent) == 0  # the minute of "a" was forgotten


def test_a_restart_loads_the_window_from_the_ledger(tmp_path: Path) -> None:
    path = tmp_path / "p.duckdb"
    con = store.connect(path)
    store.apply_batch(con, table(event("a"), event("b", offset=1, day=-1)), {(TOPIC, 0): 2})
    con.close()
    reopened = store.connect(path)
    recent = RecentIds.load(reopened, NOW)
    assert len(recent) == 1  # "a"; "b" happened a day before the window
    assert ids(recent.new_of(table(event("a", offset=2), event("e", offset=3)), NOW)) == {"e"}
    assert recent.new_of(table(event("b", offset=4, day=-1)), NOW) is None
