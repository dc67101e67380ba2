"""The projector's hop alone: from a batch in hand to its balances handed to the producer,
judged from memory (events of the last minutes) beside DuckDB first (older events, the
path every batch took before), in one process, one run, on the same store.

    .venv/bin/python -m bench.projector_hop [--batches 300] [--size 50] [--stored 100000]

A live-sized batch (`--size` events of `--users` users) is folded `--batches` times each
way, alternating, into a DuckDB file that already holds `--stored` events; the balances go
to the bench broker. "to send" is until the first balance is handed to the producer,
"batch" until the projector can take the next batch (the memory path's write then runs
in a thread while the next batch is handled; its time is in "write behind").

Then the CPU of storing: `--join` such batches written one transaction each (as the
projector did) beside the same in one transaction (what it does now: the batches judged
from memory within WRITE_EVERY_S are written together), alternating, `--rounds` times;
CPU time of this process (DuckDB's threads included), which the load moves less than
wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import orjson
import pyarrow as pa

from bench.common import BENCH_DATA, CONFIG_DIR, bench_broker, machine, print_table
from tally.config.loader import load_config
from tally.kafka import Record, ensure_topics, make_producer
from tally.services.projector import store
from tally.services.projector.app import WRITE_EVERY_S, Decoded, Projector
from tally.services.projector.decode import Decoder
from tally.topics import Topics

__all__ = ["main"]


class Timed(Projector):
    """Notes when a batch's balances are handed to the producer."""

    sent_at = 0.0

    async def send(self, users: Iterable[str]) -> list[asyncio.Future[object]]:
        self.sent_at = time.perf_counter()
        return await super().send(users)


def records(topic: str, start: int, size: int, users: int, at: datetime) -> list[Record]:
    return [Record(topic, i % 3, start + i, f"u{i % users}".encode(), orjson.dumps({
        "event_id": uuid.uuid4().hex, "occurred_at": at.isoformat(), "user_id": f"u{i % users}",
        "model": "m", "provider": "p", "input_tokens": 10, "output_tokens": 5,
        "cache_read_tokens": 0, "cache_write_tokens": 0}), 0) for i in range(size)]


def write_cpu(projector: Projector, topic: str, offset: int, size: int, users: int,
              join: int, rounds: int) -> dict[str, float]:
    """us of CPU an event to store `join` live batches: a transaction each, or one."""
    cpu = {"a transaction per batch": 0.0, f"{join} batches in one": 0.0}
    for _ in range(rounds):
        for way in cpu:
            batches = []
            for _ in range(join):
                batches.append(Decoded.of(projector.decoder, projector.topics, records(
                    topic, offset, size, users, datetime.now(UTC))))
                offset += size
            news = [store.first_of_each(b.events) for b in batches]  # fresh ids: all new
            began = time.process_time()
            if way.startswith("a transaction"):
                for batch, new in zip(batches, news, strict=True):
                    projector.store_checked(batch, new)
            else:
                projector.store_checked(Decoded.joined(batches), pa.concat_tables(news))
            cpu[way] += time.process_time() - began
    return {way: seconds / (rounds * join * size) * 1e6 for way, seconds in cpu.items()}


async def measure(bootstrap: str, batches: int, size: int, stored: int, users: int,
                  join: int = 8, rounds: int = 30,
                  ) -> tuple[dict[str, dict[str, list[float]]], dict[str, float]]:
    topics = Topics(f"hop-{uuid.uuid4().hex[:8]}")
    await ensure_topics(bootstrap, topics, 3)
    config = load_config(CONFIG_DIR)
    folder = BENCH_DATA / topics.namespace
    folder.mkdir(parents=True, exist_ok=True)
    con = store.connect(folder / "p.duckdb",
                        schedule=config.budgets.per_user_budgets.reset_schedule)
    now = datetime.now(UTC)
    old = now - timedelta(days=1)
    for first in range(0, stored, 10_000):  # history, stored as replay would
        Decoded.of(Decoder.of(config.budgets.per_user_budgets), topics,
                   records(topics.usage_events, first, 10_000, users, old)).apply(
                       store.DuckDBStore(con))
    producer = make_producer(bootstrap)
    await producer.start()
    figures: dict[str, dict[str, list[float]]] = {
        way: {"to send": [], "batch": [], "write behind": []}
        for way in ("from memory", "DuckDB first")}
    try:
        projector = Timed(con, config, topics, producer)
        offset = stored
        for _ in range(batches):
            for way, at in (("from memory", datetime.now(UTC)), ("DuckDB first", old)):
                batch = records(topics.usage_events, offset, size, users, at)
                offset += size
                began = time.perf_counter()
                await projector.handle(batch)
                handled = time.perf_counter()
                await projector.finish()  # the write behind, if any
                figures[way]["to send"].append((projector.sent_at - began) * 1000)
                figures[way]["batch"].append((handled - began) * 1000)
                figures[way]["write behind"].append((time.perf_counter() - handled) * 1000)
        writes = write_cpu(projector, topics.usage_events, offset, size, users, join, rounds)
    finally:
        await producer.stop()
        con.close()
        shutil.rmtree(folder, ignore_errors=True)
    return figures, writes


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.projector_hop")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--size", type=int, default=50)
    parser.add_argument("--stored", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--join", type=int, default=8,
                        help=f"batches written together (8 of 30 events: {WRITE_EVERY_S} s "
                             f"at ~1,000 events/s)")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    with bench_broker() as bootstrap:
        print(f"machine: {machine()}; {args.batches} batches of {args.size} each way, "
              f"{args.stored:,} events stored")
        figures, writes = asyncio.run(measure(bootstrap, args.batches, args.size,
                                              args.stored, args.users, args.join, args.rounds))
    print_table(("judged", "to send p50 ms", "to send p90 ms", "batch p50 ms",
                 "write behind p50 ms"),
                [(way, *(f"{quantile(f[k], q):.2f}" for k, q in (
                    ("to send", 0.5), ("to send", 0.9), ("batch", 0.5), ("write behind", 0.5))))
                 for way, f in figures.items()])
    print_table(("stored", "CPU us an event"),
                [(way, f"{us:,.0f}") for way, us in writes.items()])
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


def quantile(values: list[float], q: float) -> float:
    return sorted(values)[min(int(len(values) * q), len(values) - 1)]


if __name__ == "__main__":
    main()
