"""The transport floor: what four Kafka hops cost on this machine when nobody works.

    .venv/bin/python -m bench.transport_floor [--rates 1000,5000] [--seconds 30]
                                              [--clients aiokafka,confluent]

The live path (bench 2) is four topic hops: the bench's producer -> usage.raw -> ingest ->
usage.events -> projector -> budget.balances -> enforcer -> budget.decisions -> the cache.
This runs the same chain with processes that do nothing but forward: a source process
sends records of the events' size (~490 bytes) at a steady rate, three forwarders each
consume a topic and produce the same key and bytes to the next, and a sink process notes
when each record arrives. Nothing is parsed or decided, so the latency and the CPU per
event are the floor the transport (client, broker, scheduler) sets before any service
code runs.

Each client is run as the services would use it:
- aiokafka, with tally.kafka's settings (`make_consumer`: fetch_max_wait 500 ms, a long
  poll; `make_producer`: idempotent, acks=all, linger 0) and the services' loop: `fetch`
  a batch (Records built), send every record, await the acks, fetch again.
- confluent-kafka (librdkafka, parsing in C in its own threads) with the same settings:
  `poll` one message, `consume` what else is queued without waiting, produce each, and
  `flush` (the acks) before the next.

The source stamps its clock into each record (one clock: the same machine), so a record's
latency is the sink's clock at arrival minus that stamp. The CPU of each process is read
from /proc over the steady send and the drain after it. Clients take turns per rate, so a
change in the machine's load falls on both; the load average is printed with each run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from aiokafka.admin import NewTopic

from bench.common import (
    KAFKA_DIR,
    ROOT,
    bench_broker,
    cpu_seconds,
    lag_growth,
    machine,
    print_table,
    quantile,
)
from tally.kafka import fetch, make_admin, make_consumer, make_producer, partitions_of
from tally_dev import localkafka

__all__ = ["main"]

HOPS = 4  # topics between the source and the sink, as in the live path
PARTITIONS = 3  # as the services' topics in bench 2
RECORD_BYTES = 490  # a UsageRecorded's JSON
DRAIN_S = 10.0  # after the last send, how long the sink waits for stragglers
WARM_S = 3.0  # warm-up records after the first came through, before the steady send
CLIENTS = ("aiokafka", "confluent")


# ---------------------------------------------------------------------------- the records


def stamped(seq: int) -> bytes:
    """A record of the events' size carrying its sequence number and send time."""
    head = f"{seq},{time.time():.6f},".encode()
    return head + b"x" * (RECORD_BYTES - len(head))


def latency_ms(value: bytes, now: float) -> tuple[int, float]:
    seq, sent, _ = value.split(b",", 2)
    return int(seq), (now - float(sent)) * 1000


# ---------------------------------------------------------------- librdkafka's settings


# librdkafka leaves Nagle's algorithm on by default (aiokafka, like the broker, sets
# TCP_NODELAY): a small request then waits for the ack of the one before.
LOW_LATENCY = {"socket.nagle.disable": True}


def confluent_producer(bootstrap: str) -> object:
    from confluent_kafka import Producer

    # tally.kafka.make_producer's settings in librdkafka's names.
    return Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                     "linger.ms": 0, "compression.type": "none", **LOW_LATENCY})


def confluent_consumer(bootstrap: str, topic: str) -> object:
    from confluent_kafka import Consumer, TopicPartition

    # tally.kafka.make_consumer's settings; every partition assigned, from the beginning.
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"floor-{uuid.uuid4().hex}",
                         "enable.auto.commit": False, "isolation.level": "read_committed",
                         "fetch.wait.max.ms": 500, "auto.offset.reset": "earliest",
                         **LOW_LATENCY})
    parts = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, -2) for p in sorted(parts)])  # -2: beginning
    return consumer


def confluent_batch(consumer: object, timeout_s: float) -> list[object]:
    """One message when it comes, then whatever else librdkafka holds already: `consume`
    with a timeout waits the whole timeout unless the batch fills."""
    first = consumer.poll(timeout_s)  # type: ignore[attr-defined]
    if first is None:
        return []
    messages = [first, *consumer.consume(num_messages=9_999, timeout=0)]  # type: ignore[attr-defined]
    for message in messages:
        if message.error() is not None:
            raise RuntimeError(f"consume failed: {message.error()}")
    return messages


# ------------------------------------------------------------------ the child processes


# Keys that reach every partition, so the warm-up opens every partition's path.
WARM_KEYS = [f"user_{i:04d}".encode() for i in range(12)]


def wait_for_go(go: threading.Event) -> None:
    """The parent writes a line on stdin when the steady send starts."""
    sys.stdin.readline()
    go.set()


def pace(i: int, rate: int, started: float) -> float:
    """Seconds to sleep before the i-th send (0 when behind: the send bursts)."""
    delay = started + i / rate - time.perf_counter()
    return delay if delay > 0.001 else 0.0


async def aiokafka_source(bootstrap: str, topic: str, rate: int, count: int) -> None:
    go = threading.Event()
    threading.Thread(target=wait_for_go, args=(go,), daemon=True).start()
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        while not go.is_set():  # warm-up records until the parent saw one arrive
            for key in WARM_KEYS:
                await producer.send_and_wait(topic, stamped(-1), key=key)
            await asyncio.sleep(0.1)
        started = time.perf_counter()
        for i in range(count):
            if delay := pace(i, rate, started):
                await asyncio.sleep(delay)
            await producer.send(topic, stamped(i), key=f"user_{i % 1000:04d}".encode())
        await producer.flush()
    finally:
        await producer.stop()


def confluent_source(bootstrap: str, topic: str, rate: int, count: int) -> None:
    go = threading.Event()
    threading.Thread(target=wait_for_go, args=(go,), daemon=True).start()
    producer = confluent_producer(bootstrap)
    while not go.is_set():
        for key in WARM_KEYS:
            producer.produce(topic, stamped(-1), key)  # type: ignore[attr-defined]
        producer.flush()  # type: ignore[attr-defined]
        time.sleep(0.1)
    started = time.perf_counter()
    for i in range(count):
        if delay := pace(i, rate, started):
            time.sleep(delay)
        producer.produce(topic, stamped(i), f"user_{i % 1000:04d}".encode())  # type: ignore[attr-defined]
        producer.poll(0)  # type: ignore[attr-defined]  # serve the delivery reports
    producer.flush()  # type: ignore[attr-defined]


async def aiokafka_forward(bootstrap: str, source: str, target: str) -> None:
    consumer, producer = make_consumer(bootstrap), make_producer(bootstrap)
    await consumer.start()
    await producer.start()
    consumer.assign(await partitions_of(consumer, source))
    while True:  # the services' loop: a batch, its sends, their acks, the next batch
        batch = await fetch(consumer, 10_000, 50)
        acks = [await producer.send(target, r.value, key=r.key) for r in batch]
        await asyncio.gather(*acks)


def confluent_forward(bootstrap: str, source: str, target: str) -> None:
    consumer, producer = confluent_consumer(bootstrap, source), confluent_producer(bootstrap)
    while True:
        batch = confluent_batch(consumer, 0.05)
        for message in batch:
            producer.produce(target, message.value(), message.key())  # type: ignore[attr-defined]
        if batch:
            producer.flush()  # type: ignore[attr-defined]


class Arrivals:
    """What the sink saw: a latency per sequence number, and when the warm-up came."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.latency: dict[int, float] = {}
        self.last = time.monotonic()
        self.warm = False

    def take(self, values: list[bytes]) -> None:
        now = time.time()
        for value in values:
            seq, ms = latency_ms(value, now)
            if seq < 0:
                if not self.warm:
                    self.warm = True
                    print("warm", flush=True)
            else:
                self.latency.setdefault(seq, ms)
        if values:
            self.last = time.monotonic()

    def done(self) -> bool:
        """All arrived, or nothing for DRAIN_S once the steady records had started."""
        return len(self.latency) >= self.count or (
            bool(self.latency) and time.monotonic() - self.last > DRAIN_S)

    def report(self, out: Path) -> None:
        out.write_text(json.dumps([self.latency.get(i) for i in range(self.count)]))


async def aiokafka_sink(bootstrap: str, topic: str, count: int, out: Path) -> None:
    arrivals = Arrivals(count)
    consumer = make_consumer(bootstrap)
    await consumer.start()
    consumer.assign(await partitions_of(consumer, topic))
    while not arrivals.done():
        batch = await fetch(consumer, 10_000, 20)  # the DecisionCache's wait
        arrivals.take([r.value for r in batch if r.value is not None])
    arrivals.report(out)
    await consumer.stop()


def confluent_sink(bootstrap: str, topic: str, count: int, out: Path) -> None:
    arrivals = Arrivals(count)
    consumer = confluent_consumer(bootstrap, topic)
    while not arrivals.done():
        arrivals.take([m.value() for m in confluent_batch(consumer, 0.02)])  # type: ignore[attr-defined]
    arrivals.report(out)
    consumer.close()  # type: ignore[attr-defined]


def child(argv: list[str]) -> None:
    """`python -m bench.transport_floor _child CLIENT ROLE BOOTSTRAP ARGS...`"""
    client, role, bootstrap, *rest = argv
    if role == "source":
        topic, rate, count = rest[0], int(rest[1]), int(rest[2])
        if client == "aiokafka":
            asyncio.run(aiokafka_source(bootstrap, topic, rate, count))
        else:
            confluent_source(bootstrap, topic, rate, count)
    elif role == "forward":
        if client == "aiokafka":
            asyncio.run(aiokafka_forward(bootstrap, rest[0], rest[1]))
        else:
            confluent_forward(bootstrap, rest[0], rest[1])
    else:  # sink
        topic, count, out = rest[0], int(rest[1]), Path(rest[2])
        if client == "aiokafka":
            asyncio.run(aiokafka_sink(bootstrap, topic, count, out))
        else:
            confluent_sink(bootstrap, topic, count, out)


# ------------------------------------------------------------------------- the parent


async def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = make_admin(bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, PARTITIONS, 1) for name in names])
    finally:
        await admin.close()


@dataclass
class Run:
    client: str
    rate: int
    latencies: list[float]
    never: int
    cpu_us: dict[str, float]  # per process, per event
    load: tuple[float, float]  # at start, at end
    lag_growth_ms: float  # p50 of the last tenth minus the first tenth of the records


def spawn(*args: str, **kwargs: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bench.transport_floor", "_child", *args],
                            cwd=ROOT, **kwargs)  # type: ignore[call-overload]


@contextlib.contextmanager
def stopped_at_end(children: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        for process in children:
            if process.poll() is None:
                process.kill()
            process.wait()


def one_run(bootstrap: str, client: str, rate: int, seconds: float, work: Path) -> Run:
    names = [f"floor-{uuid.uuid4().hex[:8]}-{hop}" for hop in range(HOPS)]
    asyncio.run(create_topics(bootstrap, names))
    count = int(rate * seconds)
    out = work / f"{names[0]}.json"
    forwarders = [spawn(client, "forward", bootstrap, a, b) for a, b in itertools.pairwise(names)]
    sink = spawn(client, "sink", bootstrap, names[-1], str(count), str(out),
                 stdout=subprocess.PIPE)
    source = spawn(client, "source", bootstrap, names[0], str(rate), str(count),
                   stdin=subprocess.PIPE)
    processes = {"source": source, **{f"forwarder {n + 1}": f for n, f in enumerate(forwarders)},
                 "sink": sink}
    with stopped_at_end(list(processes.values())):
        assert sink.stdout is not None and source.stdin is not None
        if sink.stdout.readline().strip() != b"warm":
            raise RuntimeError("the sink ended before the warm-up record came through")
        time.sleep(WARM_S)
        pids = {name: p.pid for name, p in processes.items()}
        pids["broker"] = localkafka.running_pid(KAFKA_DIR) or 0
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        load_start = os.getloadavg()[0]
        source.stdin.write(b"go\n")
        source.stdin.flush()
        # The sink ends once everything came (or DRAIN_S); not reaped yet, so that /proc
        # still holds its CPU figures.
        os.waitid(os.P_PID, sink.pid, os.WEXITED | os.WNOWAIT)
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
        load_end = os.getloadavg()[0]
    arrived = json.loads(out.read_text())
    out.unlink()
    found = [ms for ms in arrived if ms is not None]
    return Run(client, rate, found, len(arrived) - len(found),
               {name: (after[name] - before[name]) / count * 1e6 for name in pids},
               (load_start, load_end), lag_growth(found))


def client_cpu(run: Run) -> float:
    """CPU per event of the five client processes (the broker apart)."""
    return sum(us for name, us in run.cpu_us.items() if name != "broker")


def rows_of(runs: list[Run]) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for run in runs:
        forwarders = [us for name, us in run.cpu_us.items() if name.startswith("forwarder")]
        rows.append((run.client, f"{run.rate:,}", f"{run.load[0]:.1f} / {run.load[1]:.1f}",
                     f"{len(run.latencies):,}", run.never,
                     *(f"{quantile(run.latencies, q):,.1f}" for q in (0.5, 0.95, 0.99)),
                     f"{max(run.latencies):,.1f}", f"{run.lag_growth_ms:+,.1f}",
                     f"{run.cpu_us['source']:,.0f}",
                     ", ".join(f"{us:,.0f}" for us in forwarders),
                     f"{run.cpu_us['sink']:,.0f}", f"{client_cpu(run):,.0f}",
                     f"{run.cpu_us['broker']:,.0f}"))
    return rows


def ratios(runs: list[Run]) -> None:
    """confluent against aiokafka, per rate, in the same run."""
    by = {(r.client, r.rate): r for r in runs}
    for rate in sorted({r.rate for r in runs}):
        a, c = by.get(("aiokafka", rate)), by.get(("confluent", rate))
        if a is None or c is None:
            continue
        fa = sum(us for n, us in a.cpu_us.items() if n.startswith("forwarder"))
        fc = sum(us for n, us in c.cpu_us.items() if n.startswith("forwarder"))
        print(f"{rate:,} events/s, confluent / aiokafka: p50 "
              f"{quantile(c.latencies, 0.5) / quantile(a.latencies, 0.5):.2f}x, p99 "
              f"{quantile(c.latencies, 0.99) / quantile(a.latencies, 0.99):.2f}x, "
              f"CPU of the three forwarders {fc / fa:.2f}x, of all five processes "
              f"{client_cpu(c) / client_cpu(a):.2f}x, broker "
              f"{c.cpu_us['broker'] / a.cpu_us['broker']:.2f}x")


def main() -> None:
    if sys.argv[1:2] == ["_child"]:
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="python -m bench.transport_floor")
    parser.add_argument("--rates", default="1000,5000", help="events/s, comma-separated")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--runs", type=int, default=1, help="turns of every client at each rate")
    args = parser.parse_args()
    work = ROOT / ".local" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    with bench_broker() as bootstrap:
        print(f"machine: {machine()}; {HOPS} topic hops of {PARTITIONS} partitions, "
              f"{RECORD_BYTES}-byte records, {args.seconds:g} s per run", flush=True)
        for _ in range(args.runs):
            for rate in (int(r) for r in args.rates.split(",")):
                for client in args.clients.split(","):
                    run = one_run(bootstrap, client, rate, args.seconds, work)
                    runs.append(run)
                    print(f"{client} at {rate:,}/s: p50 {quantile(run.latencies, 0.5):,.1f} ms, "
                          f"p99 {quantile(run.latencies, 0.99):,.1f} ms, never {run.never}, "
                          f"load {run.load[0]:.1f} -> {run.load[1]:.1f}", flush=True)
    print_table(("client", "events/s", "load avg start / end", "events", "never", "p50 ms",
                 "p95 ms", "p99 ms", "max ms", "lag growth ms", "CPU us/event source",
                 "forwarders 1, 2, 3", "sink", "all five", "broker"), rows_of(runs))
    ratios(runs)
    print("Latency: the source's clock at send to the sink's at arrival (one machine); lag "
          "growth: p50 of the last tenth of the records minus the first tenth (a rate the "
          "chain holds stays near 0).")


if __name__ == "__main__":
    main()
