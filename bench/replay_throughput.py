"""Benchmark 1: `tally replay` throughput beside the raw consume rate and a naive projector.

    .venv/bin/python -m bench.replay_throughput [--events 1000000] [--runs 3] [--naive 5000]

1,000,000 usage events (1,000 users, 5 models, two months) in usage.events of the bench
broker; each run replays them with the real code path (tally.services.projector.replay.replay)
into a fresh DuckDB file. Beside it, in the same run on the same topic: (a) the ceiling,
the same Kafka client and batch reader doing no work; (b) the floor, a naive projector
that decodes each event with pydantic and writes it in its own transaction with one-row
UPSERTs (ledger keyed by event_id, two balances, the offset), timed on the first `--naive`
events only (it runs ~1,000x slower than replay).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import shutil
import time
from pathlib import Path

import duckdb

from bench.common import (
    BENCH_DATA,
    CONFIG_DIR,
    bench_broker,
    ensure_usage,
    machine,
    median,
    print_table,
)
from tally.config.loader import load_config
from tally.config.models import Config
from tally.core.periods import calendar_for
from tally.kafka import Record, batches, end_offsets, make_consumer
from tally.services.projector.app import assign_from
from tally.services.projector.replay import replay
from tally.topics import Topics
from tally.wire import PERIOD_NAMES, UsageRecorded

__all__ = ["main", "naive_rate", "raw_rate", "replay_rate"]

NAIVE_STARTS = ", ".join(f"{kind}_start TIMESTAMPTZ" for kind in PERIOD_NAMES)
NAIVE_SCHEMA = f"""
CREATE TABLE ledger (event_id VARCHAR PRIMARY KEY, user_id VARCHAR, occurred_at TIMESTAMPTZ,
                     tokens BIGINT, {NAIVE_STARTS});
CREATE TABLE balances (user_id VARCHAR, period VARCHAR, period_start TIMESTAMPTZ,
                       tokens BIGINT, PRIMARY KEY (user_id, period, period_start));
CREATE TABLE offsets (topic VARCHAR, partition INTEGER, next_offset BIGINT,
                      PRIMARY KEY (topic, partition));
"""


def fresh_db(name: str) -> Path:
    BENCH_DATA.mkdir(parents=True, exist_ok=True)
    path = BENCH_DATA / name
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)
    return path


async def replay_rate(config: Config, bootstrap: str, topics: Topics) -> float:
    """events/s of one replay into a fresh file (the real `tally replay` path)."""
    progress = await replay(config, bootstrap, topics, fresh_db("replay.duckdb"),
                            out=io.StringIO())
    return progress.done / progress.seconds


async def _read(bootstrap: str, topics: Topics, limit: int | None,
                each: object = None) -> tuple[int, float]:
    consumer = make_consumer(bootstrap, fetch_max_wait_ms=100)
    await consumer.start()
    try:
        parts = await assign_from(consumer, (topics.usage_events,), {})
        ends = await end_offsets(consumer, parts)
        total = sum(ends.values()) if limit is None else limit
        done, started = 0, time.perf_counter()
        async for records in batches(consumer, max_records=10_000):
            if callable(each):
                each(records[: total - done])
            done += len(records)
            if done >= total:
                break
        return min(done, total), time.perf_counter() - started
    finally:
        await consumer.stop()


async def raw_rate(bootstrap: str, topics: Topics) -> float:
    """The ceiling: the same consumer settings and batch reader, doing nothing."""
    done, seconds = await _read(bootstrap, topics, None)
    return done / seconds


async def naive_rate(config: Config, bootstrap: str, topics: Topics, sample: int) -> float:
    """The floor: pydantic per event, one transaction of one-row UPSERTs per event."""
    con = duckdb.connect(str(fresh_db("naive.duckdb")))
    con.execute(NAIVE_SCHEMA)
    budgets = config.budgets.per_user_budgets
    calendar, counted = calendar_for(budgets.reset_schedule), budgets.counted_tokens

    def project(records: list[Record]) -> None:
        for r in records:
            e = UsageRecorded.model_validate_json(r.value or b"")
            windows = calendar.windows_at(e.occurred_at)
            tokens = sum(getattr(e, name) for name in counted)
            con.execute("BEGIN")
            new = con.execute(f"INSERT INTO ledger VALUES (?, ?, ?, ?{', ?' * len(windows)}) "
                              "ON CONFLICT DO NOTHING RETURNING event_id",
                              [e.event_id, e.user_id, e.occurred_at, tokens,
                               *(w.start for w in windows)])
            if new.fetchall():
                for window in windows:
                    con.execute("INSERT INTO balances VALUES (?, ?, ?, ?) ON CONFLICT DO UPDATE "
                                "SET tokens = balances.tokens + excluded.tokens",
                                [e.user_id, window.kind, window.start, tokens])
            con.execute("INSERT OR REPLACE INTO offsets VALUES (?, ?, ?)",
                        [r.topic, r.partition, r.offset + 1])
            con.execute("COMMIT")

    # Fetching is timed too, but at the naive rate it is noise.
    done, seconds = await _read(bootstrap, topics, sample, project)
    con.close()
    return done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replay_throughput")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--naive", type=int, default=5000, help="events in the naive sample")
    args = parser.parse_args()
    config = load_config(CONFIG_DIR)
    topics = Topics(f"bench-{args.events // 1000}k")
    with bench_broker() as bootstrap:
        asyncio.run(ensure_usage(bootstrap, topics, args.events))
        print(f"machine: {machine()}; {args.events:,} events, median of {args.runs} runs")
        run = asyncio.run
        raw, raws = median(args.runs, lambda: run(raw_rate(bootstrap, topics)))
        rep, reps = median(args.runs, lambda: run(replay_rate(config, bootstrap, topics)))
        naive, naives = median(args.runs,
                               lambda: run(naive_rate(config, bootstrap, topics, args.naive)))
    shutil.rmtree(BENCH_DATA, ignore_errors=True)
    rows = [
        ("raw consume, no work (ceiling)", raw, raws, f"replay = {rep / raw:.0%} of it"),
        ("tally replay (exactly-once)", rep, reps, "target >= 150,000 and >= 30% of raw"),
        (f"naive one-row UPSERTs ({args.naive:,}-event sample)", naive, naives,
         f"replay = {rep / naive:,.0f}x it"),
    ]
    print_table(("path", "events/s (median)", "runs", "ratio"),
                [(name, f"{v:,.0f}", " / ".join(f"{x:,.0f}" for x in vs), ratio)
                 for name, v, vs, ratio in rows])


if __name__ == "__main__":
    main()
