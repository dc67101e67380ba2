"""The ledger's dedupe without a key index: both ways of finding new hashes, a copy with
another occurred_at, a hash collision, and a DuckDB whose hash() changed."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from tally.services.projector import dedupe, store
from tests.projector.test_store import TOPIC, event, table


@pytest.fixture(params=["scan", "index"])
def con(request: pytest.FixtureRequest, tmp_path: Path) -> duckdb.DuckDBPyConnection:
    con = store.connect(tmp_path / "d.duckdb")
    if request.param == "index":
        store.index_event_ids(con)
    return con


def ledger_ids(con: duckdb.DuckDBPyConnection) -> list[str]:
    return sorted(r[0] for r in con.execute("SELECT event_id FROM ledger").fetchall())


def test_copies_count_once_wherever_they_fall(con: duckdb.DuckDBPyConnection) -> None:
    store.apply_batch(con, table(event("e1"), event("e2", day=3)), {(TOPIC, 0): 2})
    applied = store.apply_batch(con, table(event("e1"), event("e2", day=-20), event("e3")),
                                {(TOPIC, 0): 5})
    assert applied.new.column("event_id").to_pylist() == ["e3"]
    assert ledger_ids(con) == ["e1", "e2", "e3"]


def test_a_hash_collision_is_not_a_copy(con: duckdb.DuckDBPyConnection,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dedupe, "HASH", "42::UBIGINT")  # every event_id collides
    store.apply_batch(con, table(event("e1")), {})
    applied = store.apply_batch(con, table(event("e2"), event("e1", day=2)), {})
    assert applied.new.column("event_id").to_pylist() == ["e2"]
    assert ledger_ids(con) == ["e1", "e2"]


def test_a_changed_hash_rebuilds_event_ids(tmp_path: Path) -> None:
    con = store.connect(tmp_path / "d.duckdb")
    store.index_event_ids(con)
    store.apply_batch(con, table(event("e1"), event("e2")), {})
    con.execute("UPDATE hash_check SET probe = probe + 1")  # as if filled by another DuckDB
    con.execute("DELETE FROM event_ids")
    con.close()
    con = store.connect(tmp_path / "d.duckdb")
    assert con.execute("SELECT count(*) FROM event_ids").fetchall() == [(2,)]
    assert store.apply_batch(con, table(event("e1")), {}).new.num_rows == 0
