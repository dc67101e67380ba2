"""Tally on a real OpenClaw gateway (openclaw 2026.9.6 from npm, Node 24), end to end.

One gateway start, inside a network namespace with only loopback: the fake upstream model
server listens inside it, Kafka is relayed in on its own port, and the test calls the
gateway's /v1/chat/completions through a relay. The pipeline (ingest, projector, enforcer
with a controllable clock) runs in this process against the session's real broker, as in
tests/test_pipeline.py. Every call costs 100 input + 20 output tokens; the daily limit is
1000.

- alice is a claimed user: users.yaml has her as `alice` with the identity
  "openai-user:alice", and her client sends `user: "Alice"`. The gateway knows her only as
  openai-user:alice; Tally counts and decides under `alice`, and the plugin finds that
  decision through the identities it lists. Her first calls pass and their tokens reach
  DuckDB exactly, under `alice`; at 50% the warning alert is published; past the limit the
  gateway stops her at once from its own count (the enforcer is paused to prove it), then
  with the configured hard-stop message, and the upstream is not called; switched to
  reduced_priority she is served by the cheaper model; after the daily reset her calls
  pass again.
- bob, on the same gateway, is served throughout.
- carol measures the overshoot: 40 tokens under the limit she sends N calls at once
  through N agents (one session each, as one person in N conversations: OpenClaw refuses
  concurrent work in one session); all are admitted before any has finished, so she ends
  N calls' worth minus those 40 past the limit.

The figures (gateway start, call time, overshoot, the plugin's time in its hooks) are
printed and kept with the gateway's logs in test-artifacts/openclaw-e2e/.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest
import yaml

from tally.config.loader import load_config
from tally.decision_cache import DecisionCache
from tally.kafka import read_to_end
from tally.services.enforcer.app import run_enforcer
from tally.services.ingest.app import run_ingest
from tally.services.projector.app import run_projector
from tally.topics import Topics
from tally.wire import BudgetAlerted, BudgetDecided
from tests.paths import project_root

from .fake_upstream import FakeUpstream
from .gateway import PORT, TOKEN, gateway_config, install, start_gateway, wait_ready
from .netns import LoopbackNamespace

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

IN, OUT = 100, 20
PER_CALL = IN + OUT
ALICE = "alice"  # her users.yaml id
ALICE_SENDS = "Alice"  # the OpenAI `user` her client sends
LIMIT = 1000
N = 4  # concurrent calls for the overshoot
AGENTS = ("main", "a1", "a2", "a3")
UPSTREAM_PORT = 18800
STOP_MESSAGE = "Daily limit reached. Your budget resets at {reset_time}."
LOCAL_MESSAGE = "Stopped by the gateway: {tokens_used}/{tokens_limit}, resets at {reset_time}."


Service = Coroutine[Any, Any, None]


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def budgets(reset: datetime, action: str) -> dict[str, Any]:
    return {"per_user_budgets": {
        "default_limits": {"daily_tokens": LIMIT, "monthly_tokens": 1_000_000},
        "reset_schedule": {"daily_reset_time": reset.strftime("%H:%M"), "timezone": "UTC"},
        "warnings": [{"at_percent": 50, "message": "Half of your {period} budget is used"}],
        "on_limit_exceeded": {"action": action,
                              "hard_stop": {"message": STOP_MESSAGE, "status_code": 429},
                              "reduced_priority": {"force_model": "fake/cheap-model",
                                                   "message": "Over budget: cheaper model"}},
    }}


def users() -> dict[str, Any]:
    """Alice claims her gateway name; bob and carol are known by theirs only."""
    return {"user_identification": {"method": "api_key", "users": [
        {"id": ALICE, "identities": ["openai-user:alice"]}]}}


@contextlib.asynccontextmanager
async def running(start: Callable[[asyncio.Event], Service]) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(start(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def eventually(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def gateway_answers(chat: Chat, user: str, text: str, expected: str, meanwhile: str,
                          timeout: float = 30) -> None:
    """Ask until the gateway answers `expected`, as a decision this test has seen says it will.

    The gateway's plugin hears a decision a moment after this test's own cache does (another
    consumer, reached through the namespace's relay); until then it must answer as the
    decision before said: an answer starting with `meanwhile`.
    """
    deadline = time.monotonic() + timeout
    while (answer := await chat(user, text)) != expected:
        assert answer.startswith(meanwhile), f"{user} was answered {answer!r}"
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway still answers {answer!r}, not {expected!r}")
        await asyncio.sleep(0.2)


@dataclass
class Pipeline:
    """Tally's three services in this process, each a `running(...)` start function."""

    config_dir: Path
    bootstrap: str
    topics: Topics
    db: Path
    clock: Clock

    @classmethod
    def create(cls, tmp_path: Path, bootstrap: str, namespace: str, budgets: dict[str, Any],
               users: dict[str, Any], now: datetime) -> Pipeline:
        """Its config folder written, its clock at `now`."""
        config_dir = tmp_path / "config"
        config_dir.mkdir()
        (config_dir / "budgets.yaml").write_text(yaml.safe_dump(budgets))
        (config_dir / "users.yaml").write_text(yaml.safe_dump(users))
        return cls(config_dir, bootstrap, Topics(namespace), tmp_path / "p.db", Clock(now))

    def __iter__(self) -> Iterator[Callable[[asyncio.Event], Service]]:
        return iter((self.ingest, self.projector, self.enforcer))

    def ingest(self, stop: asyncio.Event) -> Service:
        return run_ingest(load_config(self.config_dir), self.bootstrap, self.topics, None, stop)

    def projector(self, stop: asyncio.Event) -> Service:
        return run_projector(load_config(self.config_dir), self.bootstrap, self.topics, self.db,
                             stop)

    def enforcer(self, stop: asyncio.Event) -> Service:
        return run_enforcer(self.config_dir, self.bootstrap, self.topics, stop, clock=self.clock,
                            tick_seconds=0.1)


class Chat:
    """POST /v1/chat/completions as a person would, through the relay into the namespace."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.seconds: list[float] = []

    async def __call__(self, user: str, text: str, agent: str = "main",
                       stream: bool = False) -> str:
        started = time.monotonic()
        response = await self.client.post("/v1/chat/completions", timeout=180, json={
            "model": f"openclaw/{agent}", "user": user, "stream": stream,
            "messages": [{"role": "user", "content": text}]})
        self.seconds.append(time.monotonic() - started)
        assert response.status_code == 200, response.text
        if stream:
            return "".join(
                (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content", "")
                for line in response.text.splitlines()
                if line.startswith("data: {"))
        content: str = response.json()["choices"][0]["message"]["content"]
        return content


def daily(cache: DecisionCache, user: str) -> tuple[str, int] | None:
    d: BudgetDecided | None = cache.get(user)
    return None if d is None else (d.action, d.daily.tokens_used)


def ledger(db: Path) -> list[tuple[str, str, str, int, int, int]]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT user_id, event_id, model, input_tokens, output_tokens, "
                           "tokens FROM ledger ORDER BY occurred_at").fetchall()


def stop_gateway(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


async def test_budgets_on_a_real_openclaw_gateway(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    paths = install()
    installed = time.monotonic() - started
    kafka_port = int(kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])
    now = datetime.now(UTC)
    reset = (now + timedelta(hours=6)).replace(second=0, microsecond=0)
    pipeline = Pipeline.create(tmp_path, kafka_bootstrap, f"oc-{unique_name}",
                               budgets(reset, "hard_stop"), users(), now)
    topics, config_dir, db = pipeline.topics, pipeline.config_dir, pipeline.db
    clock = pipeline.clock
    plugin = {"brokers": [f"127.0.0.1:{kafka_port}"], "namespace": topics.namespace,
              "localLimitMessage": LOCAL_MESSAGE}
    home = tmp_path / "openclaw"
    figures: dict[str, Any] = {"install_seconds": round(installed, 1)}

    ingest, projector, enforcer = pipeline

    with LoopbackNamespace() as ns:
        upstream = FakeUpstream(ns.listen_inside(UPSTREAM_PORT), IN, OUT).start()
        await ns.relay_out(kafka_port)
        outside_port = await ns.relay_in(PORT)
        home.mkdir()
        gateway = start_gateway(ns, paths, home, gateway_config(
            home, UPSTREAM_PORT, plugin, AGENTS))
        cache = DecisionCache(kafka_bootstrap, topics)
        try:
            async with (httpx.AsyncClient(base_url=f"http://127.0.0.1:{outside_port}",
                                          headers={"authorization": f"Bearer {TOKEN}"}) as client,
                        running(ingest), running(projector)):
                chat = Chat(client)
                async with running(enforcer):
                    figures["gateway_start_seconds"] = round(await wait_ready(client, gateway), 1)
                    await cache.start()
                    await scenario_before_the_limit(chat, upstream, cache, kafka_bootstrap,
                                                    topics)
                    figures.update(await scenario_overshoot(chat, upstream, cache))
                await scenario_local_stop(chat, upstream, cache)
                async with running(enforcer):
                    await scenario_past_the_limit(chat, upstream, cache, config_dir, reset,
                                                  clock)
                figures["call_seconds_median"] = round(sorted(chat.seconds)[len(chat.seconds) // 2],
                                                       2)
        finally:
            await cache.stop()
            stop_gateway(gateway)
            upstream.stop()
            keep_logs(home)

    check_ledger(db, upstream)
    carol = sum(row[5] for row in ledger(db) if row[0] == "openai-user:carol")
    figures["overshoot_tokens"] = carol - LIMIT
    assert figures["overshoot_tokens"] == figures["carol_admitted"] * PER_CALL - figures[
        "carol_remaining_before"]
    figures.update(hook_timing(home / "gateway.log"))
    figures["total_seconds"] = round(time.monotonic() - started, 1)
    report(figures)


async def scenario_before_the_limit(chat: Chat, upstream: FakeUpstream, cache: DecisionCache,
                                    bootstrap: str, topics: Topics) -> None:
    assert await chat("warmup", "warm up") == "Answer from big-model"  # the first chat is slow
    for i in range(3):
        assert await chat(ALICE_SENDS, f"alice-{i}") == "Answer from big-model"
    assert [r.model for r in upstream.calls("alice-")] == ["big-model"] * 3
    await eventually(lambda: daily(cache, ALICE) == ("allow", 360), "alice at 360")
    assert await chat("bob", "bob-0") == "Answer from big-model"

    # 600 of 1000: the warning. The HTTP reply is the model's own: message_sending, which
    # appends warnings, runs for channel deliveries only.
    for i in range(3, 5):
        assert await chat(ALICE_SENDS, f"alice-{i}") == "Answer from big-model"
    await eventually(lambda: daily(cache, ALICE) == ("warn", 600), "the warning")
    sent = [BudgetAlerted.model_validate_json(r.value or b"")
            for r in await read_to_end(bootstrap, topics.budget_alerts)]
    assert [(a.user_id, a.kind, a.threshold, a.message) for a in sent] == [
        (ALICE, "warning", 50, "Half of your daily budget is used")]


async def scenario_local_stop(chat: Chat, upstream: FakeUpstream, cache: DecisionCache) -> None:
    """The enforcer is paused: no new decision can arrive, the gateway counts on its own."""
    for i in range(5, 9):  # 720, 840, 960 (under the limit when sent), 1080
        assert await chat(ALICE_SENDS, f"alice-{i}") == "Answer from big-model"
    decided = cache.get(ALICE)
    assert decided is not None and decided.action == "warn"
    assert decided.identities == ("openai-user:alice",)  # how the plugin finds it
    before = len(upstream.calls("alice-"))
    assert await chat(ALICE_SENDS, "alice-local-stop") == LOCAL_MESSAGE.format(
        tokens_used=1080, tokens_limit=LIMIT, reset_time=decided.daily.reset_time)
    assert len(upstream.calls("alice-")) == before  # the upstream was not called


async def scenario_past_the_limit(chat: Chat, upstream: FakeUpstream, cache: DecisionCache,
                                  config_dir: Path, reset: datetime, clock: Clock) -> None:
    await eventually(lambda: daily(cache, ALICE) == ("hard_stop", 1080),
                     "the hard stop decision")
    decided = cache.get(ALICE)
    assert decided is not None and decided.message == STOP_MESSAGE.format(
        reset_time=decided.reset_time)
    before = len(upstream.calls())
    await gateway_answers(chat, ALICE_SENDS, "alice-stopped", decided.message,
                          meanwhile="Stopped by the gateway:")
    assert await chat(ALICE_SENDS, "alice-stopped-stream", stream=True) == decided.message
    assert len(upstream.calls()) == before
    assert await chat("bob", "bob-1") == "Answer from big-model"  # bob is not affected
    assert upstream.calls("bob-1")[0].model == "big-model"

    (config_dir / "budgets.yaml").write_text(yaml.safe_dump(budgets(reset, "reduced_priority")))
    await eventually(lambda: daily(cache, ALICE) == ("reduced_priority", 1080),
                     "reduced priority after the reload")
    await gateway_answers(chat, ALICE_SENDS, "alice-cheap", "Answer from cheap-model",
                          meanwhile=decided.message)
    assert [r.model for r in upstream.calls("alice-cheap")] == ["cheap-model"]

    clock.now = reset + timedelta(minutes=1)  # past the daily reset
    await eventually(lambda: daily(cache, ALICE) == ("allow", 0), "the reset")
    await gateway_answers(chat, ALICE_SENDS, "alice-next-day", "Answer from big-model",
                          meanwhile="Answer from cheap-model")
    assert upstream.calls("alice-next-day")[-1].model == "big-model"
    assert daily(cache, "openai-user:bob") == ("allow", 0)


async def scenario_overshoot(chat: Chat, upstream: FakeUpstream,
                             cache: DecisionCache) -> dict[str, Any]:
    """N calls at once, just under the limit: how far past it can one person get?"""
    # An agent's first run is slow (seconds): warm them so that the burst is concurrent.
    await asyncio.gather(*(chat("warmup", f"warm-{agent}", agent=agent) for agent in AGENTS))
    for i in range(8):
        await chat("carol", f"carol-{i}")
    await eventually(lambda: daily(cache, "openai-user:carol") == ("warn", 960), "carol at 960")
    upstream.delay = 1.0  # every call of the burst is admitted before any has finished
    answers = await asyncio.gather(*(chat("carol", f"carol-burst-{agent}", agent=agent)
                                     for agent in AGENTS))
    upstream.delay = 0.0
    admitted = sum(a == "Answer from big-model" for a in answers)
    await eventually(lambda: (daily(cache, "openai-user:carol") or ("", 0))[1]
                     == 960 + admitted * PER_CALL, "the burst counted")
    stopped = cache.get("openai-user:carol")
    message = stopped.message if stopped is not None else None
    assert message is not None and message.startswith("Daily limit reached.")
    await gateway_answers(chat, "carol", "carol-after", message,
                          meanwhile="Stopped by the gateway:")
    assert upstream.calls("carol-after") == []
    return {"concurrent_calls": N, "carol_admitted": admitted, "carol_remaining_before": 40,
            "tokens_per_call": PER_CALL, "burst_answers": answers}


def check_ledger(db: Path, upstream: FakeUpstream) -> None:
    """Every call that reached the upstream is in DuckDB once, with exactly its tokens."""
    rows = ledger(db)
    assert len(rows) == len(upstream.calls()) == len({row[1] for row in rows})
    assert all(re.fullmatch(r"openclaw:chatcmpl_[0-9a-f-]+:1", row[1]) for row in rows)
    assert {(row[3], row[4], row[5]) for row in rows} == {(IN, OUT, PER_CALL)}
    by_user: dict[str, int] = {}
    for user, _, _, _, _, tokens in rows:
        by_user[user] = by_user.get(user, 0) + tokens
    alice_calls = len(upstream.calls("alice-"))
    # 9 calls before the stop, one on the cheap model, one the next day; more on the cheap
    # model if the gateway was still routing there when the day turned
    assert by_user[ALICE] == alice_calls * PER_CALL >= 11 * PER_CALL
    assert "openai-user:alice" not in by_user  # all counted under her users.yaml id
    assert by_user["openai-user:bob"] == 2 * PER_CALL
    assert [row[2] for row in rows if row[0] == ALICE].count("cheap-model") == len(
        [r for r in upstream.calls("alice-") if r.model == "cheap-model"]) == alice_calls - 10


def hook_timing(log: Path) -> dict[str, Any]:
    """The plugin's own measure of its hooks, logged when the gateway stops."""
    found = re.search(r"hooks took ([\d.]+) µs on average, ([\d.]+) µs at most, over (\d+)",
                      log.read_text(errors="replace") if log.exists() else "")
    if not found:
        return {}
    return {"hook_mean_us": float(found[1]), "hook_max_us": float(found[2]),
            "hook_calls": int(found[3])}


ARTIFACTS = project_root() / "test-artifacts" / "openclaw-e2e"


def keep_logs(home: Path, folder: Path = ARTIFACTS) -> None:
    """The gateway's logs outlive pytest's temporary folders, for a failure's post-mortem."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("gateway.out", "gateway.log"):
        if (home / name).exists():
            shutil.copyfile(home / name, folder / name)


def report(figures: dict[str, Any], folder: Path = ARTIFACTS) -> None:
    (folder / "figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(f"{folder.name}:", json.dumps(figures))
