"""Benchmark 2: live latency, from producing a usage event to its user's new decision in a
DecisionCache, through the three running services.

    .venv/bin/python -m bench.live_latency [--rate 1000] [--seconds 60] [--users 1000]
                                           [--daily-tokens N]

Ingest, projector and enforcer run as their own processes (`python -m tally.cli ...`) on
the bench broker, in a fresh topic namespace and data directory. This process produces
UsageRecorded events to usage.raw at a steady rate, as a gateway would, and follows
budget.decisions with a DecisionCache. An event's latency is from just before its send to
the moment the cache first holds a decision for its user whose daily tokens_used includes
it (decisions are absolute, so one decision can complete several events).

With the config's daily limit (50,000 tokens) no user of a run crosses a threshold: no
alert is sent. `--daily-tokens N` runs the services on a copy of the config whose default
daily limit is N, so that users cross the warnings and the limit during the run and the
enforcer sends alerts (how many is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson
import yaml

from bench.common import (
    BENCH_DATA,
    CONFIG_DIR,
    KAFKA_DIR,
    ROOT,
    bench_broker,
    cpu_seconds,
    lag_growth,
    machine,
    print_table,
    quantile,
)
from tally.decision_cache import DecisionCache
from tally.kafka import (
    Record,
    batches,
    ensure_topics,
    make_consumer,
    make_producer,
    partitions_of,
    read_to_end,
)
from tally.topics import Topics
from tally_dev import localkafka

__all__ = ["Load", "main", "one_run", "quantile"]

SERVICES = ("ingest", "projector", "enforcer")


Seen = dict[str, list[tuple[int, float]]]  # per user: (daily tokens, when), in order
Load = Callable[[str], contextlib.AbstractAsyncContextManager[object]]


class WatchedCache(DecisionCache):
    """A DecisionCache that notes when each user's daily tokens_used became visible, and
    when the enforcer had sent that decision (its Kafka timestamp)."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        super().__init__(bootstrap, topics)
        self.seen: Seen = defaultdict(list)
        self.sent: Seen = defaultdict(list)

    def _apply(self, batch: list[Record]) -> None:
        super()._apply(batch)
        now = time.time()
        for record in batch:
            user = (record.key or b"").decode()
            if record.value is not None and user in self._table.rows:
                # The JSON the cache took, not a model built again (20 us a decision of
                # this process's CPU, which the services share).
                used = orjson.loads(record.value)["daily"]["tokens_used"]
                self.sent[user].append((used, record.timestamp_ms / 1000))
                self.seen[user].append((used, now))


async def follow(bootstrap: str, topic: str, sent: Seen) -> None:
    """When ingest sent each user's events (usage.events, tokens added up in order) or the
    projector each user's daily total (budget.balances), from the records' timestamps."""
    consumer = make_consumer(bootstrap)
    await consumer.start()
    try:
        consumer.assign(await partitions_of(consumer, topic))
        async for batch in batches(consumer, timeout_ms=20):
            for record in batch:
                user, data = (record.key or b"").decode(), orjson.loads(record.value or b"{}")
                if "daily" in data:  # a balance: the latest day's total
                    tokens = data["daily"][max(data["daily"])]
                else:  # an event: what the user's daily total is with it
                    tokens = (sent[user][-1][0] if sent[user] else 0) + data["input_tokens"]
                sent[user].append((tokens, record.timestamp_ms / 1000))
    finally:
        await consumer.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclasses.dataclass
class Running:
    """The services' environment (ports) and their processes."""

    env: dict[str, str]
    children: dict[str, subprocess.Popen[bytes]]

    def cpu(self) -> dict[str, float]:
        """Each service's CPU so far, and the bench broker's (the other processes' hops
        cost it CPU too: a request per batch at each hop)."""
        broker = localkafka.running_pid(KAFKA_DIR)
        return {**{name: cpu_seconds(child.pid) for name, child in self.children.items()},
                "broker": cpu_seconds(broker) if broker else 0.0}


CPU: dict[str, float] = {}  # the last run's CPU seconds per service during the steady send
# The last run's lag growth end to end (see lag_growth), and balances and decisions sent
# per event (how many of a user's events each one covers: fewer per event, less work).
SHAPE: dict[str, float] = {}
ALERTS: list[int] = []  # the last run's alerts (budget.alerts, read_committed)


@contextlib.contextmanager
def services(bootstrap: str, topics: Topics, data: Path, after_commit: bool,
             projector_args: Sequence[str] = (), code: Path = ROOT,
             config_dir: Path | None = None) -> Iterator[Running]:
    """The three services as child processes, with their environment (ports) for the block;
    SIGTERM (then SIGKILL) at the end. `code`: the checkout whose services (and config,
    unless `config_dir`) run, e.g. a baseline's `git worktree`."""
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "TALLY_TOPIC_NAMESPACE": topics.namespace, "TALLY_DATA_DIR": str(data),
           "TALLY_CONFIG_DIR": str(config_dir or code / CONFIG_DIR.relative_to(ROOT)),
           "TALLY_INGEST_PORT": str(free_port()),
           "TALLY_PROJECTOR_PORT": str(free_port()), "TALLY_ENFORCER_PORT": str(free_port())}
    if code != ROOT:
        env["PYTHONPATH"] = f"{code / 'src'}:{code}"
    data.mkdir(parents=True, exist_ok=True)
    logs = [(data / f"{name}.log").open("w") for name in SERVICES]
    extra = {"projector": [*(["--publish-after-commit"] if after_commit else []),
                           *projector_args]}
    children = [subprocess.Popen([sys.executable, "-m", "tally.cli", name, *extra.get(name, [])],
                                 cwd=code, env=env, stdout=log, stderr=subprocess.STDOUT)
                for name, log in zip(SERVICES, logs, strict=True)]
    try:
        yield Running(env, dict(zip(SERVICES, children, strict=True)))
    finally:
        for child in children:
            child.terminate()
        for child in children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        for log in logs:
            log.close()


def usage(user: str, tokens: int) -> bytes:
    return orjson.dumps({
        "event_id": uuid.uuid4().hex, "occurred_at": datetime.now(UTC).isoformat(),
        "user_id": user, "model": "openai/gpt-4.1", "provider": "openai",
        "input_tokens": tokens, "output_tokens": 0, "source": "bench"})


@contextlib.asynccontextmanager
async def following(bootstrap: str, topics: Topics) -> AsyncIterator[WatchedCache]:
    cache = WatchedCache(bootstrap, topics)
    await cache.start()
    try:
        yield cache
    finally:
        await cache.stop()


async def warm_up(producer: object, topics: Topics, cache: WatchedCache) -> None:
    """Until an event goes all the way through (the ingest's group has joined, etc.)."""
    send = producer.send  # type: ignore[attr-defined]
    for _ in range(600):
        await send(topics.usage_raw, usage("bench_warmup", 1), key=b"bench_warmup")
        await asyncio.sleep(0.1)
        if cache.get("bench_warmup") is not None:
            return
    raise RuntimeError("no decision came back within 60 s: see the service logs")


async def steady(producer: object, topics: Topics, rate: int, seconds: float,
                 users: int) -> dict[str, list[tuple[int, float]]]:
    """Send `rate` events a second for `seconds`; per user, (cumulative tokens, sent at)."""
    send = producer.send  # type: ignore[attr-defined]
    sent: dict[str, list[tuple[int, float]]] = defaultdict(list)
    totals: dict[str, int] = defaultdict(int)
    total = int(rate * seconds)
    started = time.perf_counter()
    for i in range(total):
        due = started + i / rate
        delay = due - time.perf_counter()
        if delay > 0.001:
            await asyncio.sleep(delay)
        user = f"bench_{i * 7919 % users:05d}"
        tokens = 10 + i % 90
        totals[user] += tokens
        sent[user].append((totals[user], time.time()))
        await send(topics.usage_raw, usage(user, tokens), key=user.encode())
    await producer.flush()  # type: ignore[attr-defined]
    return sent


def covered(sent: Seen, seen: Seen) -> Iterator[tuple[float, float | None]]:
    """Per event, when it was sent and the ms until `seen` first covered it (None: never)."""
    for user, events in sent.items():
        arrivals = seen.get(user, [])
        used = [tokens for tokens, _ in arrivals]
        for tokens, at in events:
            i = bisect.bisect_left(used, tokens)
            yield at, None if i == len(used) else (arrivals[i][1] - at) * 1000


def latencies(sent: Seen, seen: Seen) -> tuple[list[float], int]:
    """Per event, ms until `seen` first covered it; and how many it never covered."""
    found = [ms for _, ms in covered(sent, seen) if ms is not None]
    return found, sum(len(events) for events in sent.values()) - len(found)


def growth(sent: Seen, seen: Seen) -> float:
    """bench.common.lag_growth of the events in the order they were sent."""
    timed = sorted((at, ms) for at, ms in covered(sent, seen) if ms is not None)
    return lag_growth([ms for _, ms in timed])


def with_daily_limit(code: Path, data: Path, daily_tokens: int) -> Path:
    """A copy of `code`'s config whose default daily limit is `daily_tokens`."""
    config = data / "config"
    shutil.copytree(code / CONFIG_DIR.relative_to(ROOT), config)
    budgets = yaml.safe_load((config / "budgets.yaml").read_text())
    budgets["per_user_budgets"]["default_limits"]["daily_tokens"] = daily_tokens
    (config / "budgets.yaml").write_text(yaml.safe_dump(budgets))
    return config


@contextlib.asynccontextmanager
async def no_load(projector_url: str) -> AsyncIterator[None]:
    yield None


async def one_run(bootstrap: str, rate: int, seconds: float, users: int,
                  after_commit: bool, load: Load = no_load,
                  projector_args: Sequence[str] = (), code: Path = ROOT,
                  daily_tokens: int | None = None) -> dict[str, tuple[list[float], int]]:
    """`load`, given the projector's URL, runs beside the steady events (e.g. audits)."""
    topics = Topics(f"live-{uuid.uuid4().hex[:8]}")
    data = BENCH_DATA / topics.namespace
    await ensure_topics(bootstrap, topics, 3)
    config = with_daily_limit(code, data, daily_tokens) if daily_tokens else None
    with services(bootstrap, topics, data, after_commit, projector_args, code,
                  config) as running:
        env = running.env
        async with following(bootstrap, topics) as cache:
            producer = make_producer(bootstrap)
            await producer.start()
            try:
                events: Seen = defaultdict(list)
                balances: Seen = defaultdict(list)
                followers = [asyncio.create_task(follow(bootstrap, topic, seen)) for topic, seen
                             in ((topics.usage_events, events),
                                 (topics.budget_balances, balances))]
                await warm_up(producer, topics, cache)
                before = running.cpu()
                own = time.process_time()
                async with load(f"http://127.0.0.1:{env['TALLY_PROJECTOR_PORT']}"):
                    sent = await steady(producer, topics, rate, seconds, users)
                await asyncio.sleep(3)  # the last events' decisions
                after = running.cpu()
                CPU.clear()
                CPU.update({name: after[name] - before[name] for name in after})
                CPU["bench process"] = time.process_time() - own
            finally:
                for task in followers:
                    task.cancel()
                await producer.stop()
    shutil.rmtree(data, ignore_errors=True)
    ALERTS[:] = [len(await read_to_end(bootstrap, topics.budget_alerts))]
    events_sent = sum(len(v) for v in sent.values())
    SHAPE.update({"lag": growth(sent, cache.seen),
                  "balances": sum(len(v) for v in balances.values()) / events_sent,
                  "decisions": sum(len(v) for v in cache.sent.values()) / events_sent})
    return {"ingest sent it": latencies(sent, events),
            "projector sent balance": latencies(sent, balances),
            "enforcer sent decision": latencies(sent, cache.sent),
            "in the cache (end to end)": latencies(sent, cache.seen)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.live_latency")
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=1, help="runs of each design")
    parser.add_argument("--designs", default="before,after",
                        help="before: balances sent before the DuckDB commit (the default "
                             "projector); after: --publish-after-commit")
    parser.add_argument("--daily-tokens", type=int, default=None,
                        help="the default daily limit of the services' config (a copy): "
                             "low enough, users cross thresholds and alerts are sent")
    parser.add_argument("--code", type=Path, default=ROOT,
                        help="the checkout whose services run (a baseline's worktree, e.g. "
                             "`git worktree add /tmp/base <commit>`); default: this one")
    args = parser.parse_args()
    rows = []
    with bench_broker() as bootstrap:
        print(f"machine: {machine()}; {args.rate:,} events/s for {args.seconds:g} s, "
              f"{args.users:,} users, {args.runs} run(s) of each design")
        for run in range(args.runs):
            for design in args.designs.split(","):
                figures = asyncio.run(one_run(bootstrap, args.rate, args.seconds,
                                              args.users, design == "after",
                                              code=args.code.resolve(),
                                              daily_tokens=args.daily_tokens))
                for what, (found, missing) in figures.items():
                    rows.append((f"publish {design} commit, run {run + 1}", what, len(found),
                                 missing, *(quantile(found, q) for q in (0.5, 0.95, 0.99)),
                                 max(found)))
                events = args.rate * args.seconds
                print(f"publish {design} commit, run {run + 1}: CPU per event (us): " + ", ".join(
                    f"{name} {seconds / events * 1e6:,.0f}" for name, seconds in CPU.items())
                    + f"; lag growth end to end {SHAPE['lag']:+,.0f} ms; per event "
                    f"{SHAPE['balances']:.2f} balances, {SHAPE['decisions']:.2f} decisions"
                    f"; {ALERTS[0]:,} alerts"
                    + f"; load average {os.getloadavg()[0]:.1f} at the end")
    print_table(("design", "from send to", "events", "never", "p50 ms", "p95 ms", "p99 ms",
                 "max ms"),
                [(name, what, f"{n:,}", m, *(f"{v:,.1f}" for v in qs))
                 for name, what, n, m, *qs in rows])
    print("Timestamps: this process's clock at send and at the cache; the broker's record "
          "timestamps (CreateTime, ms) for when the projector and the enforcer sent.")


if __name__ == "__main__":
    main()
