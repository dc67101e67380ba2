"""The files of stopped projector instances audited together (atrest.py): the rule, and
`tally audit --db A --db B` on real DuckDB files, refused when two hold a partition."""

from __future__ import annotations

from pathlib import Path

import pytest

from tally.cli import main
from tally.services.projector import store
from tally.services.projector.atrest import check_disjoint, shared
from tally.services.projector.query import AuditError
from tests.projector.test_store import TOPIC, event, table

DLQ = "t.usage.dlq"


def test_no_partition_held_twice_passes() -> None:
    held = {"a.duckdb": [(TOPIC, 0, 10), (TOPIC, 2, 5), (DLQ, 0, 1)],
            "b.duckdb": [(TOPIC, 1, 7), (DLQ, 1, 3)]}
    assert shared(held) == {}
    check_disjoint(held)


def test_partitions_held_twice_are_found_with_how_far_each_file_holds_them() -> None:
    held = {"a.duckdb": [(TOPIC, 0, 10), (TOPIC, 1, 4)], "b.duckdb": [(TOPIC, 1, 7)],
            "s.duckdb": [(TOPIC, 0, 9), (TOPIC, 1, 7), (DLQ, 0, 2)],
            "c.duckdb": [(DLQ, 0, 2)]}
    assert shared(held) == {(DLQ, 0): {"s.duckdb": 2, "c.duckdb": 2},
                            (TOPIC, 0): {"a.duckdb": 10, "s.duckdb": 9},
                            (TOPIC, 1): {"a.duckdb": 4, "b.duckdb": 7, "s.duckdb": 7}}


def test_the_refusal_names_the_files_and_the_partition() -> None:
    with pytest.raises(AuditError) as refused:
        check_disjoint({"data/a.duckdb": [(TOPIC, 3, 120), (TOPIC, 4, 9)],
                        "data/b.duckdb": [(TOPIC, 3, 200), (TOPIC, 4, 9)]})
    said = str(refused.value)
    assert said.startswith("data/a.duckdb (to offset 120) and data/b.duckdb (to offset 200) "
                           f"both hold partition 3 of {TOPIC}, and 1 more partition is held "
                           "twice: audited together, their events would be counted twice")
    assert "tally audit --instances" in said


def a_file(db: Path, partition: int, *event_ids: str) -> Path:
    """A projector's file holding `event_ids` of one usage.events partition."""
    rows = [event(e, user=f"u{partition}", offset=n) | {"topic_partition": partition}
            for n, e in enumerate(event_ids)]
    with store.connect(db) as con:
        store.DuckDBStore(con).apply(table(*rows), {(TOPIC, partition): len(rows)})
    return db


def test_tally_audit_over_disjoint_files_answers_each_files_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = a_file(tmp_path / "a.duckdb", 0, "e1", "e2")
    b = a_file(tmp_path / "b.duckdb", 1, "e3")
    sql = "SELECT count(*) AS events FROM ledger"
    assert main(["audit", sql, "--db", str(a), "--db", str(b), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["db,events", f"{a},2", f"{b},1"]


def test_tally_audit_refuses_files_holding_the_same_partition(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One instance stopped owning partition 0; the other took it over and then stopped.
    a = a_file(tmp_path / "a.duckdb", 0, "e1", "e2")
    b = a_file(tmp_path / "b.duckdb", 0, "e1", "e2", "e3")
    assert main(["audit", "SELECT count(*) FROM ledger", "--db", str(a), "--db", str(b)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"tally audit: {a} (to offset 2) and {b} (to offset 3) both hold "
                          f"partition 0 of {TOPIC}: audited together")
    assert len(err.splitlines()) == 1
