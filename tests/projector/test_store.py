"""The DuckDB store alone (no Kafka): dedupe, atomic batches, balances that equal the
ledger, the migration of files written before a period kind, and the audit's read-only
rule. Its equality with the core's fold is tests/core/test_stores.py's property."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import orjson
import pyarrow as pa
import pytest

from tally.config.models import Limits, PerUserBudgets, ResetSchedule
from tally.core.periods import Calendar
from tally.core.usage import fold_events
from tally.kafka import Record
from tally.services.projector import store
from tally.services.projector.audit import AuditError, run_query, to_json
from tally.services.projector.decode import Decoder
from tally.wire import PERIOD_NAMES, UsageRecorded

T0 = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
DAY0 = datetime(2025, 3, 10, tzinfo=UTC)
MONTH0 = datetime(2025, 3, 1, tzinfo=UTC)
TOPIC = "t.usage.events"
CALENDAR = Calendar(ResetSchedule())


def event(event_id: str, user: str = "alice", tokens: int = 10, day: int = 0,
          offset: int = 0, role: str | None = "dev") -> dict[str, Any]:
    return {
        "event_id": event_id, "user_id": user, "occurred_at": T0 + timedelta(days=day),
        "model": "m1", "provider": "p", "input_tokens": tokens, "output_tokens": 0,
        "cache_read_tokens": 0, "cache_write_tokens": 0, "tokens": tokens,
        **starts(T0 + timedelta(days=day)),
        "session_key": None, "channel": None, "source": None, "role": role,
        "department": None, "project": None, "topic_partition": 0, "topic_offset": offset,
    }


def starts(at: datetime) -> dict[str, datetime]:
    return {store.start_column(w.kind): w.start for w in CALENDAR.windows_at(at)}


def table(*rows: dict[str, Any]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=store.LEDGER_ARROW)


@pytest.fixture
def con(tmp_path: Path) -> duckdb.DuckDBPyConnection:
    return store.connect(tmp_path / "p.duckdb")


def balances(con: duckdb.DuckDBPyConnection) -> set[tuple[Any, ...]]:
    return set(con.execute("SELECT user_id, period, period_start, tokens FROM balances")
               .fetchall())


def recount(con: duckdb.DuckDBPyConnection) -> set[tuple[Any, ...]]:
    return set(con.execute(" UNION ALL ".join(
        f"SELECT user_id, '{kind}', {kind}_start, sum(tokens) FROM ledger GROUP BY ALL"
        for kind in PERIOD_NAMES)).fetchall())


def test_dedupe_within_a_batch(con: duckdb.DuckDBPyConnection) -> None:
    applied = store.apply_batch(con, table(event("e1"), event("e1", offset=1), event("e2")),
                                {(TOPIC, 0): 3})
    assert applied.new.num_rows == 2
    assert balances(con) == {("alice", "daily", DAY0, 20), ("alice", "weekly", DAY0, 20),
                             ("alice", "monthly", MONTH0, 20)}


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
    assert balances(con) == {("alice", "daily", DAY0, 10), ("alice", "weekly", DAY0, 10),
                             ("alice", "monthly", MONTH0, 10)}
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


def test_a_bad_record_is_skipped(con: duckdb.DuckDBPyConnection) -> None:
    budgets = PerUserBudgets(default_limits=Limits(daily_tokens=1, monthly_tokens=1))
    good = UsageRecorded(event_id="e1", user_id="u", occurred_at=T0, model="m",
                         input_tokens=1, output_tokens=2)
    records = [Record(TOPIC, 0, 0, None, b"{not json", 0),
               Record(TOPIC, 0, 1, None, b'{"event_id": "x"}', 0),
               Record(TOPIC, 0, 2, None, good.model_dump_json().encode(), 0)]
    table, skipped = Decoder.of(budgets).events(records)
    assert table.column("event_id").to_pylist() == ["e1"]
    assert [(r.offset, reason.split(":")[0]) for r, reason in skipped] == [
        (0, "projector"), (1, "projector")]


@pytest.mark.parametrize("sql", [
    "DELETE FROM ledger", "EXPLAIN ANALYZE DELETE FROM ledger", "SELECT 1; DROP TABLE ledger",
    "ATTACH 'x.db'", "COPY ledger TO 'x.csv'", "SET threads = 1", "SELEC 1",
])
def test_audit_refuses_anything_but_one_read(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    with pytest.raises(AuditError):
        run_query(con.cursor(), sql)
    assert con.execute("SELECT count(*) FROM offsets").fetchone() == (0,)


def test_audit_runs_reads(con: duckdb.DuckDBPyConnection) -> None:
    store.apply_batch(con, table(event("e1"), event("e2", user="bob")), {})
    result = run_query(con.cursor(), "SELECT user_id, tokens FROM this_month ORDER BY 1", 1)
    assert (result.columns, result.rows, result.truncated) == (
        ["user_id", "tokens"], [("alice", 10)], True)
    assert run_query(con.cursor(), "EXPLAIN SELECT * FROM ledger").rows


def test_current_periods_has_each_kind_of_period_holding_now(
        con: duckdb.DuckDBPyConnection) -> None:
    store.apply_batch(con, table(event("e1", day=-40), event("e2", tokens=7)), {})
    rows = con.execute("SELECT user_id, role, period, period_start, tokens FROM current_periods"
                       ).fetchall()
    assert sorted(rows) == sorted(
        ("alice", "dev", kind, start, 7) for kind, start in
        ((w.kind, w.start) for w in CALENDAR.windows_at(T0)))


def test_audit_answers_integers_past_64_bits_as_text(con: duckdb.DuckDBPyConnection) -> None:
    """A HUGEINT sum (of hashes here) once made the endpoint answer 500: orjson refuses it."""
    sql = "SELECT sum(hash(range)) AS big, [sum(hash(range))] AS listed, 1 AS small " \
          "FROM range(10)"
    body = orjson.loads(to_json(run_query(con.cursor(), sql)))
    big, listed, small = body["rows"][0]
    assert int(big) > 2**64 and listed == [big] and small == 1


# files written before a period kind existed ------------------------------------------------

# The ledger and balances as store.py wrote them before period kinds were data (the file a
# projector of that version leaves); OLD_KINDS are the kinds it had.
OLD_KINDS = ("daily", "monthly")
OLD_SCHEMA = """
CREATE TABLE ledger (
    event_id VARCHAR NOT NULL, user_id VARCHAR NOT NULL, occurred_at TIMESTAMPTZ NOT NULL,
    model VARCHAR NOT NULL, provider VARCHAR, input_tokens BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL, cache_read_tokens BIGINT NOT NULL,
    cache_write_tokens BIGINT NOT NULL, tokens BIGINT NOT NULL,
    daily_start TIMESTAMPTZ NOT NULL,
    monthly_start TIMESTAMPTZ NOT NULL,
    session_key VARCHAR, channel VARCHAR, source VARCHAR, role VARCHAR, department VARCHAR,
    project VARCHAR, topic_partition INTEGER NOT NULL, topic_offset BIGINT NOT NULL);
CREATE TABLE balances (
    user_id VARCHAR NOT NULL, period VARCHAR NOT NULL, period_start TIMESTAMPTZ NOT NULL,
    tokens BIGINT NOT NULL, PRIMARY KEY (user_id, period, period_start));
CREATE TABLE offsets (topic VARCHAR NOT NULL, partition INTEGER NOT NULL,
    next_offset BIGINT NOT NULL, PRIMARY KEY (topic, partition));
CREATE VIEW old_users AS SELECT user_id, max(occurred_at) AS last_event_at FROM ledger
    GROUP BY ALL;
"""
MIGRATION_BUDGETS = PerUserBudgets(
    default_limits=Limits(daily_tokens=1, monthly_tokens=1),
    reset_schedule=ResetSchedule(timezone="America/New_York", monthly_reset_day=31))


def migration_events() -> list[UsageRecorded]:
    """Across a month end and a DST change in New York, with labels."""
    return [UsageRecorded(event_id=f"e{i}", user_id=f"u{i % 3}", model="m",
                          occurred_at=datetime(2026, 2, 20, tzinfo=UTC) + timedelta(hours=37 * i),
                          input_tokens=10 * i, output_tokens=1, role=(None, "dev")[i % 2])
                     for i in range(40)]


def old_file(path: Path, kinds: tuple[str, ...]) -> None:
    """A store written by the old code, with only `kinds` (a subset of OLD_KINDS)."""
    schema = OLD_SCHEMA
    for kind in set(OLD_KINDS) - set(kinds):
        schema = schema.replace(f"{kind}_start TIMESTAMPTZ NOT NULL,", "")
    records = [Record(TOPIC, 0, i, None, e.model_dump_json().encode(), 0)
               for i, e in enumerate(migration_events())]
    rows, _ = Decoder.of(MIGRATION_BUDGETS).events(records)
    rows = rows.select([n for n in rows.column_names
                        if not n.endswith("_start") or n[:-6] in kinds])
    with duckdb.connect(str(path)) as old:
        old.execute(schema)
        old.execute("INSERT INTO ledger BY NAME SELECT * FROM rows")
        for kind in kinds:
            old.execute(f"INSERT INTO balances SELECT user_id, '{kind}', {kind}_start, "
                        "sum(tokens) FROM ledger GROUP BY ALL")
        old.execute("INSERT INTO offsets VALUES (?, 0, ?)", [TOPIC, len(records)])


@pytest.mark.parametrize("kinds", [OLD_KINDS, *((k,) for k in OLD_KINDS)],
                         ids=lambda kinds: "+".join(kinds))
def test_an_old_file_is_migrated_in_place(tmp_path: Path, kinds: tuple[str, ...]) -> None:
    """Opened by the projector, a file written without some period kinds gains each one's
    ledger column and balances, as if it had always been folded with them."""
    path = tmp_path / "old.duckdb"
    old_file(path, kinds)
    schedule = MIGRATION_BUDGETS.reset_schedule
    with store.connect(path, schedule=schedule) as con:
        assert balances(con) == recount(con)
        assert {kind for (kind,) in con.execute("SELECT DISTINCT period FROM balances")
                .fetchall()} == set(PERIOD_NAMES)
        assert store.load_usages(con) == fold_events(migration_events(), MIGRATION_BUDGETS)
        assert store.load_offsets(con) == {(TOPIC, 0): 40}
        assert con.execute("SELECT count(*) FROM old_users").fetchone() == (3,)
    with store.connect(path, schedule=schedule) as con:  # a second open changes nothing
        assert store.load_usages(con) == fold_events(migration_events(), MIGRATION_BUDGETS)


def test_a_file_needing_a_migration_is_refused_without_a_schedule(tmp_path: Path) -> None:
    path = tmp_path / "old.duckdb"
    old_file(path, ("daily",))
    with pytest.raises(store.StoreError, match="monthly"):
        store.connect(path)
    with duckdb.connect(str(path), read_only=True) as con:  # untouched
        assert con.execute("SELECT DISTINCT period FROM balances").fetchall() == [("daily",)]


def test_an_old_file_folds_on_after_its_migration(tmp_path: Path) -> None:
    """Batches applied after the migration add to the migrated balances and mirror."""
    path = tmp_path / "old.duckdb"
    old_file(path, ("daily",))
    later = [UsageRecorded(event_id=f"late{i}", user_id="u1", model="m", input_tokens=5,
                           output_tokens=0, occurred_at=datetime(2026, 3, 30, i, tzinfo=UTC))
             for i in range(3)]
    records = [Record(TOPIC, 0, 40 + i, None, e.model_dump_json().encode(), 0)
               for i, e in enumerate([*later, migration_events()[0]])]
    with store.connect(path, schedule=MIGRATION_BUDGETS.reset_schedule) as con:
        duck = store.DuckDBStore(con)
        mirror = duck.load_usages()
        applied = duck.begin(Decoder.of(MIGRATION_BUDGETS).events(records)[0])
        mirror.update(store.with_rows(mirror, applied.new))
        duck.finish(applied, {(TOPIC, 0): 44})
        folded = fold_events([*migration_events(), *later], MIGRATION_BUDGETS)
        assert duck.load_usages() == mirror == folded
        assert balances(con) == recount(con)


def test_a_changed_schedule_recuts_every_period(tmp_path: Path) -> None:
    """Folded under New York's schedule, opened under Tokyo's with another reset time and
    reset days: every period is cut anew, as if the events had been folded under Tokyo's;
    opened again under the same schedule, nothing changes."""
    path = tmp_path / "p.duckdb"
    events = migration_events()
    records = [Record(TOPIC, 0, i, None, e.model_dump_json().encode(), 0)
               for i, e in enumerate(events)]
    with store.connect(path, schedule=MIGRATION_BUDGETS.reset_schedule) as con:
        store.DuckDBStore(con).apply(Decoder.of(MIGRATION_BUDGETS).events(records)[0],
                                     {(TOPIC, 0): len(records)})
    tokyo = MIGRATION_BUDGETS.model_copy(update={"reset_schedule": ResetSchedule(
        timezone="Asia/Tokyo", daily_reset_time="06:30", monthly_reset_day=15,
        weekly_reset_day="thursday")})
    with store.connect(path, schedule=tokyo.reset_schedule) as con:
        assert store.load_usages(con) == fold_events(events, tokyo)
        assert balances(con) == recount(con)
        assert store.load_offsets(con) == {(TOPIC, 0): len(records)}
        assert not store.follow_schedule(con, tokyo.reset_schedule)
    with store.connect(path, schedule=MIGRATION_BUDGETS.reset_schedule) as con:  # and back
        assert store.load_usages(con) == fold_events(events, MIGRATION_BUDGETS)


def test_changed_counted_tokens_count_every_stored_event_anew(tmp_path: Path) -> None:
    """Folded counting every kind of token, opened counting output tokens only: every
    stored event is counted anew, as the fold (and a replay) under the new config would;
    opened again the same way, nothing changes; and back."""
    path = tmp_path / "p.duckdb"
    events = [e.model_copy(update={"output_tokens": 3 + i, "cache_read_tokens": 100})
              for i, e in enumerate(migration_events())]
    records = [Record(TOPIC, 0, i, None, e.model_dump_json().encode(), 0)
               for i, e in enumerate(events)]
    every = MIGRATION_BUDGETS
    with store.connect(path, schedule=every.reset_schedule,
                       counted=every.counted_tokens) as con:
        store.DuckDBStore(con).apply(Decoder.of(every).events(records)[0],
                                     {(TOPIC, 0): len(records)})
        assert store.load_usages(con) == fold_events(events, every)
    output_only = every.model_copy(update={"counted_tokens": ("output_tokens",)})
    with store.connect(path, schedule=every.reset_schedule,
                       counted=output_only.counted_tokens) as con:
        assert store.load_usages(con) == fold_events(events, output_only)
        assert store.load_usages(con) != fold_events(events, every)
        assert balances(con) == recount(con)
        assert store.load_offsets(con) == {(TOPIC, 0): len(records)}
        assert not store.follow_counting(con, output_only.counted_tokens)
    with store.connect(path, schedule=every.reset_schedule,
                       counted=every.counted_tokens) as con:
        assert store.load_usages(con) == fold_events(events, every)
