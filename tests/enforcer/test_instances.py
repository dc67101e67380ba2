"""Two `tally enforcer` processes on six partitions of budget.balances, on the real broker.

They share the users through Kafka's group protocol; one is SIGKILLed mid-stream (the other
takes its partitions, and its own users' decisions keep flowing meanwhile) and restarted;
then one is paused (SIGSTOP) past the session timeout, the other takes everything, and the
paused one resumes (SIGCONT) with balances waiting for it. Each round of usage crosses one
alert threshold for every user: in the end each alert was sent exactly once, the latest
decisions are what one enforcer decides on the same balances, and either instance answers
the API for every user.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tally.config.loader import load_config
from tally.instances import read_instances
from tally.kafka import Record, ensure_topics, make_producer
from tally.service import started
from tally.services.enforcer.heard import decode_all
from tally.services.enforcer.state import Enforcer, partition_of, same_decision
from tally.topics import Topics
from tally.wire import BudgetAlerted, BudgetDecided
from tests.test_pipeline import following

from .kit import KEYS, balances, events, free_port
from .pipeline import until, write_config

pytestmark = pytest.mark.kafka

PARTITIONS = 6
SESSION_TIMEOUT_MS = 6000  # the least a broker takes by default (group.min.session.timeout.ms)
USERS = [f"user{n:03d}" for n in range(48)]
BUDGETS: dict[str, Any] = {"per_user_budgets": {
    "default_limits": {"daily_tokens": 1000, "monthly_tokens": 1_000_000},
    "warnings": [{"at_percent": p, "message": f"{p}% of your {{period}} budget"}
                 for p in (20, 40, 60, 80)],
    "on_limit_exceeded": {"action": "hard_stop", "hard_stop": {"message": "Stopped."}},
}}
ROUNDS = (250, 450, 650, 850, 1100)  # each crosses one threshold: 20, 40, 60, 80 %, limit
ADMIN = {"x-api-key": KEYS["carol"]}


class Instance:
    """One `tally enforcer` process on its own HTTP port, logging to a file."""

    def __init__(self, name: str, env: dict[str, str], config_dir: Path, logs: Path) -> None:
        self.name, self.env, self.config_dir, self.logs = name, env, config_dir, logs
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with (self.logs / f"{self.name}.log").open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tally.cli", "enforcer", "--config",
                 str(self.config_dir), "--port", str(port),
                 "--session-timeout", str(SESSION_TIMEOUT_MS / 1000)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def signal(self, number: int) -> None:
        assert self.process is not None and self.process.poll() is None, self.name
        self.process.send_signal(number)

    def wait(self) -> int:
        assert self.process is not None
        return self.process.wait(30)

    def end(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(30)

    async def owned(self, client: httpx.AsyncClient) -> list[int] | None:
        """The partitions it says it owns on /readyz, None when not ready or restoring."""
        try:
            answer = (await client.get(f"{self.url}/readyz")).json()
        except httpx.TransportError:
            return None
        if answer.get("status") != "ready" or answer.get("restoring", True):
            return None
        return list(answer["partitions"])


class Seen:
    """Every decision and alert on the topics, as the test reads them."""

    def __init__(self) -> None:
        self.decisions: dict[str, BudgetDecided] = {}
        self.alerts: list[BudgetAlerted] = []
        self.order: list[tuple[str, int]] = []  # (user, tokens used) as decisions came

    def used(self, users: list[str], tokens: int) -> bool:
        return all(u in self.decisions and self.decisions[u].tokens_used == tokens
                   for u in users)


@contextlib.asynccontextmanager
async def watching(bootstrap: str, topics: Topics) -> AsyncIterator[Seen]:
    seen = Seen()

    def handle(records: list[Record]) -> None:
        for decision in decode_all(BudgetDecided, [r for r in records
                                                   if r.topic == topics.budget_decisions]):
            seen.decisions[decision.user_id] = decision
            seen.order.append((decision.user_id, decision.tokens_used))
        seen.alerts += decode_all(BudgetAlerted, [r for r in records
                                                  if r.topic == topics.budget_alerts])

    async with following(bootstrap, [topics.budget_decisions, topics.budget_alerts], handle):
        yield seen


@contextlib.contextmanager
def instances(names: tuple[str, ...], env: dict[str, str], config_dir: Path,
              logs: Path) -> Iterator[list[Instance]]:
    started = [Instance(name, env, config_dir, logs) for name in names]
    try:
        for instance in started:
            instance.start()
        yield started
    finally:
        for instance in started:
            instance.end()


async def test_two_enforcers_share_the_users_survive_a_kill_and_a_zombie(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    topics = Topics(f"inst-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    config_dir = write_config(tmp_path / "config", BUDGETS)
    cfg = load_config(config_dir)
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "TALLY_TOPIC_NAMESPACE": topics.namespace, "TALLY_PARTITIONS": str(PARTITIONS)}
    now = datetime.now(UTC)

    async def produce(tokens: int, users: list[str] = USERS) -> None:
        sent = [await producer.send(topics.budget_balances, b.model_dump_json().encode(),
                                    key=b.user_id.encode())
                for b in balances(cfg, events(dict.fromkeys(users, tokens), now), now)]
        await asyncio.gather(*sent)

    async with (started(make_producer(kafka_bootstrap)) as producer,
                httpx.AsyncClient(timeout=10) as client,
                watching(kafka_bootstrap, topics) as seen):
        with instances(("a", "b"), env, config_dir, tmp_path) as (a, b):

            async def owning(instance: Instance, count: int) -> bool:
                owned = await instance.owned(client)
                return owned is not None and len(owned) == count

            async def split() -> bool:
                return await owning(a, 3) and await owning(b, 3)

            async def answers_for_all(instance: Instance, tokens: int) -> bool:
                answer = await client.get(f"{instance.url}/api/admin/budgets", headers=ADMIN)
                used = {row["user_id"]: row["daily_used"] for row in answer.json()["users"]}
                return all(used.get(user) == tokens for user in USERS)

            await until(split, 60)
            await listed_as_enforcers(kafka_bootstrap, topics, [a, b], env)
            a_parts = set(await a.owned(client) or [])
            a_users = [u for u in USERS if partition_of(u, PARTITIONS) in a_parts]
            b_users = [u for u in USERS if u not in a_users]
            assert a_users and b_users

            await produce(ROUNDS[0])
            await until(lambda: _true(seen.used(USERS, ROUNDS[0])), 30)
            await until(lambda: answers_for_all(b, ROUNDS[0]), 30)  # a's users too

            # SIGKILL b halfway through a round: a's users are decided at once, b's
            # only once the group gives their partitions to a (after the session timeout).
            await produce(ROUNDS[1], USERS[: len(USERS) // 2])
            b.signal(signal.SIGKILL)
            killed = time.monotonic()
            await produce(ROUNDS[1], USERS[len(USERS) // 2:])
            await until(lambda: owning(a, PARTITIONS), 60)
            print(f"takeover after SIGKILL: {time.monotonic() - killed:.1f} s "
                  f"(session timeout {SESSION_TIMEOUT_MS / 1000:.0f} s)")
            await until(lambda: _true(seen.used(USERS, ROUNDS[1])), 30)
            moved = set(b_users) & set(USERS[len(USERS) // 2:])  # produced after the kill
            assert moved
            order = [user for user, tokens in seen.order if tokens == ROUNDS[1]]
            first_moved = min(order.index(user) for user in moved)
            assert set(a_users) <= set(order[:first_moved]), "a's users waited for b's"

            await produce(ROUNDS[2])
            await until(lambda: _true(seen.used(USERS, ROUNDS[2])), 30)
            b.start()  # restarted: the group splits the partitions again
            await until(split, 60)
            await produce(ROUNDS[3])
            await until(lambda: _true(seen.used(USERS, ROUNDS[3])), 30)

            # A zombie: a is paused past the session timeout, b takes every partition and
            # decides the last round; a resumes with that round waiting to be read.
            a.signal(signal.SIGSTOP)
            await until(lambda: owning(b, PARTITIONS), 60)
            await produce(ROUNDS[4])
            await until(lambda: _true(seen.used(USERS, ROUNDS[4])), 30)
            a.signal(signal.SIGCONT)
            await until(split, 60)
            await until(lambda: answers_for_all(a, ROUNDS[4]), 30)  # b's decisions too
            a.signal(signal.SIGTERM)  # a clean stop takes it off the list at once
            assert await asyncio.to_thread(a.wait) == 0
            assert a.url not in {s.url for s in await read_instances(kafka_bootstrap, topics)}

    ids = [alert.alert_id for alert in seen.alerts]
    assert len(ids) == len(set(ids)), "an alert was sent twice"
    lone = Enforcer(cfg)
    expected = lone.on_balances(balances(cfg, events(dict.fromkeys(USERS, ROUNDS[-1]), now),
                                         now), now)
    thresholds = len(BUDGETS["per_user_budgets"]["warnings"]) + 1
    assert len(ids) == len(USERS) * thresholds  # every crossing, once
    assert set(ids) == {alert.alert_id for alert in expected.alerts}
    assert all(same_decision(seen.decisions[d.user_id], d) for d in expected.decisions)


async def listed_as_enforcers(bootstrap: str, topics: Topics, running: list[Instance],
                              env: dict[str, str]) -> None:
    """Until the instances topic has each with its share of budget.balances (a heartbeat
    comes every 2 s); then `tally status --instances` lists them as enforcers."""
    urls = sorted(instance.url for instance in running)

    async def heard() -> bool:
        seen = [s for s in await read_instances(bootstrap, topics) if s.role == "enforcer"]
        shares = sorted(p for s in seen for p in s.partitions)
        return sorted(str(s.url) for s in seen) == urls and shares == list(range(PARTITIONS))

    await until(heard, 30)
    status = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "tally.cli",
                                                      "status", "--instances"],
                                     env=env, capture_output=True, text=True, timeout=60)
    rows = [line.split() for line in status.stdout.splitlines()[1:]]
    assert status.returncode == 0, status.stderr
    assert sorted(row[2] for row in rows if row[1] == "enforcer") == urls


async def _true(value: bool) -> bool:
    return value
