"""Which events of a batch the ledger does not hold yet: the projector's exactly-once key.

An event counts once by `event_id`, whatever else a copy says (the core's rule). The ledger
has no key index: checking a VARCHAR primary key on every insert cost ~5 us an event, more
than all the rest of the write. Instead `event_ids` holds one 64-bit hash per stored
event_id, and a batch is checked against it in two steps:

1. Hashes not in `event_ids` are new events, certainly. With the unique index the live
   projector builds (`index_event_ids`), that is an INSERT ... ON CONFLICT DO NOTHING
   RETURNING (microseconds for a small batch at any history size); without it, as during
   `tally replay` into a fresh file, an anti-join that scans the 8-byte hashes (~8 ns a
   stored event per batch, so replay reads big batches), then a plain append.
2. A hash already there is a copy or, rarely, a collision: it is compared by `event_id`
   against the ledger, first among the rows of the same `occurred_at` range (a resend
   carries the same one, and the min/max zone maps skip the rest of the ledger), then,
   for what is still unexplained, against the whole ledger.

The hash is DuckDB's `hash()`, which a DuckDB upgrade may change: `store_hash_check` keeps
the hash of a fixed string, and `connect` rebuilds `event_ids` from the ledger when it
differs.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["EVENT_IDS_SQL", "index_event_ids", "not_stored", "rehash_if_changed"]

HASH = "hash(event_id)"
_PROBE = "tally event_ids hash check"

EVENT_IDS_SQL = """
CREATE TABLE IF NOT EXISTS event_ids (h UBIGINT NOT NULL);  -- hash() of each ledger event_id
CREATE TABLE IF NOT EXISTS hash_check (probe UBIGINT NOT NULL);
"""
_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS event_ids_h ON event_ids (h)"
# Per connection (or cursor): whether event_ids has its index, asked once (a statement
# costs a millisecond or more on a busy machine, as much as a small batch's whole check).
_KNOWN: WeakKeyDictionary[duckdb.DuckDBPyConnection, bool] = WeakKeyDictionary()


def index_event_ids(con: duckdb.DuckDBPyConnection) -> None:
    """The unique index that makes step 1 a point lookup (the live projector's case)."""
    con.execute(_INDEX)
    _KNOWN[con] = True


def rehash_if_changed(con: duckdb.DuckDBPyConnection) -> None:
    """Rebuild event_ids if this DuckDB hashes differently from the one that filled it."""
    probe = con.execute("SELECT hash($1)", [_PROBE]).fetchall()[0][0]
    stored = con.execute("SELECT probe FROM hash_check").fetchall()
    if stored == [(probe,)]:
        return
    indexed = _indexed(con)
    _KNOWN.pop(con, None)
    con.execute("BEGIN TRANSACTION")
    con.execute("DROP INDEX IF EXISTS event_ids_h")
    con.execute("DELETE FROM event_ids")
    con.execute(f"INSERT INTO event_ids SELECT DISTINCT {HASH} FROM ledger")
    con.execute("DELETE FROM hash_check")
    con.execute("INSERT INTO hash_check VALUES ($1)", [probe])
    con.execute("COMMIT")
    if indexed:
        index_event_ids(con)


def not_stored(con: duckdb.DuckDBPyConnection, events: pa.Table) -> pa.Table:
    """The rows of `events` (distinct event_ids) whose event_id the ledger lacks; their
    hashes are recorded in event_ids. Runs inside the caller's transaction."""
    con.register("batch_ids", events.select(["event_id", "occurred_at"]))
    try:
        fresh = _record_new_hashes(con)
        if len(fresh) == events.num_rows:
            return events  # the usual case: every hash is new
        stored = _stored_ids(con, fresh)
    finally:
        con.unregister("batch_ids")
    if not len(stored):
        return events
    return events.filter(pc.invert(pc.is_in(events.column("event_id"), value_set=stored)))


def _indexed(con: duckdb.DuckDBPyConnection) -> bool:
    known = _KNOWN.get(con)
    if known is None:
        rows = con.execute("SELECT count(*) FROM duckdb_indexes() "
                           "WHERE index_name = 'event_ids_h'").fetchall()
        known = _KNOWN[con] = bool(rows[0][0])
    return known


def _record_new_hashes(con: duckdb.DuckDBPyConnection) -> pa.Array:
    """Step 1: the hashes event_ids did not hold, now added to it."""
    if _indexed(con):
        return _column(con.sql(f"INSERT INTO event_ids SELECT DISTINCT {HASH} FROM batch_ids "
                               "ON CONFLICT DO NOTHING RETURNING h"))
    fresh = con.sql(f"SELECT DISTINCT h FROM (SELECT {HASH} AS h FROM batch_ids) "
                    "ANTI JOIN event_ids USING (h)").to_arrow_table()
    con.register("batch_fresh", fresh)
    try:
        con.execute("INSERT INTO event_ids SELECT h FROM batch_fresh")
    finally:
        con.unregister("batch_fresh")
    return fresh.column(0).combine_chunks()


def _stored_ids(con: duckdb.DuckDBPyConnection, fresh: pa.Array) -> pa.Array:
    """Step 2: of the rows whose hash was known, the event_ids the ledger really holds."""
    con.register("batch_fresh", pa.table({"h": fresh}))
    try:
        suspects = con.sql(f"SELECT event_id, occurred_at FROM batch_ids "
                           f"WHERE {HASH} NOT IN (SELECT h FROM batch_fresh)").to_arrow_table()
    finally:
        con.unregister("batch_fresh")
    earliest, latest = (v.as_py() for v in pc.min_max(suspects.column("occurred_at")).values())
    con.register("batch_suspects", suspects)
    try:
        nearby = _column(con.sql(
            "SELECT event_id FROM batch_suspects SEMI JOIN (SELECT event_id FROM ledger "
            "WHERE occurred_at BETWEEN $1 AND $2) USING (event_id)",
            params=[earliest, latest]))
        if len(nearby) == suspects.num_rows:
            return nearby
        anywhere = _column(con.sql("SELECT event_id FROM batch_suspects "
                                   "SEMI JOIN ledger USING (event_id)"))
        return anywhere
    finally:
        con.unregister("batch_suspects")


def _column(relation: duckdb.DuckDBPyRelation) -> pa.Array:
    return relation.to_arrow_table().column(0).combine_chunks()
