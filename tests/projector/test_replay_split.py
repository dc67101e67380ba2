"""Replay survives an event that fails the fold (no Kafka: the write stage alone, on a real
DuckDB file): the batch is split, the event at fault skipped and logged by partition and
offset, every other event counted once, the batch's offsets stored."""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb
import orjson
import pytest

from tally.kafka import Record
from tally.services.projector import store
from tally.services.projector.app import Decoded
from tally.services.projector.decode import Decoder
from tally.services.projector.replay import apply_or_split
from tally.topics import Topics
from tests.ingest.helpers import make_config, usage

TOPICS = Topics("t")


def poisoned_store(path: Path) -> duckdb.DuckDBPyConnection:
    """A store whose ledger refuses the event "poison": a fault of the write, not of the
    decode (which every other test of bad input reaches first)."""
    con = duckdb.connect(str(path))
    con.execute(store.SCHEMA_SQL.replace(
        "event_id VARCHAR NOT NULL,", "event_id VARCHAR NOT NULL CHECK (event_id <> 'poison'),"))
    con.close()
    return store.connect(path)


def batch(event_ids: list[str]) -> Decoded:
    records = [Record(TOPICS.usage_events, 0, offset, None,
                      orjson.dumps(usage(event_id, input_tokens=100, output_tokens=0)), 0)
               for offset, event_id in enumerate(event_ids)]
    return Decoded.of(Decoder.of(make_config().budgets.per_user_budgets), TOPICS, records)


def test_an_event_that_fails_the_write_is_skipped_and_the_rest_counted_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    con = poisoned_store(tmp_path / "r.duckdb")
    decoded = batch(["a", "b", "poison", "c", "d"])
    with caplog.at_level(logging.ERROR):
        assert apply_or_split(con, decoded) == {"alice"}
        apply_or_split(con, decoded)  # the same batch again (a re-read): counted once
    assert sorted(r for (r,) in con.execute("SELECT event_id FROM ledger").fetchall()) == [
        "a", "b", "c", "d"]
    assert con.execute("SELECT DISTINCT tokens FROM balances").fetchall() == [(400,)]
    assert store.load_offsets(con) == {(TOPICS.usage_events, 0): 5}
    assert "skipping usage event at partition 0 offset 2 (event_id 'poison')" in caplog.text
