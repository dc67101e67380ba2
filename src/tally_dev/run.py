"""`tally run`: the demo on the embedded default.

Starts the local Kafka (unless KAFKA_BOOTSTRAP_SERVERS points elsewhere), the ingest,
projector and enforcer services as child processes with the example config, feeds a
sample usage history through usage.raw (as a gateway would) and POST /v1/usage (as an
HTTP client would), then prints every user's decision and the alerts, and prints them
again whenever a decision or a new alert comes, until Ctrl-C, which stops everything it
started.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import orjson

from tally.cli import command_main
from tally.clierrors import require_kafka
from tally.config.loader import load_config
from tally.decision_cache import DecisionCache
from tally.kafka import ensure_topics, make_producer, read_to_end
from tally.settings import Settings
from tally.status import format_table, one_line, signature
from tally.wire import BudgetAlerted
from tally_dev import localkafka
from tally_dev.demo import sample_history

__all__ = ["main"]

SERVICES = ("ingest", "projector", "enforcer")
# A gateway bug the demo shows being caught: it lands in usage.dlq, named, and is audited.
MALFORMED = b'{"event_id": "demo-bad-1", "user_id": "openai-user:alice", "input_tokens": -5}'


def say(text: str) -> None:
    print(f"[tally run] {text}", file=sys.stderr, flush=True)


def start_service(name: str, settings: Settings, logs: Path) -> subprocess.Popen[bytes]:
    log = (logs / f"{name}.log").open("ab")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": settings.bootstrap_servers}
    command = [sys.executable, "-m", "tally.cli", name, "--config", str(settings.config_dir)]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)


STOP_GRACE_SECONDS = 20


def stop_services(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """SIGTERM to every service, then one shared grace period (not one per service) before
    a kill, each named: Ctrl-C ends within STOP_GRACE_SECONDS whatever hangs."""
    # A second Ctrl-C (or a terminal signalling the whole group) must not cut cleanup short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for process in processes.values():
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for name, process in processes.items():
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{name} did not stop within {STOP_GRACE_SECONDS} s of SIGTERM: killed")
            process.kill()
            process.wait()


async def feed(settings: Settings, history: list[dict[str, object]]) -> None:
    """All but the last event through usage.raw (plus one malformed); the last over HTTP."""
    producer = make_producer(settings.bootstrap_servers, linger_ms=5)
    await producer.start()
    try:
        sends = [await producer.send(settings.topics.usage_raw, orjson.dumps(event))
                 for event in history[:-1]]
        sends.append(await producer.send(settings.topics.usage_raw, MALFORMED))
        await asyncio.gather(*sends)
    finally:
        await producer.stop()
    await post_over_http(settings, history[-1])


async def post_over_http(settings: Settings, event: dict[str, object]) -> None:
    url = f"http://127.0.0.1:{settings.ingest_port}/v1/usage"
    gateway = next((u for u in load_config(settings.config_dir).users.user_identification.users
                    if u.gateway and u.api_key), None)
    headers = {"Authorization": f"Bearer {gateway.api_key}"} if gateway else {}
    async with httpx.AsyncClient(timeout=10) as client:
        for _ in range(100):  # the ingest service may still be binding its port
            with suppress(httpx.TransportError):
                answer = await client.post(url, json=event, headers=headers)
                say(f"POST /v1/usage -> {answer.status_code}")
                return
            await asyncio.sleep(0.2)


async def show(settings: Settings, once: bool, expected_users: int) -> None:
    """Print, then reprint on change, until Ctrl-C or SIGTERM. The signal ends the loop
    between reads rather than cancelling one half-way: a Kafka client cancelled in its
    start could hold the exit up indefinitely on a loaded machine."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    cache = DecisionCache(settings.bootstrap_servers, settings.topics)
    try:
        await cache.start(timeout=60)
        await wait_for(lambda: stop.is_set() or settled(cache, expected_users), 60)
        shown = Shown()
        while not stop.is_set():
            shown = await print_state(cache, settings, shown)
            if once:
                break
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        try:
            await asyncio.wait_for(cache.stop(), 10)
        except TimeoutError:
            say("the decision cache did not close within 10 s; going on")
    if stop.is_set():
        raise KeyboardInterrupt


def settled(cache: DecisionCache, expected_users: int) -> bool:
    return len(cache) >= expected_users and any(d.status == "over_limit"
                                                 for d in cache.snapshot())


async def wait_for(check: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)


@dataclass(frozen=True)
class Shown:
    """What was printed last: the table's rows and how many alerts."""

    table: tuple[tuple[str, ...], ...] = ()
    alerts: int = 0


async def print_state(cache: DecisionCache, settings: Settings, shown: Shown) -> Shown:
    """Print the decisions and the new alerts when either changed since `shown`."""
    records = await read_to_end(settings.bootstrap_servers, settings.topics.budget_alerts)
    decisions = cache.snapshot()
    now = Shown(signature(decisions), len(records))
    if now == shown:
        return shown
    print(f"\n== decisions at {datetime.now(UTC):%Y-%m-%d %H:%M:%S} UTC ==")
    print(format_table(decisions))
    print(f"\n== alerts on {settings.topics.budget_alerts} ({len(records)}) ==")
    # Sorted: alerts of several users come from several partitions in any order.
    alerts = sorted((BudgetAlerted.model_validate_json(r.value or b"")
                     for r in records[shown.alerts:]),
                    key=lambda a: (a.user_id, a.period, a.kind != "warning", a.threshold))
    for alert in alerts:
        admin = " [notify admin]" if alert.notify_admin else ""
        print(f"  {alert.user_id}: {alert.kind} {alert.threshold}% {alert.period}{admin}: "
              f"{one_line(alert.message)}")
    sys.stdout.flush()
    return now


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    """`tally run [--once]` (options: tally.cli)."""
    settings = Settings.from_env()
    config = load_config(settings.config_dir)
    # A new topic's leader is elected while the first sends go out; aiokafka retries them
    # and logs each retry ("NotLeaderForPartitionError"): normal, and alarming to read.
    logging.getLogger("aiokafka").setLevel(logging.ERROR)
    # SIGTERM (kill, a supervisor) stops everything like Ctrl-C; and Ctrl-C works even
    # when started in the background by a shell that set SIGINT to be ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with ExitStack() as stack:
        if "KAFKA_BOOTSTRAP_SERVERS" in os.environ:
            require_kafka(settings.bootstrap_servers)
        else:
            started_here = not localkafka.is_running()
            settings = settings.model_copy(update={"bootstrap_servers": localkafka.start()})
            if started_here:
                stack.callback(localkafka.stop)
        logs = settings.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        asyncio.run(ensure_topics(settings.bootstrap_servers, settings.topics,
                                  settings.partitions))
        processes = {name: start_service(name, settings, logs) for name in SERVICES}
        stack.callback(stop_services, processes)
        say(f"services started; logs in {logs}")
        say("in another shell: .venv/bin/tally status (or `source .venv/bin/activate`, "
            "then tally status)")
        say(f"dashboard: http://127.0.0.1:{settings.enforcer_port}/admin "
            "(sign in with an admin's API key from users.yaml, e.g. ak_carol_example_0003)")
        history = sample_history(config, datetime.now(UTC))
        say(f"feeding {len(history)} sample usage events")
        try:
            asyncio.run(feed(settings, history))
            asyncio.run(show(settings, args.once, len(config.users.user_identification.users)))
        except KeyboardInterrupt:
            say("stopping")
    return 0


main = command_main("run")
