"""The hostile-input suite: the three services as real processes on the real broker, fed
generated hostile records interleaved with valid ones through every door a careless or
hostile producer has: POST /v1/usage (as a user and as the gateway), usage.raw, and
usage.events directly (a producer that bypasses the ingest), plus garbage on the snapshot
topics the enforcer and the decision cache read.

Hostile records are generated with hypothesis: any JSON value in any field, the extremes
of every number and date, huge strings, control characters, invalid UTF-8, values just
under the broker's size limit. Whether a record is valid is decided here, by rules written
independently of the code under test (`valid_count`, `valid_text`, the mutations below are
invalid by construction).

Then: every service is still alive and ready; every valid event is in the ledger exactly
once; every invalid record is in `rejected` with a reason (by its source: topic, partition
and offset, or the HTTP endpoint); and the decisions equal `tally simulate` over the valid
events.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from aiokafka.errors import MessageSizeTooLargeError
from hypothesis import strategies as st

from bench.faults.services import Service, service_env
from tally.kafka import make_producer, read_to_end
from tally.topics import Topics
from tally.wire import BudgetDecided
from tests.conftest import free_port

# One corpus per run, drawn with .example(): the services are long-lived processes, so
# hypothesis' per-example loop (and its shrinking) does not fit; its strategies do.
pytestmark = [pytest.mark.kafka, pytest.mark.filterwarnings(
    "ignore::hypothesis.errors.NonInteractiveExampleWarning")]

ALICE_KEY, GATEWAY_KEY, ADMIN_KEY = "ak_alice_hostile_0001", "ak_gw_hostile_0002", "ak_ad_0003"
USERS = {"user_identification": {"users": [
    {"id": "alice", "api_key": ALICE_KEY, "identities": ["openai-user:alice"]},
    {"id": "bob"},
    {"id": "carol", "api_key": ADMIN_KEY, "role": "admin"},
    {"id": "gw", "api_key": GATEWAY_KEY, "gateway": True},
]}}
BUDGETS = {"per_user_budgets": {
    "default_limits": {"daily_tokens": 40_000, "monthly_tokens": 1_000_000},
    "role_limits": {"admin": 40_000},
    "warnings": [{"at_percent": 50, "message": "half of your {period} budget"}],
    "on_limit_exceeded": {"action": "hard_stop"},
}}
USER_IDS = ("alice", "bob", "discord:77")  # discord:77: an identity nobody claims
COUNTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
TEXTS = ("event_id", "user_id", "model")
OPTIONAL_TEXTS = ("provider", "session_key", "channel", "request_id", "source")
SEED = 20261202


def dumps(value: object) -> bytes:
    """JSON of any value, integers past 64 bits included (orjson refuses those)."""
    return json.dumps(value).encode()


# what is valid, by the test's own rules -----------------------------------------------------


def valid_count(value: object) -> bool:
    return type(value) is int and 0 <= value <= 10**9


def valid_text(value: object) -> bool:
    return (isinstance(value, str) and 1 <= len(value) <= 200
            and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in value))


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=3),
    max_leaves=6)
EXTREME_COUNTS = st.sampled_from([-1, -(2**63), 10**9 + 1, 2**63 - 1, 2**63, 2**64,
                                  9 * 10**18, True, False, "100", 1.5, 1e300, None])
BAD_COUNT = EXTREME_COUNTS | JSON.filter(lambda v: not valid_count(v))
# Invalid wherever they are read: the projector's static window included.
BAD_TIME = st.sampled_from([
    "9999-12-31T23:59:59Z", "0001-01-01T05:00:00+14:00", "1999-12-31T23:59:59Z",
    "2200-01-01T00:00:00Z", "2026-13-01T00:00:00Z", "2026-12-01T10:00:00", "yesterday", "",
    "2026-12-01T10:00:00+25:00",
]) | JSON.filter(lambda v: not isinstance(v, str))
CONTROL = st.builds(lambda a, c, b: a + c + b, st.text(max_size=5),
                    st.sampled_from(["\n", "\r", "\x00", "\x1b", "\x7f", "\t"]),
                    st.text(max_size=5))
BAD_TEXT = (st.just("") | st.text(min_size=201, max_size=400) | CONTROL
            | JSON.filter(lambda v: not isinstance(v, str)))
BAD_OPTIONAL = (st.text(min_size=201, max_size=400) | CONTROL
                | JSON.filter(lambda v: v is not None and not isinstance(v, str)))


def mutation() -> st.SearchStrategy[tuple[str, object]]:
    """One field of an event made invalid (or removed, for a required field)."""
    return st.one_of(
        st.tuples(st.sampled_from(COUNTS), BAD_COUNT),
        st.tuples(st.just("occurred_at"), BAD_TIME),
        st.tuples(st.sampled_from(TEXTS), BAD_TEXT),
        st.tuples(st.sampled_from(OPTIONAL_TEXTS), BAD_OPTIONAL),
        st.tuples(st.sampled_from(("event_id", "occurred_at", "model", "input_tokens")),
                  st.just(REMOVE)),
    )


REMOVE = object()


@dataclass
class Corpus:
    """What was sent, and what must come of it."""

    now: datetime
    rng: random.Random = field(default_factory=lambda: random.Random(SEED))
    valid: dict[str, dict[str, Any]] = field(default_factory=dict)  # event_id -> event
    rejected_sources: set[str] = field(default_factory=set)  # kafka:topic[p]@o
    http_rejections: int = 0
    sent_hostile: list[dict[str, Any]] = field(default_factory=list)
    serial: int = 0

    def event(self, user_id: str | None = None) -> dict[str, Any]:
        self.serial += 1
        at = self.now - timedelta(seconds=self.rng.randint(0, 300))
        event: dict[str, Any] = {
            "event_id": f"ok-{self.serial}", "occurred_at": at.isoformat(),
            "user_id": user_id or self.rng.choice(USER_IDS), "model": "m",
            "input_tokens": self.rng.randint(0, 3000), "output_tokens": self.rng.randint(0, 900)}
        if self.rng.random() < 0.3:
            event["cache_read_tokens"] = 10**9 if self.rng.random() < 0.02 else 5
        return event

    def good(self, event: dict[str, Any]) -> dict[str, Any]:
        self.valid[event["event_id"]] = event
        return event

    def hostile(self, user_id: str | None = None) -> dict[str, Any]:
        event = self.event(user_id)
        event["event_id"] = f"bad-{self.serial}"
        for _ in range(self.rng.randint(1, 3)):
            name, value = mutation().example()
            if value is REMOVE:
                event.pop(name, None)
            else:
                event[name] = value
        self.sent_hostile.append(event)
        return event


def garbage() -> list[bytes]:
    """Whole records that are no event at all."""
    values = [b"", b"null", b"[]", b"42", b'"alice"', b"{", b"\xff\xfe\xfd", "é".encode() * 9,
              b'{"event_id": "x"}' + b"\x00" * 5, dumps([{"event_id": "x"}])]
    values += [dumps(JSON.example()) for _ in range(6)]
    values += [st.binary(min_size=1, max_size=200).example() for _ in range(4)]
    return [v for v in values if v not in (b"{}",)]


# the services --------------------------------------------------------------------------------


@dataclass
class Running:
    services: dict[str, Service]
    ports: dict[str, int]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"


@asynccontextmanager
async def services(bootstrap: str, topics: Topics, config_dir: Path, data: Path,
                   ) -> AsyncIterator[Running]:
    ports = {name: free_port() for name in ("ingest", "projector", "enforcer")}
    env = service_env({
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "TALLY_TOPIC_NAMESPACE": topics.namespace,
        "TALLY_CONFIG_DIR": str(config_dir), "TALLY_DATA_DIR": str(data),
        **{f"TALLY_{name.upper()}_PORT": str(port) for name, port in ports.items()}})
    logs = data / "logs"
    logs.mkdir(parents=True)
    running = {name: Service(name, [], env, logs) for name in ports}
    for service in running.values():
        service.start()
    try:
        yield Running(running, ports)
    finally:
        await asyncio.gather(*(s.stop() for s in running.values()))


async def until(check: Callable[[], Any], what: str, timeout: float = 120) -> None:
    try:
        async with asyncio.timeout(timeout):
            while not await check():
                await asyncio.sleep(0.3)
    except TimeoutError:
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}") from None


async def ready(client: httpx.AsyncClient, run: Running) -> bool:
    try:
        answers = [await client.get(f"{run.url(name)}/readyz") for name in run.ports]
    except httpx.TransportError:
        return False
    return all(a.status_code == 200 for a in answers)


async def readiness(client: httpx.AsyncClient, run: Running) -> dict[str, str]:
    """Each service's /readyz answer, to say which one is not ready and why."""
    answers = {}
    for name in run.ports:
        try:
            answer = await client.get(f"{run.url(name)}/readyz")
            answers[name] = f"{answer.status_code} {answer.text}"
        except httpx.TransportError as e:
            answers[name] = repr(e)
    return answers


async def audit(client: httpx.AsyncClient, run: Running, sql: str) -> list[list[Any]]:
    response = await client.post(f"{run.url('projector')}/audit", json={"sql": sql},
                                 headers={"x-api-key": ADMIN_KEY})
    assert response.status_code == 200, response.text
    rows: list[list[Any]] = response.json()["rows"]
    return rows


# feeding -------------------------------------------------------------------------------------


async def feed_http(client: httpx.AsyncClient, run: Running, corpus: Corpus) -> None:
    url = f"{run.url('ingest')}/v1/usage"
    for round_ in range(12):
        as_gateway = round_ % 3 == 0
        headers = {"x-api-key": GATEWAY_KEY if as_gateway else ALICE_KEY}
        items: list[Any] = []
        bad = 0
        for _ in range(corpus.rng.randint(1, 5)):
            user = None if as_gateway else "alice"
            if corpus.rng.random() < 0.5:
                items.append(corpus.good(corpus.event(user)))
            else:
                items.append(corpus.hostile(user))
                bad += 1
        if corpus.rng.random() < 0.2:
            items.append(JSON.filter(lambda v: not isinstance(v, dict)).example())
            bad += 1
        response = await client.post(url, content=dumps(items), headers=headers)
        assert response.status_code in (202, 400), response.text
        corpus.http_rejections += bad
    for body in (b"\xff" * 1_000_000, b"[]", b"not json", b"\xc3\x28", b'"x"', b"{" * 5000):
        response = await client.post(url, content=body, headers={"x-api-key": ALICE_KEY})
        assert response.status_code == 400, (body[:20], response.text)
        corpus.http_rejections += 1
    too_big = await client.post(url, content=b" " * (2 * 1024 * 1024),
                                headers={"x-api-key": ALICE_KEY})
    assert too_big.status_code == 413  # refused before it is read: nothing to record


async def feed_topic(bootstrap: str, topic: str, values: list[tuple[bytes, bool]],
                     corpus: Corpus, keys: tuple[bytes | None, ...] = (None,)) -> None:
    """Send each value; an invalid one must end up in `rejected` under its position."""
    producer = make_producer(bootstrap)
    await producer.start()
    try:
        for index, (value, valid) in enumerate(values):
            sent = await producer.send_and_wait(topic, value, key=keys[index % len(keys)])
            if not valid:
                corpus.rejected_sources.add(f"kafka:{topic}[{sent.partition}]@{sent.offset}")
        with pytest.raises(MessageSizeTooLargeError):  # over the limit: refused at the source
            await producer.send_and_wait(topic, b"x" * (2 * 1024 * 1024), key=keys[0])
    finally:
        await producer.stop()


def mixed(corpus: Corpus, count: int = 40) -> list[tuple[bytes, bool]]:
    """Valid and hostile events, half and half, then whole records of garbage."""
    values = [(dumps(corpus.good(corpus.event())), True) if corpus.rng.random() < 0.5
              else (dumps(corpus.hostile()), False) for _ in range(count)]
    return values + [(v, False) for v in garbage()]


def raw_values(corpus: Corpus) -> list[tuple[bytes, bool]]:
    values = mixed(corpus)
    values.append(("€".encode() * 333_000, False))  # just under the broker's 1 MB limit
    for event_id in corpus.rng.sample(sorted(corpus.valid), 5):  # copies count once
        values.append((dumps(corpus.valid[event_id]), True))
    corpus.rng.shuffle(values)
    return values


def direct_values(corpus: Corpus) -> list[tuple[bytes, bool]]:
    """For usage.events: a producer that skips the ingest (no identity resolution, no
    window around the clock; unknown keys ignored)."""
    values = mixed(corpus)
    pills: list[dict[str, Any]] = [{"occurred_at": "9999-12-31T23:59:59Z"}, {"input_tokens": 2**63},
             {"input_tokens": 9 * 10**18, "output_tokens": 9 * 10**18},
             {"input_tokens": 5 * 10**18}, {"input_tokens": 5 * 10**18}]
    for pill in pills:
        values.append((dumps(corpus.hostile("bob") | pill), False))
    corpus.rng.shuffle(values)
    return values


def snapshot_garbage() -> list[bytes]:
    return [*garbage(), dumps({"user_id": "alice", "daily": {"x": 1}}),
            dumps({"user_id": "alice", "action": "hard_stop", "tokens_used": 2**70})]


# expectations ------------------------------------------------------------------------------


def simulated(config_dir: Path, corpus: Corpus, tmp_path: Path) -> dict[str, tuple[Any, ...]]:
    events = tmp_path / "valid.jsonl"
    events.write_text("".join(json.dumps(e) + "\n" for e in corpus.valid.values()))
    done = subprocess.run(
        [sys.executable, "-m", "tally.cli", "simulate", "--config", str(config_dir),
         "--events", str(events), "--at", datetime.now(UTC).isoformat()],
        capture_output=True, text=True, check=True)
    return {row["user_id"]: (row["status"], row["decision"]["action"], row["daily_used"],
                             row["monthly_used"]) for row in json.loads(done.stdout)["users"]}


async def decided(bootstrap: str, topics: Topics) -> dict[str, tuple[Any, ...]]:
    latest: dict[str, tuple[Any, ...]] = {}
    for record in await read_to_end(bootstrap, topics.budget_decisions):
        try:
            d = BudgetDecided.model_validate_json(record.value or b"")
        except ValueError:
            continue  # the garbage this test wrote there itself
        latest[d.user_id] = (d.status, d.action, d.daily.tokens_used, d.monthly.tokens_used)
    return latest


# the test ----------------------------------------------------------------------------------


async def test_no_hostile_record_stops_a_service_or_is_lost(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    topics = Topics(f"hostile-{unique_name}")
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "users.yaml").write_text(yaml.safe_dump(USERS))
    (config_dir / "budgets.yaml").write_text(yaml.safe_dump(BUDGETS))
    corpus = Corpus(datetime.now(UTC))
    async with (services(kafka_bootstrap, topics, config_dir, tmp_path / "data") as run,
                httpx.AsyncClient(timeout=30) as client):
        await until(lambda: ready(client, run), "the services to be ready")
        await feed_http(client, run, corpus)
        await feed_topic(kafka_bootstrap, topics.usage_raw, raw_values(corpus), corpus)
        await feed_topic(kafka_bootstrap, topics.usage_events, direct_values(corpus), corpus)
        for topic in (topics.budget_balances, topics.budget_decisions, topics.budget_alerts):
            # Compacted topics take keyed records only: some keys are not even UTF-8.
            await feed_topic(kafka_bootstrap, topic, [(v, True) for v in snapshot_garbage()],
                             corpus, keys=(b"alice", b"\xff\xfe", b"bob\nx"))

        # Everything valid is counted, and every invalid record is recorded as rejected.
        want_ids = sorted(corpus.valid)
        kafka_sources = f"source LIKE 'kafka:{topics.namespace}.%'"

        async def settled() -> bool:
            try:
                ledger = await audit(client, run, "SELECT count(*) FROM ledger")
                rejected = await audit(client, run, f"SELECT count(*) FROM rejected WHERE "
                                                    f"{kafka_sources}")
            except httpx.TransportError:  # judged below: alive, ready, one start each
                return False
            return bool(ledger[0][0] >= len(want_ids)
                        and rejected[0][0] >= len(corpus.rejected_sources))

        await until(settled, "every record to be counted or rejected")
        want = simulated(config_dir, corpus, tmp_path)
        await until(lambda: _equal(decided(kafka_bootstrap, topics), want),
                    "the decisions to equal tally simulate")

        ledger = await audit(client, run, "SELECT event_id, count(*) FROM ledger GROUP BY 1")
        assert sorted(ledger) == [[event_id, 1] for event_id in want_ids]
        rejected = await audit(client, run, f"SELECT source, reason FROM rejected WHERE "
                                            f"{kafka_sources}")
        assert {source for source, _ in rejected} == corpus.rejected_sources
        assert all(reason for _, reason in rejected)
        http = await audit(client, run, "SELECT count(*) FROM rejected "
                                        "WHERE source = 'http:POST /v1/usage'")
        assert http == [[corpus.http_rejections]]
        assert await decided(kafka_bootstrap, topics) == want

        # Every service is still the process it was, and ready.
        assert await ready(client, run), await readiness(client, run)
        for name, service in run.services.items():
            assert service.alive() and service.stats.exits == [], (name, service.stats)
            assert service.stats.starts == 1, name
    projector_log = (tmp_path / "data" / "logs" / "projector.log").read_text()
    assert f"skipping usage event kafka:{topics.usage_events}[" in projector_log


async def _equal(found: Any, want: dict[str, tuple[Any, ...]]) -> bool:
    return bool(await found == want)
