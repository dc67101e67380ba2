"""The projector against a real broker: exact balances, publishing, kill -9, replay, audit."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from tally.config.loader import load_config
from tally.config.models import Config
from tally.core.usage import UserUsage, fold_events, from_balance
from tally.kafka import (
    ensure_topics,
    make_consumer,
    make_producer,
    partitions_of,
    read_to_end,
)
from tally.services.projector import store
from tally.services.projector.app import run_projector
from tally.topics import Topics
from tally.wire import PERIOD_NAMES, BalanceUpdated, RejectedEvent, UsageRecorded

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
BUDGETS = """
per_user_budgets:
  default_limits: {daily_tokens: 1000, monthly_tokens: 100000}
  reset_schedule: {daily_reset_time: "06:00", monthly_reset_day: 31,
                   timezone: "America/New_York"}
  counted_tokens: [input_tokens, output_tokens, cache_write_tokens]
"""
# The audit is for admins (tally.access): the one users.yaml user is an auditor.
USERS_YAML = """
user_identification:
  users:
    - {id: auditor, api_key: ak_auditor_0123456789, role: admin}
    - {id: viewer, api_key: ak_viewer_01234567890}
"""
ADMIN = {"X-API-Key": "ak_auditor_0123456789"}
VIEWER = {"X-API-Key": "ak_viewer_01234567890"}  # known, not an admin
START = datetime(2025, 2, 20, tzinfo=UTC)  # the span crosses the US DST change of March 9
USERS = ("alice", "bob", "carol", "dave", "erin")


@pytest.fixture
def config(config_dir: Path) -> Config:
    return load_config(config_dir)


def make_events(count: int, seed: int, prefix: str = "e") -> list[UsageRecorded]:
    rng = random.Random(seed)
    return [
        UsageRecorded(
            event_id=f"{prefix}{i}", user_id=rng.choice(USERS),
            occurred_at=START + timedelta(seconds=rng.randrange(40 * 86400)),
            model=rng.choice(("claude-sonnet", "gpt-5", "haiku")), provider="p",
            input_tokens=rng.randrange(1000), output_tokens=rng.randrange(500),
            cache_read_tokens=rng.randrange(100), cache_write_tokens=rng.randrange(50),
            role=rng.choice(("dev", "ops", None)), department=rng.choice(("eng", None)),
        )
        for i in range(count)
    ]


def of_the_last_minutes(events: list[UsageRecorded]) -> list[UsageRecorded]:
    """The events moved to the last 90 seconds: the projector judges them in memory."""
    now = datetime.now(UTC)
    return [e.model_copy(update={"occurred_at": now - timedelta(seconds=i % 90)})
            for i, e in enumerate(events)]


def with_duplicates(events: list[UsageRecorded], every: int) -> list[UsageRecorded]:
    """Each `every`-th event is sent twice, the copy a little later in the stream."""
    out: list[UsageRecorded] = []
    for i, event in enumerate(events):
        out.append(event)
        if i % every == every - 1:
            out.insert(max(0, len(out) - every // 2), events[i - 1])
    return out


def expected(events: Iterable[UsageRecorded], config: Config) -> dict[str, UserUsage]:
    return fold_events(events, config.budgets.per_user_budgets)


def period_rows(usages: dict[str, UserUsage]) -> set[tuple[Any, ...]]:
    return {(u.user_id, kind, start, tokens)
            for u in usages.values()
            for kind, periods in u.periods.items()
            for start, tokens in periods.items()}


async def produce(bootstrap: str, topic: str, values: Iterable[tuple[bytes, bytes]],
                  pause_every: int = 0) -> None:
    producer = make_producer(bootstrap, linger_ms=5)
    await producer.start()
    try:
        sent = []
        for i, (key, value) in enumerate(values):
            sent.append(await producer.send(topic, value, key=key))
            if pause_every and i % pause_every == pause_every - 1:
                await asyncio.sleep(0.02)  # a stream that keeps arriving, not one burst
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def usage_messages(events: Iterable[UsageRecorded]) -> list[tuple[bytes, bytes]]:
    return [(e.user_id.encode(), e.model_dump_json().encode()) for e in events]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def audit(port: int, sql: str) -> Any:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"http://127.0.0.1:{port}/audit", json={"sql": sql},
                                     headers=ADMIN)
    return response.json()


async def wait_for_offsets(port: int, topic: str, total: int, timeout: float = 120) -> None:
    """Until the projector has committed `total` records of `topic` (partitions from 0)."""
    sql = f"SELECT coalesce(sum(next_offset), 0) FROM offsets WHERE topic = '{topic}'"
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            if (await audit(port, sql))["rows"][0][0] >= total:
                return
        except httpx.TransportError:
            pass  # not listening yet
        await asyncio.sleep(0.1)
    raise AssertionError(f"projector did not reach {total} records of {topic}")


@asynccontextmanager
async def projector_task(config: Config, bootstrap: str, topics: Topics, db: Path,
                         port: int) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(run_projector(config, bootstrap, topics, db, stop, port))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def db_rows(db: Path, sql: str) -> set[tuple[Any, ...]]:
    with duckdb.connect(str(db), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        return set(con.execute(sql).fetchall())


BALANCES = "SELECT user_id, period, period_start, tokens FROM balances"
RECOUNT = " UNION ALL ".join(
    f"SELECT user_id, '{kind}', {kind}_start, sum(tokens) FROM ledger GROUP BY ALL"
    for kind in PERIOD_NAMES)


async def latest_balances(bootstrap: str, topic: str, users: int) -> dict[str, BalanceUpdated]:
    """The newest BalanceUpdated per user on budget.balances (read from the start)."""
    consumer = make_consumer(bootstrap)
    await consumer.start()
    parts = await partitions_of(consumer, topic)
    consumer.assign(parts)
    await consumer.seek_to_beginning(*parts)
    latest: dict[str, BalanceUpdated] = {}
    try:
        end = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < end:
            fetched = await consumer.getmany(timeout_ms=500)
            for message in (m for ms in fetched.values() for m in ms):
                balance = BalanceUpdated.model_validate_json(message.value)
                assert message.key == balance.user_id.encode()
                latest[balance.user_id] = balance
            if len(latest) >= users and not fetched:
                break
    finally:
        await consumer.stop()
    return latest


# the tests ---------------------------------------------------------------------------------


async def test_live_projector_balances_publishing_and_audit(
    kafka_bootstrap: str, unique_name: str, config: Config, config_dir: Path, tmp_path: Path
) -> None:
    topics = Topics(f"proj-{unique_name}")
    events = make_events(3000, seed=1)
    sent = with_duplicates(events, every=50)
    rejected = [RejectedEvent(reason=r, source="http:POST /v1/usage", original="{}",
                              rejected_at=START) for r in ("bad json", "bad json", "no user")]
    db, port = tmp_path / "live.duckdb", free_port()
    async with projector_task(config, kafka_bootstrap, topics, db, port):
        await produce(kafka_bootstrap, topics.usage_events,
                      [*usage_messages(sent), (b"x", b"not json")])
        await produce(kafka_bootstrap, topics.usage_dlq,
                      [(b"", r.model_dump_json().encode()) for r in rejected])
        await wait_for_offsets(port, topics.usage_events, len(sent) + 1)
        # + 1: the "not json" record, which the projector dead-letters itself
        await wait_for_offsets(port, topics.usage_dlq, len(rejected) + 1)
        await check_audit_command(port, db, config_dir)
        published = await latest_balances(kafka_bootstrap, topics.budget_balances, len(USERS))
    want = expected(events, config)
    assert db_rows(db, BALANCES) == period_rows(want)
    assert db_rows(db, "SELECT count(*) FROM ledger") == {(len(events),)}
    assert period_rows({u: from_balance(b) for u, b in published.items()}) == period_rows(want)
    assert {(b.user_id, b.role, b.department) for b in published.values()} == {
        (u.user_id, u.role, u.department) for u in want.values()}
    assert db_rows(db, "SELECT user_id, role, department FROM users") == {
        (u.user_id, u.role, u.department) for u in want.values()}
    reasons = db_rows(db, "SELECT reason, events FROM rejected_by_reason")
    assert {(r, n) for r, n in reasons if not r.startswith("projector:")} == {
        ("bad json", 2), ("no user", 1)}
    dead = db_rows(db, "SELECT source, original FROM rejected WHERE reason LIKE 'projector:%'")
    assert len(dead) == 1
    ((source, original),) = dead
    assert source.startswith(f"kafka:{topics.usage_events}[") and original == "not json"


async def check_audit_command(port: int, db: Path, config_dir: Path) -> None:
    """`tally audit` answers an admin through the running projector, explains a refusal in
    one line, and refuses a write."""
    url = f"http://127.0.0.1:{port}"
    count = ("audit", "SELECT count(*) AS n FROM ledger", "--url", url)
    code, out, err = await run_tally(*count, "--format", "csv",
                                     env={"TALLY_API_KEY": ADMIN["X-API-Key"]})
    assert code == 0, err
    assert out.splitlines()[0] == "n" and int(out.splitlines()[1]) > 0
    code, _, err = await run_tally(*count, env={"TALLY_API_KEY": ""})
    assert code == 1 and err.startswith("tally audit: the audit needs an admin credential: "
                                        "set TALLY_API_KEY") and len(err.splitlines()) == 1
    code, _, err = await run_tally("audit", "DELETE FROM ledger", "--url", url)
    assert code == 1 and "read-only" in err
    code, _, err = await run_tally("audit", "SELEC nonsense", "--url", url)
    assert code == 1 and "tally audit:" in err


async def run_tally(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tally.cli", *args, cwd=ROOT, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode or 0, out.decode(), err.decode()


@asynccontextmanager
async def projector_process(bootstrap: str, topics: Topics, db: Path, config_dir: Path,
                            port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """`tally projector` as a child process; killed at the end if still running."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tally.cli", "projector", "--config", str(config_dir),
        "--db", str(db), "--port", str(port), cwd=ROOT,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
             "TALLY_TOPIC_NAMESPACE": topics.namespace})
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def wait_for_ledger(port: int, at_least: int, timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            if (await audit(port, "SELECT count(*) FROM ledger"))["rows"][0][0] >= at_least:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError(f"ledger never reached {at_least} rows")


async def test_kill_9_mid_stream_neither_loses_nor_double_counts(
    kafka_bootstrap: str, unique_name: str, config: Config, config_dir: Path, tmp_path: Path
) -> None:
    topics = Topics(f"kill-{unique_name}")
    events = make_events(50_000, seed=2)
    sent = with_duplicates(events, every=40)
    db, port = tmp_path / "killed.duckdb", free_port()
    async with projector_process(kafka_bootstrap, topics, db, config_dir, port) as first:
        producing = asyncio.create_task(produce(kafka_bootstrap, topics.usage_events,
                                                usage_messages(sent), pause_every=1000))
        await wait_for_ledger(port, 10_000)
        first.send_signal(signal.SIGKILL)
        await first.wait()
    killed_at = db_rows(db, "SELECT count(*) FROM ledger").pop()[0]
    assert 0 < killed_at < len(events), "the kill should land in the middle of the stream"
    await producing
    async with projector_process(kafka_bootstrap, topics, db, config_dir, port) as second:
        await wait_for_offsets(port, topics.usage_events, len(sent))
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 30) == 0
    assert db_rows(db, BALANCES) == db_rows(db, RECOUNT)
    assert db_rows(db, BALANCES) == period_rows(expected(events, config))
    assert db_rows(db, "SELECT count(*), count(DISTINCT event_id) FROM ledger") == {
        (len(events), len(events))}


async def test_replay_rebuilds_what_the_live_projector_built(
    kafka_bootstrap: str, unique_name: str, config: Config, config_dir: Path, tmp_path: Path
) -> None:
    topics = Topics(f"replay-{unique_name}")
    sent = with_duplicates(make_events(5000, seed=3), every=30)
    rejected = RejectedEvent(reason="no user", source="s", original="{}", rejected_at=START)
    live, port = tmp_path / "live.duckdb", free_port()
    async with projector_task(config, kafka_bootstrap, topics, live, port):
        await produce(kafka_bootstrap, topics.usage_events, usage_messages(sent))
        await produce(kafka_bootstrap, topics.usage_dlq, [(b"", rejected.model_dump_json()
                                                            .encode())])
        await wait_for_offsets(port, topics.usage_events, len(sent))
        await wait_for_offsets(port, topics.usage_dlq, 1)
    rebuilt = tmp_path / "rebuilt.duckdb"
    rebuilt.write_bytes(b"")
    env = {"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap, "TALLY_TOPIC_NAMESPACE": topics.namespace}
    replay = ("replay", "--config", str(config_dir), "--db", str(rebuilt))
    code, _, err = await run_tally(*replay, env=env)
    assert code == 1 and "--force" in err
    code, out, err = await run_tally(*replay, "--force", env=env)
    assert code == 0, err
    assert f"replayed {len(sent) + 1:,} events" in out and "events/s" in out
    for table in ("ledger", "balances", "rejected", "offsets", "users"):
        assert db_rows(rebuilt, f"FROM {table}") == db_rows(live, f"FROM {table}"), table
    # The partition count it was written under, as the projector records it.
    name = f"partitions:{topics.usage_events}"
    count = f"FROM store_settings WHERE name = '{name}'"
    assert db_rows(rebuilt, count) == db_rows(live, count) == {(name, "3")}
    # No projector listens: `tally audit` opens the file read-only itself.
    code, out, err = await run_tally("audit", "SELECT sum(events) AS n FROM usage_by_model",
                                     "--db", str(rebuilt), "--url", f"http://127.0.0.1:{port}")
    assert code == 0, err
    assert out.split() == ["n", "----", str(len({e.event_id for e in sent}))]


def failing_on(culprit: str | None) -> Any:
    """store.finish_batch that fails (rolled back, as DuckDB would) for a batch holding
    `culprit`, or for every batch when it is None: a fault no range check foresaw."""
    real = store.finish_batch

    def finish(con: duckdb.DuckDBPyConnection, applied: store.Applied, *args: Any) -> None:
        ids = applied.new.column("event_id").to_pylist()
        if culprit is None or culprit in ids:
            con.execute("ROLLBACK")
            raise duckdb.ConversionException("simulated: this batch cannot be written")
        real(con, applied, *args)

    return finish


@pytest.mark.parametrize("recent", [False, True], ids=["judged-by-duckdb", "judged-in-memory"])
async def test_a_batch_that_fails_as_a_whole_is_split_until_the_culprit_is_found(
    kafka_bootstrap: str, unique_name: str, config: Config, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, recent: bool,
) -> None:
    """In memory, the failing write overlaps the next batch, or is the last one."""
    topics = Topics(f"split-{unique_name}")
    events = make_events(400, seed=4)
    events = of_the_last_minutes(events) if recent else events
    culprit = events[137].event_id
    monkeypatch.setattr(store, "finish_batch", failing_on(culprit))
    db, port = tmp_path / "split.duckdb", free_port()
    await ensure_topics(kafka_bootstrap, topics, 3)
    await produce(kafka_bootstrap, topics.usage_events, usage_messages(events))
    async with projector_task(config, kafka_bootstrap, topics, db, port):
        await wait_for_offsets(port, topics.usage_events, len(events))
        await wait_for_offsets(port, topics.usage_dlq, 1)  # the culprit, dead-lettered
        published = await latest_balances(kafka_bootstrap, topics.budget_balances, len(USERS))
    counted = [e for e in events if e.event_id != culprit]
    want = expected(counted, config)
    assert db_rows(db, "SELECT count(*), count(DISTINCT event_id) FROM ledger") == {
        (len(counted), len(counted))}
    assert db_rows(db, BALANCES) == period_rows(want)
    assert period_rows({u: from_balance(b) for u, b in published.items()}) == period_rows(want)
    [(reason, source)] = db_rows(db, "SELECT reason, source FROM rejected")
    assert reason == "projector: this record fails the fold even alone"
    assert source.startswith(f"kafka:{topics.usage_events}[")


async def test_a_store_that_fails_every_write_blames_no_record(
    kafka_bootstrap: str, unique_name: str, config: Config, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full disk is no record's fault: the projector stops (to be restarted), with nothing
    dead-lettered and nothing counted."""
    topics = Topics(f"nodisk-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, 3)
    await produce(kafka_bootstrap, topics.usage_events, usage_messages(make_events(20, 5)))
    monkeypatch.setattr(store, "finish_batch", failing_on(None))
    stop = asyncio.Event()
    run = run_projector(config, kafka_bootstrap, topics, tmp_path / "x.duckdb", stop)
    with pytest.raises(duckdb.ConversionException):
        await asyncio.wait_for(run, 60)
    dlq = await read_to_end(kafka_bootstrap, topics.usage_dlq)
    assert dlq == []


async def test_recent_events_are_judged_in_memory_and_duckdb_stays_the_authority(
    kafka_bootstrap: str, unique_name: str, config: Config, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Events of the last minutes take the in-memory path (balances before the write, the
    write overlapping the next batch), copies among them counted once; a "copy" of an old
    stored event that states a recent time is new to the window but not to DuckDB: the
    batch is refolded from the store and the balances stay exact."""
    topics = Topics(f"recent-{unique_name}")
    now = datetime.now(UTC)
    old = make_events(1, seed=7, prefix="old")[0].model_copy(
        update={"occurred_at": now - timedelta(days=2)})
    recent = of_the_last_minutes(make_events(600, seed=8, prefix="r"))
    stream = with_duplicates(recent, every=25)
    stream.insert(300, old.model_copy(update={"occurred_at": now}))
    db, port = tmp_path / "recent.duckdb", free_port()
    async with projector_task(config, kafka_bootstrap, topics, db, port):
        await produce(kafka_bootstrap, topics.usage_events, usage_messages([old]))
        await wait_for_offsets(port, topics.usage_events, 1)
        await produce(kafka_bootstrap, topics.usage_events, usage_messages(stream),
                      pause_every=20)
        await wait_for_offsets(port, topics.usage_events, 1 + len(stream))
        published = await latest_balances(kafka_bootstrap, topics.budget_balances, len(USERS))
    want = expected([old, *stream], config)
    assert db_rows(db, "SELECT count(*), count(DISTINCT event_id) FROM ledger") == {
        (1 + len(recent), 1 + len(recent))}
    assert db_rows(db, BALANCES) == period_rows(want)
    assert period_rows({u: from_balance(b) for u, b in published.items()}) == period_rows(want)
    assert "WindowMissed" in caplog.text  # the old event's "copy": DuckDB said so
