"""What the benchmarks share: their own broker, the synthetic usage, tables and medians.

The benchmarks run a Kafka broker of their own (127.0.0.1:29092 unless
TALLY_BENCH_KAFKA_PORT says otherwise, data in .local/kafka-bench)
so they never disturb the test broker on 19092. A data set is produced once per namespace
and reused by later runs while the broker's data directory is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import random
import statistics
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson

from tally.kafka import end_offsets, ensure_topics, make_consumer, make_producer, partitions_of
from tally.topics import Topics
from tally_dev import localkafka

__all__ = [
    "BENCH_DATA",
    "CONFIG_DIR",
    "ROOT",
    "bench_broker",
    "ensure_usage",
    "machine",
    "median",
    "peak_rss_mib",
    "print_table",
    "usage_values",
]

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config"
BENCH_DATA = ROOT / ".local" / "bench"
# TALLY_BENCH_KAFKA_PORT moves the bench broker (its controller on the next port).
PORT = int(os.environ.get("TALLY_BENCH_KAFKA_PORT", "29092"))
CONTROLLER_PORT = PORT + 1
KAFKA_DIR = ROOT / ".local" / "kafka-bench"

START = datetime(2026, 3, 1, tzinfo=UTC)
SPAN_S = 61 * 86400  # two months
MODELS = (("anthropic/claude-sonnet-4", "anthropic"), ("anthropic/claude-3-haiku", "anthropic"),
          ("openai/gpt-4.1", "openai"), ("openai/gpt-4.1-mini", "openai"),
          ("google/gemini-2.5-pro", "google"))
ROLES = ("developer", "admin", "viewer", None)


@contextlib.contextmanager
def bench_broker() -> Iterator[str]:
    """The benchmarks' own single-node Kafka; stopped at the end if this started it."""
    already = localkafka.is_running(KAFKA_DIR)
    bootstrap = localkafka.start(port=PORT, controller_port=CONTROLLER_PORT, data_dir=KAFKA_DIR)
    try:
        yield bootstrap
    finally:
        if not already:
            localkafka.stop(KAFKA_DIR)


def usage_values(count: int, users: int = 1000, seed: int = 7) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of `count` UsageRecorded events in time order, as ingest writes them.

    About `users` users, 5 models, spread evenly over two months; the JSON is what
    `UsageRecorded.model_dump_json()` gives (every field, nulls included).
    """
    rng = random.Random(seed)
    step = SPAN_S / count
    for i in range(count):
        user = rng.randrange(users)
        model, provider = MODELS[rng.randrange(len(MODELS))]
        at = START + timedelta(seconds=i * step)
        value = {
            "schema_version": 1, "event_id": f"ev-{seed}-{i:09d}",
            "occurred_at": at.isoformat().replace("+00:00", "Z"), "user_id": f"user_{user:04d}",
            "model": model, "provider": provider, "input_tokens": rng.randrange(50, 4000),
            "output_tokens": rng.randrange(10, 1500), "cache_read_tokens": rng.randrange(0, 800),
            "cache_write_tokens": 0, "session_key": f"s{user}-{i // 5000}", "channel": "http",
            "request_id": None, "source": "openclaw", "role": ROLES[user % len(ROLES)],
            "department": f"dept{user % 7}", "project": None,
        }
        yield f"user_{user:04d}".encode(), orjson.dumps(value)


async def topic_size(bootstrap: str, topic: str) -> int:
    consumer = make_consumer(bootstrap)
    await consumer.start()
    try:
        parts = await partitions_of(consumer, topic)
        ends = await end_offsets(consumer, parts)
        starts = await consumer.beginning_offsets(parts)
        return sum(ends[tp] - starts[tp] for tp in parts)
    finally:
        await consumer.stop()


async def ensure_usage(bootstrap: str, topics: Topics, count: int, partitions: int = 3) -> None:
    """usage.events of the namespace holds exactly `count` events (produced if empty)."""
    await ensure_topics(bootstrap, topics, partitions)
    have = await topic_size(bootstrap, topics.usage_events)
    if have == count:
        return
    if have:
        raise RuntimeError(f"{topics.usage_events} holds {have} events, not {count}: "
                           f"delete {KAFKA_DIR} or use another namespace")
    print(f"producing {count:,} events into {topics.usage_events} ...", flush=True)
    producer = make_producer(bootstrap, linger_ms=20)
    await producer.start()
    try:
        pending = []
        for key, value in usage_values(count):
            pending.append(await producer.send(topics.usage_events, value, key=key))
            if len(pending) >= 20_000:
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


def median(runs: int, measure: Callable[[], float]) -> tuple[float, list[float]]:
    values = [measure() for _ in range(runs)]
    return statistics.median(values), values


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{os.cpu_count()} cores, {mem:.0f} GiB, {platform.python_implementation()} "
            f"{platform.python_version()}, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
            f"load average {load} at start")


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table, so the output pastes into bench/RESULTS.md as it is."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for n, row in enumerate(cells):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if n == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux /proc; an exited child not yet
    waited for keeps its figures); 0 for pid 0 (none found) or a process gone."""
    if not pid:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[int(q * 1000) - 1]


def lag_growth(latencies_in_send_order: Sequence[float]) -> float:
    """ms: the median latency of the last tenth sent minus that of the first tenth. A rate
    that is held stays near 0; one that is not grows with the run."""
    if not latencies_in_send_order:
        return float("nan")
    tenth = max(1, len(latencies_in_send_order) // 10)
    return (statistics.median(latencies_in_send_order[-tenth:])
            - statistics.median(latencies_in_send_order[:tenth]))
