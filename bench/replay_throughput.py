"""Benchmark 1: `tally replay` throughput beside the raw consume rates and a naive projector.

    .venv/bin/python -m bench.replay_throughput [--events 1000000] [--runs 3] [--naive 5000]
                                                [--baseline DIR]

1,000,000 usage events (1,000 users, 5 models, two months) in usage.events of the bench
broker; each run replays them with the real code path (tally.services.projector.replay.replay)
into a fresh DuckDB file. Beside it, in the same run on the same topic: (a) the ceilings,
raw consume doing no work with each client: librdkafka (confluent-kafka, the reader replay
uses: tally.kafka_bulk) and aiokafka (the live services' `getmany` batches); (b) with
`--baseline DIR` (a checkout of an older commit), that code's replay, in a process of its
own, the same-run baseline for a change; (c) the floor, a naive projector that decodes each
event with pydantic and writes it in its own transaction with one-row UPSERTs (ledger keyed
by event_id, two balances, the offset), timed on the first `--naive` events only (it runs
~1,000x slower than replay). The paths take turns, run after run, so a change in the
machine's load falls on all of them; each replay's CPU time (its process, every thread)
per event is printed too, the figure that moves least with the load.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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
from tally.kafka_bulk import TopicReader
from tally.services.projector.app import assign_from
from tally.services.projector.replay import REPLAY_BATCH, replay
from tally.topics import Topics
from tally.wire import PERIOD_NAMES, UsageRecorded

__all__ = ["bulk_raw_rate", "main", "naive_rate", "raw_rate", "replay_rate"]

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


def cpu_seconds() -> float:
    """This process's CPU time so far, every thread (librdkafka's and DuckDB's too)."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def replay_with_cpu(config: Config, bootstrap: str, topics: Topics,
                    events: int) -> tuple[float, float]:
    """(events/s, CPU us an event) of one replay."""
    before = cpu_seconds()
    rate = asyncio.run(replay_rate(config, bootstrap, topics))
    return rate, (cpu_seconds() - before) / events * 1e6


# Run in the baseline's checkout: its own replay_rate, its rate and CPU us an event printed.
BASELINE_SCRIPT = """
import asyncio, resource, sys
from bench.common import CONFIG_DIR
from bench.replay_throughput import replay_rate
from tally.config.loader import load_config
from tally.topics import Topics
cpu = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
before = cpu()
rate = asyncio.run(replay_rate(load_config(CONFIG_DIR), sys.argv[1], Topics(sys.argv[2])))
print(rate, (cpu() - before) / int(sys.argv[3]) * 1e6)
"""


def baseline_replay(checkout: Path, bootstrap: str, topics: Topics,
                    events: int) -> tuple[float, float]:
    """(events/s, CPU us an event) of one replay by the code in `checkout`."""
    env = os.environ | {"PYTHONPATH": f"{checkout / 'src'}:{checkout}"}
    done = subprocess.run([sys.executable, "-c", BASELINE_SCRIPT, bootstrap, topics.namespace,
                           str(events)], cwd=checkout, env=env, check=True,
                          capture_output=True, text=True)
    rate, cpu = done.stdout.split()[-2:]
    return float(rate), float(cpu)


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


def bulk_raw_rate(bootstrap: str, topics: Topics) -> float:
    """The ceiling of the client replay reads with: its batches, doing nothing."""
    reader = TopicReader(bootstrap, [topics.usage_events], topics.usage_events)
    try:
        done, started = 0, time.perf_counter()
        while (batch := reader.next_batch(REPLAY_BATCH)) is not None:
            done += len(batch)
        return done / (time.perf_counter() - started)
    finally:
        reader.close()


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
    parser.add_argument("--baseline", type=Path, default=None,
                        help="a checkout of older code whose replay runs beside this one")
    args = parser.parse_args()
    config = load_config(CONFIG_DIR)
    topics = Topics(f"bench-{args.events // 1000}k")
    paths: dict[str, Callable[[str], tuple[float, float | None]]] = {
        "raw consume, librdkafka (confluent-kafka), no work": lambda b: (
            bulk_raw_rate(b, topics), None),
        "raw consume, aiokafka getmany, no work": lambda b: (
            asyncio.run(raw_rate(b, topics)), None),
        "tally replay (exactly-once)": lambda b: replay_with_cpu(config, b, topics, args.events),
    }
    if args.baseline is not None:
        paths["tally replay, baseline code"] = lambda b: baseline_replay(
            args.baseline, b, topics, args.events)
    with bench_broker() as bootstrap:
        asyncio.run(ensure_usage(bootstrap, topics, args.events))
        print(f"machine: {machine()}; {args.events:,} events, median of {args.runs} runs")
        found: dict[str, list[tuple[float, float | None]]] = {name: [] for name in paths}
        for _ in range(args.runs):  # in turns: a change of load falls on every path
            for name, measure in paths.items():
                found[name].append(measure(bootstrap))
        naive, naives = median(args.runs, lambda: asyncio.run(
            naive_rate(config, bootstrap, topics, args.naive)))
        print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    shutil.rmtree(BENCH_DATA, ignore_errors=True)
    print_table(("path", "events/s (median)", "runs", "CPU us/event (median)"),
                [_row(name, runs) for name, runs in found.items()]
                + [(f"naive one-row UPSERTs ({args.naive:,}-event sample)", f"{naive:,.0f}",
                    " / ".join(f"{x:,.0f}" for x in naives), "")])
    replay_rate_ = statistics.median(r for r, _ in found["tally replay (exactly-once)"])
    for name, runs in found.items():
        if name != "tally replay (exactly-once)":
            print(f"replay / {name}: {replay_rate_ / statistics.median(r for r, _ in runs):.0%}")
    print(f"replay / naive: {replay_rate_ / naive:,.0f}x")


def _row(name: str, runs: list[tuple[float, float | None]]) -> tuple[str, str, str, str]:
    rates = [rate for rate, _ in runs]
    cpus = [cpu for _, cpu in runs if cpu is not None]
    return (name, f"{statistics.median(rates):,.0f}", " / ".join(f"{r:,.0f}" for r in rates),
            f"{statistics.median(cpus):.1f}" if cpus else "")


if __name__ == "__main__":
    main()
