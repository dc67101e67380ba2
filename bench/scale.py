"""Benchmark 4: replay time and the projector's peak memory at 100k, 1M and 3M events.

    .venv/bin/python -m bench.scale [--sizes 100000,1000000,3000000] [--runs 3]

Each size has its own usage.events topic on the bench broker (1,000 users, 5 models, the
same two months, so the larger sets are denser). Each run is a fresh process that replays
the topic (tally.services.projector.replay.replay, the real path) into a fresh DuckDB file and
reports its time and its peak RSS (VmHWM): time should grow linearly with the events and
memory stay flat. Median of `--runs`; the ratios are against the smallest size.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import statistics
import subprocess
import sys

from bench.common import (
    CONFIG_DIR,
    bench_broker,
    ensure_usage,
    machine,
    peak_rss_mib,
    print_table,
)
from bench.replay_throughput import fresh_db
from tally.config.loader import load_config
from tally.services.projector.replay import replay
from tally.topics import Topics

__all__ = ["main"]


def topics_for(events: int) -> Topics:
    return Topics(f"bench-{events // 1000}k")


def child(bootstrap: str, events: int) -> None:
    """One replay in this process; prints its figures as JSON."""
    config = load_config(CONFIG_DIR)
    db = fresh_db(f"scale-{events}.duckdb")
    progress = asyncio.run(replay(config, bootstrap, topics_for(events), db, out=io.StringIO()))
    size = db.stat().st_size / 2**20
    print(json.dumps({"events": progress.done, "seconds": progress.seconds,
                      "rss_mib": peak_rss_mib(), "db_mib": size}))


def measure(bootstrap: str, events: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-m", "bench.scale", "--child", str(events),
                          "--bootstrap", bootstrap], capture_output=True, text=True, check=True)
    figures: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--sizes", default="100000,1000000,3000000")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.bootstrap, args.child)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    with bench_broker() as bootstrap:
        for events in sizes:
            asyncio.run(ensure_usage(bootstrap, topics_for(events), events))
        print(f"machine: {machine()}; median of {args.runs} runs, each a fresh process")
        for events in sizes:
            runs = [measure(bootstrap, events) for _ in range(args.runs)]
            assert all(r["events"] == events for r in runs), runs
            rows.append((events, statistics.median(r["seconds"] for r in runs),
                         statistics.median(r["rss_mib"] for r in runs),
                         statistics.median(r["db_mib"] for r in runs)))
    first_events, first_seconds, first_rss, _ = rows[0]
    print_table(
        ("events", "replay s", "events/s", "time ratio (linear would be)",
         "peak RSS MiB", "RSS ratio", "DuckDB file MiB"),
        [(f"{n:,}", f"{s:.1f}", f"{n / s:,.0f}",
          f"{s / first_seconds:.1f}x ({n / first_events:.0f}x)", f"{rss:,.0f}",
          f"{rss / first_rss:.2f}x", f"{db:,.0f}") for n, s, rss, db in rows])


if __name__ == "__main__":
    main()
