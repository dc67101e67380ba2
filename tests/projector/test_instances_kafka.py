"""Projector instances in a group (ownership.py), as processes on the real broker: six
partitions shared by two `tally projector`s, one SIGKILLed mid-stream and restarted later,
and one paused past its session timeout and resumed (a zombie)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tally.config.loader import load_config
from tally.core.usage import from_balance
from tally.instances import InstanceSeen
from tally.kafka import ensure_topics, read_to_end
from tally.topics import Topics
from tally.wire import BalanceUpdated, UsageRecorded
from tests.projector.test_projector_kafka import (
    ADMIN,
    BALANCES,
    RECOUNT,
    ROOT,
    VIEWER,
    db_rows,
    expected,
    free_port,
    make_events,
    period_rows,
    produce,
    run_tally,
    usage_messages,
    with_duplicates,
)

pytestmark = pytest.mark.kafka

PARTITIONS = 6
SESSION_S = 6  # the broker's group.min.session.timeout.ms: the fastest takeover it allows


@asynccontextmanager
async def instance(bootstrap: str, topics: Topics, db: Path, config_dir: Path,
                   port: int, *options: str, log: Path | None = None,
                   program: tuple[str, ...] = ("-m", "tally.cli"),
                   ) -> AsyncIterator[asyncio.subprocess.Process]:
    """One `tally projector` process of the group (its stderr into `log` if given; the
    Python `program` taking the command line); killed at the end if still running."""
    with open(log, "w") if log else contextlib.nullcontext() as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *program, "projector", "--config", str(config_dir),
            "--db", str(db), "--port", str(port), "--session-timeout", str(SESSION_S),
            *options, cwd=ROOT, stderr=stderr,
            env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                 "TALLY_TOPIC_NAMESPACE": topics.namespace,
                 "TALLY_PARTITIONS": str(PARTITIONS)})
    try:
        yield process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGCONT)  # a paused one too
            process.kill()
        await process.wait()


async def readyz(port: int) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        answer: dict[str, Any] = (await client.get(f"http://127.0.0.1:{port}/readyz")).json()
        return answer


async def settled(ports: list[int], topic: str, total: int, timeout: float = 90,
                  auditor: dict[str, str] = ADMIN) -> None:
    """Until the instances own disjoint shares covering every partition, none restoring,
    and together have folded `total` records of `topic` (asked as `auditor`)."""
    deadline = asyncio.get_running_loop().time() + timeout
    seen: list[dict[str, Any]] = []
    while asyncio.get_running_loop().time() < deadline:
        try:
            seen = [await readyz(port) for port in ports]
        except httpx.TransportError:
            seen = []  # one not listening yet
        owned = [p for s in seen for p in s.get("partitions", [])]
        if (len(seen) == len(ports) and all(s["status"] == "ready" for s in seen)
                and sorted(owned) == list(range(PARTITIONS))
                and not any(s["restoring"] or any(s["lag"].values()) for s in seen)
                and await folded(ports, topic, auditor) == total):
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"the instances did not settle: {seen}, "
                         f"{await folded(ports, topic, auditor)} of {total} folded")


async def folded(ports: list[int], topic: str, auditor: dict[str, str] = ADMIN) -> int:
    sql = f"SELECT coalesce(sum(next_offset), 0) FROM offsets WHERE topic = '{topic}'"
    total = 0
    async with httpx.AsyncClient() as client:
        for port in ports:
            answer = await client.post(f"http://127.0.0.1:{port}/audit", json={"sql": sql},
                                       headers=auditor)
            total += answer.json()["rows"][0][0]
    return int(total)


async def balances_on_topic(bootstrap: str, topic: str) -> list[BalanceUpdated]:
    """Every record of budget.balances, in the order of each partition."""
    return [BalanceUpdated.model_validate_json(r.value)
            for r in await read_to_end(bootstrap, topic) if r.value is not None]


def latest_by_position(balances: list[BalanceUpdated]) -> dict[str, BalanceUpdated]:
    """Each user's balance as a reader keeps it: a later record unless it is older."""
    kept: dict[str, BalanceUpdated] = {}
    for balance in balances:
        held = kept.get(balance.user_id)
        if held is None or held.superseded_by(balance):
            kept[balance.user_id] = balance
    return kept


async def test_two_instances_share_the_partitions_and_survive_a_kill(
    kafka_bootstrap: str, unique_name: str, config_dir: Path, tmp_path: Path
) -> None:
    config = load_config(config_dir)
    topics = Topics(f"inst-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    events = spread(make_events(12_000, seed=14), users=60)
    sent = with_duplicates(events, every=40)
    dbs, ports = [tmp_path / "a.duckdb", tmp_path / "b.duckdb"], [free_port(), free_port()]
    async with instance(kafka_bootstrap, topics, dbs[1], config_dir, ports[1]) as survivor:
        async with instance(kafka_bootstrap, topics, dbs[0], config_dir, ports[0]) as first:
            await sharing(ports)
            producing = asyncio.create_task(produce(kafka_bootstrap, topics.usage_events,
                                                    usage_messages(sent), pause_every=100))
            await folding(ports, topics.usage_events, len(sent) // 4)
            first.send_signal(signal.SIGKILL)
            await first.wait()
        assert not producing.done(), "the kill should land in the middle of the stream"
        await producing
        # The survivor takes the killed instance's partitions over and replays them.
        await settled(ports[1:], topics.usage_events, len(sent))
        async with instance(kafka_bootstrap, topics, dbs[0], config_dir, ports[0]) as again:
            await settled(ports, topics.usage_events, len(sent))
            await check_status(kafka_bootstrap, topics, ports)
            await lag_only_where_owned(ports, topics.usage_events)
            await check_audit_over_instances(kafka_bootstrap, topics, len(events))
            await check_audit_endpoint_over_instances(kafka_bootstrap, topics, ports,
                                                      len(events))
            # Both stop before either could take the other's share over (that waits for a
            # session timeout): each file keeps exactly the partitions its instance owns.
            survivor.send_signal(signal.SIGKILL)
            again.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(again.wait(), 30) == 0
    want = expected(events, config)
    ledgers = [db_rows(db, "SELECT event_id FROM ledger") for db in dbs]
    assert sum(len(ledger) for ledger in ledgers) == len(events)  # each event once, once only
    assert ledgers[0] | ledgers[1] == {(e.event_id,) for e in events}
    assert all(db_rows(db, BALANCES) == db_rows(db, RECOUNT) for db in dbs)
    assert db_rows(dbs[0], BALANCES) | db_rows(dbs[1], BALANCES) == period_rows(want)
    published = latest_by_position(await balances_on_topic(kafka_bootstrap,
                                                           topics.budget_balances))
    assert period_rows({u: from_balance(b) for u, b in published.items()}) == period_rows(want)
    assert all(b.source_partition is not None and b.source_offset for b in published.values())


def shares_of(rows: list[list[str]]) -> list[int]:
    """The partitions in the status rows ("-" for none)."""
    return [int(p) for row in rows for p in row[3].split(",") if p != "-"]


async def check_status(bootstrap: str, topics: Topics, ports: list[int]) -> None:
    """`tally status --instances` lists both, with their shares; /metrics has them too.
    The list is the instances' heartbeats, up to one late (a restarted instance may still be
    listed with its share from before its assignment), so it is read until the shares add up."""
    rows: list[list[str]] = []
    for _ in range(20):
        code, out, err = await run_tally("status", "--instances", env={
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap, "TALLY_TOPIC_NAMESPACE": topics.namespace})
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == ["instance", "role", "url", "partitions", "restoring",
                                    "lag", "heard"]
        rows = [line.split() for line in lines[1:]]
        if sorted(shares_of(rows)) == list(range(PARTITIONS)):
            break
        await asyncio.sleep(1)
    assert sorted(row[2] for row in rows) == sorted(f"http://127.0.0.1:{p}" for p in ports)
    assert sorted(shares_of(rows)) == list(range(PARTITIONS)), rows
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{ports[0]}/metrics")).text
    owned = [line for line in text.splitlines()
             if line.startswith("tally_partitions_owned{") and line.endswith(" 1.0")]
    assert len(owned) == len((await readyz(ports[0]))["partitions"]) > 0


async def metric_lines(port: int, topic: str) -> dict[str, set[int]]:
    """Per gauge of `topic`'s partitions on an instance's /metrics, the partitions it has
    a line for (a 0 of the partition gauges left out: not owned, not followed)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    found: dict[str, set[int]] = {}
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if f'topic="{topic}"' in rest and not (name.startswith("tally_partitions_")
                                               and line.endswith(" 0.0")):
            partition = int(rest.split('partition="', 1)[1].split('"', 1)[0])
            found.setdefault(name, set()).add(partition)
    return found



async def lag_only_where_owned(ports: list[int], topic: str, timeout: float = 30) -> None:
    """Until each instance's tally_consumer_lag has a line for the partitions it owns and
    no other (one given back loses its line, not keeps a stale one)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        seen = [await metric_lines(port, topic) for port in ports]
        if all(s.get("tally_consumer_lag") == s.get("tally_partitions_owned") for s in seen):
            return
        assert asyncio.get_running_loop().time() < deadline, seen
        await asyncio.sleep(0.2)



async def check_audit_over_instances(bootstrap: str, topics: Topics, events: int) -> None:
    """`tally audit --instances`: a row per instance, whose counts add up to every event."""
    code, out, err = await run_tally(
        "audit", "SELECT count(*) AS n FROM ledger", "--instances", "--format", "csv",
        env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "TALLY_TOPIC_NAMESPACE": topics.namespace,
             "TALLY_API_KEY": "ak_auditor_0123456789"})
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header == "instance,n" and len(rows) == 2
    assert sum(int(row.rsplit(",", 1)[1]) for row in rows) == events


async def check_audit_endpoint_over_instances(bootstrap: str, topics: Topics,
                                              ports: list[int], events: int) -> None:
    """POST /audit {"instances": true} to either instance: a row per instance, whose
    counts add up to every event; a non-admin is refused; and an instance listed that does
    not answer is an error naming it, not a smaller sum."""
    query = {"sql": "SELECT count(*) AS n FROM ledger", "instances": True}
    async with httpx.AsyncClient(timeout=60) as client:
        for port in ports:
            answer = (await client.post(f"http://127.0.0.1:{port}/audit", json=query,
                                        headers=ADMIN)).json()
            assert answer["columns"] == ["instance", "n"] and len(answer["rows"]) == 2
            assert sum(n for _, n in answer["rows"]) == events
        refused = await client.post(f"http://127.0.0.1:{ports[0]}/audit", json=query,
                                    headers=VIEWER)
        assert refused.status_code == 403
        ghost = InstanceSeen(instance="projector@ghost:1", role="projector",
                             url=f"http://127.0.0.1:{free_port()}", topic=topics.usage_events,
                             partitions=[0], at=datetime.now(UTC))
        await produce(bootstrap, topics.instances,
                      [(ghost.instance.encode(), ghost.model_dump_json().encode())])
        missing = await client.post(f"http://127.0.0.1:{ports[0]}/audit", json=query,
                                    headers=ADMIN)
        assert missing.status_code == 502 and "projector@ghost:1" in missing.json()["error"]


def spread(events: list[UsageRecorded], users: int) -> list[UsageRecorded]:
    """The events over `users` users, so that every partition holds some."""
    rng = random.Random(users)
    return [e.model_copy(update={"user_id": f"user{rng.randrange(users)}"}) for e in events]


async def sharing(ports: list[int], timeout: float = 60) -> None:
    """Until every instance owns some partitions."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(httpx.TransportError):  # not listening yet
            if all([(await readyz(port)).get("partitions") for port in ports]):
                return
        await asyncio.sleep(0.1)
    raise AssertionError("the instances did not share the partitions")


async def folding(ports: list[int], topic: str, at_least: int, timeout: float = 60) -> None:
    """Until the instances have folded `at_least` records of `topic` between them."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(httpx.TransportError, KeyError):  # not listening yet
            if await folded(ports, topic) >= at_least:
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the instances did not fold {at_least} records")


def never_goes_back(balances: list[BalanceUpdated]) -> list[str]:
    """The users whose kept balance (as a reader keeps it) ever shrank: what a zombie's
    stale balance would do if readers took it."""
    kept: dict[str, int] = {}
    shrank: list[str] = []
    previous: dict[str, BalanceUpdated] = {}
    for balance in balances:
        held = previous.get(balance.user_id)
        if held is not None and not held.superseded_by(balance):
            continue
        total = sum(sum(totals.values()) for totals in balance.periods.values())
        if total < kept.get(balance.user_id, 0):
            shrank.append(balance.user_id)
        kept[balance.user_id], previous[balance.user_id] = total, balance
    return shrank


async def test_a_zombie_instance_changes_no_balance(
    kafka_bootstrap: str, unique_name: str, config_dir: Path, tmp_path: Path
) -> None:
    """An instance paused (SIGSTOP) past its session timeout while usage keeps coming,
    then resumed with what it had read in hand: the balances readers keep never go back,
    equal the recount, and each event ends in one instance's ledger once."""
    config = load_config(config_dir)
    topics = Topics(f"zomb-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    events = spread(make_events(12_000, seed=15), users=60)
    sent = with_duplicates(events, every=40)
    dbs, ports = [tmp_path / "a.duckdb", tmp_path / "b.duckdb"], [free_port(), free_port()]
    async with (instance(kafka_bootstrap, topics, dbs[0], config_dir, ports[0]) as zombie,
                instance(kafka_bootstrap, topics, dbs[1], config_dir, ports[1]) as other):
        await sharing(ports)
        producing = asyncio.create_task(produce(kafka_bootstrap, topics.usage_events,
                                                usage_messages(sent), pause_every=50))
        await folding(ports, topics.usage_events, len(sent) // 5)
        zombie.send_signal(signal.SIGSTOP)
        await folding(ports[1:], topics.usage_events, len(sent) // 2)  # took over
        zombie.send_signal(signal.SIGCONT)
        await producing
        await settled(ports, topics.usage_events, len(sent))
        other.send_signal(signal.SIGKILL)
        zombie.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(zombie.wait(), 30) == 0
    balances = await balances_on_topic(kafka_bootstrap, topics.budget_balances)
    assert never_goes_back(balances) == []
    want = expected(events, config)
    published = latest_by_position(balances)
    assert period_rows({u: from_balance(b) for u, b in published.items()}) == period_rows(want)
    ledgers = [db_rows(db, "SELECT event_id FROM ledger") for db in dbs]
    assert sum(len(ledger) for ledger in ledgers) == len(events)
    assert all(db_rows(db, BALANCES) == db_rows(db, RECOUNT) for db in dbs)
