"""Scaling out, all of it at once on the real broker (issue 14): two `tally projector`s
(each its own DuckDB file) and two `tally enforcer`s share six partitions while a steady
stream of usage with duplicates flows into usage.events.

Mid-stream one projector and one enforcer are SIGKILLed (a machine lost); the survivors
take their partitions over and are later joined by the two restarted; then all four are
restarted one at a time (SIGTERM, start, back in the group before the next goes). In the
end the checks of the fault run (bench/faults/checks.py) hold over both files and the
topics: balances equal the recount of the events sent, each event is in one file's ledger
once, the decisions equal `tally simulate`'s, none went back, no alert was sent twice and
none is missing; and while the killed ones' partitions waited for the session timeout,
the users of partitions both survivors owned kept getting decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from bench.faults.checks import check_balances, check_decisions, check_history, missing_alerts
from bench.faults.evidence import gather
from bench.faults.producer import produce_paced
from bench.faults.run import Plan, Setup, free_port, prepare
from bench.faults.services import Service, service_env
from bench.faults.workload import AUDITOR_KEY
from tally.kafka import Record, end_offsets, ensure_topics, make_consumer, partitions_of
from tally.service import started
from tally.services.enforcer.heard import decode_all
from tally.services.enforcer.state import partition_of
from tally.wire import BudgetDecided
from tests.enforcer.pipeline import until
from tests.enforcer.test_instances import _true
from tests.projector.test_instances_kafka import settled
from tests.test_pipeline import following

pytestmark = pytest.mark.kafka

PARTITIONS = 6
SESSION_S = 6  # the broker's group.min.session.timeout.ms: the fastest takeover it allows
EVENTS = 10_000  # distinct messages (the 1% malformed are left out: no ingest here)
STREAM_S = 45.0  # the stream spans the kill, the takeover, the restarts and most of the roll
AUDITOR = {"X-API-Key": AUDITOR_KEY}


@dataclass
class Flow:
    """Decisions as they arrive on budget.decisions: when, and for whom."""

    arrivals: list[tuple[float, BudgetDecided]] = field(default_factory=list)
    latest: dict[str, BudgetDecided] = field(default_factory=dict)

    def take(self, records: list[Record]) -> None:
        now = time.monotonic()
        for decision in decode_all(BudgetDecided, records):
            self.arrivals.append((now, decision))
            self.latest[decision.user_id] = decision

    def tokens(self) -> int:
        return sum(d.daily.tokens_used for d in self.latest.values())

    def used_at(self, moment: float) -> dict[str, int]:
        """Each user's daily usage as decided by `moment`."""
        return {d.user_id: d.daily.tokens_used for at, d in self.arrivals if at <= moment}

    def decided_between(self, start: float, end: float, users: set[str]) -> int:
        return sum(1 for at, d in self.arrivals if start < at < end and d.user_id in users)


@dataclass
class Instance:
    """One process of the group and its HTTP port."""

    service: Service
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def share(self, client: httpx.AsyncClient) -> dict[str, Any] | None:
        """/readyz once it answers ready: its partitions and whether it is restoring."""
        with contextlib.suppress(httpx.TransportError, ValueError):
            answer: dict[str, Any] = (await client.get(f"{self.url}/readyz")).json()
            if answer.get("status") == "ready":
                return answer
        return None


async def split(client: httpx.AsyncClient, group: list[Instance]) -> list[set[int]] | None:
    """Each instance's partitions once all answer, none restoring, each owns some and
    together they own each partition once; else None."""
    shares = [await instance.share(client) for instance in group]
    if any(s is None or s["restoring"] or not s["partitions"] for s in shares):
        return None
    owned = [set(s["partitions"]) for s in shares if s is not None]
    if sorted(p for parts in owned for p in parts) != list(range(PARTITIONS)):
        return None
    return owned


async def all_back(client: httpx.AsyncClient, projectors: list[Instance],
                   enforcers: list[Instance]) -> bool:
    return (await split(client, projectors) is not None
            and await split(client, enforcers) is not None)


async def sole_owner(client: httpx.AsyncClient, instance: Instance) -> bool:
    share = await instance.share(client)
    return share is not None and not share["restoring"] and len(share["partitions"]) == 6


def make_group(setup: Setup, bootstrap: str, logs: Path, data: Path) -> tuple[
        list[Instance], list[Instance]]:
    env = service_env({"KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                       "TALLY_TOPIC_NAMESPACE": setup.topics.namespace,
                       "TALLY_PARTITIONS": str(PARTITIONS)})

    def instance(role: str, n: int, *args: str) -> Instance:
        port = free_port()
        return Instance(Service(role, ["--config", str(setup.config_dir), "--port", str(port),
                                       "--session-timeout", str(SESSION_S), *args],
                                env, logs, label=f"{role}-{n}", restart=False), port)

    return ([instance("projector", n, "--db", str(data / f"projector-{n}.duckdb"))
             for n in (0, 1)], [instance("enforcer", n) for n in (0, 1)])


def user_key(message: bytes) -> bytes:
    """usage.events is keyed by user: a user's events all go to one partition."""
    return str(orjson.loads(message)["user_id"]).encode()


async def records_on(bootstrap: str, topic: str) -> int:
    async with started(make_consumer(bootstrap)) as consumer:
        ends = await end_offsets(consumer, await partitions_of(consumer, topic))
        return sum(ends.values())


@contextlib.asynccontextmanager
async def logs_on_failure(logs: Path) -> AsyncIterator[None]:
    """The services' logs (their ends) printed when the test fails."""
    try:
        yield
    except BaseException:
        for log in sorted(logs.glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()
            print(f"\n----- {log.name} (last 60 of {len(lines)} lines) -----")
            print("\n".join(lines[-60:]))
        raise


async def ended(instances: list[Instance]) -> None:
    for instance in instances:
        instance.service.kill()
        await instance.service.exited()


async def test_two_projectors_and_two_enforcers_survive_a_kill_and_a_rolling_restart(
        kafka_bootstrap: str, tmp_path: Path) -> None:
    began = time.monotonic()
    setup = prepare(Plan(events=EVENTS, seed=14, span=timedelta(hours=1)), tmp_path)
    events, config, topics = setup.workload.events, setup.config, setup.topics
    sends = [m for m in setup.workload.sends if m not in setup.workload.malformed]
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    logs, data = tmp_path / "logs", tmp_path / "data"
    logs.mkdir()
    data.mkdir()
    projectors, enforcers = make_group(setup, kafka_bootstrap, logs, data)
    group = [*projectors, *enforcers]
    flow = Flow()
    async with (logs_on_failure(logs), httpx.AsyncClient(timeout=5) as client,
                following(kafka_bootstrap, [topics.budget_decisions], flow.take)):
        try:
            for instance in group:
                instance.service.start()
            await until(lambda: all_back(client, projectors, enforcers), 90)
            producing = asyncio.create_task(produce_paced(
                kafka_bootstrap, topics.usage_events, sends, STREAM_S, key=user_key))
            streaming = time.monotonic()
            total_tokens = sum(e.tokens for e in events)
            await until(lambda: _true(flow.tokens() >= total_tokens // 6), 60)
            await lose_a_machine(client, flow, projectors, enforcers)
            assert not producing.done(), "the kill should land in the middle of the stream"
            restarted = time.monotonic() - streaming
            await roll(client, projectors, enforcers)
            rolled = time.monotonic() - streaming
            produced = await producing
            assert produced.acked == len(sends)
            total = await records_on(kafka_bootstrap, topics.usage_events)
            await settled([p.port for p in projectors], topics.usage_events, total,
                          auditor=AUDITOR)
            await decided_as_simulate(setup, flow)
            # Enforcers first, cleanly; then the projectors so that neither takes the
            # other's share over (that waits for a session timeout): one stops cleanly,
            # the other is killed, everything folded having been committed (settled).
            for code in await asyncio.gather(*(stopped(e) for e in enforcers)):
                assert code == 0
            projectors[1].service.kill()
            assert await stopped(projectors[0]) == 0
            assert [i.service.stats.exits for i in group] == [[]] * 4  # none died by itself
        finally:
            await ended(group)
        end = datetime.now(UTC)
        evidence = await gather(kafka_bootstrap, topics,
                                *(data / f"projector-{n}.duckdb" for n in (0, 1)))
        balances = check_balances(events, evidence.ledger_ids, evidence.balances)
        assert (balances.lost, balances.extra, balances.wrong_rows) == (0, 0, 0), balances
        assert len(evidence.ledger_ids) == len(events)  # each event in one file, once
        decisions = check_decisions(events, config, evidence.decisions, end)
        assert decisions.mismatched == decisions.missing == [], decisions
        assert check_history(evidence.decisions, events).went_back == []
        ids = [alert.alert_id for alert in evidence.alerts]
        assert len(ids) == len(set(ids)), "an alert was sent twice"
        for kind in ("warning", "limit"):  # both fired, for several users
            assert len({a.user_id for a in evidence.alerts if a.kind == kind}) >= 5, kind
        if end.date() == setup.began_at.date():  # no period ended during the run
            assert missing_alerts(events, config, end, ids) == []
    print(f"\nscale-out: {len(sends):,} messages ({len(events):,} distinct) in "
          f"{produced.seconds:.0f} s; the killed two back {restarted:.0f} s and the rolling "
          f"restart done {rolled:.0f} s into the stream; {len(evidence.decisions):,} "
          f"decisions, {len(ids)} alerts; the test took {time.monotonic() - began:.0f} s")


async def lose_a_machine(client: httpx.AsyncClient, flow: Flow, projectors: list[Instance],
                         enforcers: list[Instance]) -> None:
    """SIGKILL a projector and an enforcer (of those whose survivors share the most
    partitions); until the survivors own everything, the users of the partitions both
    survivors own must keep getting decisions; then restart the two."""
    p_shares = await split(client, projectors)
    e_shares = await split(client, enforcers)
    assert p_shares is not None and e_shares is not None
    dead_p, dead_e = max(((p, e) for p in (0, 1) for e in (0, 1)),
                         key=lambda pe: len(p_shares[1 - pe[0]] & e_shares[1 - pe[1]]))
    kept = p_shares[1 - dead_p] & e_shares[1 - dead_e]
    users = {u for u in flow.latest if partition_of(u, PARTITIONS) in kept}
    survivors = [projectors[1 - dead_p], enforcers[1 - dead_e]]
    shares_before = [p_shares[1 - dead_p], e_shares[1 - dead_e]]
    projectors[dead_p].service.kill()
    enforcers[dead_e].service.kill()
    killed = time.monotonic()
    moved = await first_move(client, survivors, shares_before)
    before, after = flow.used_at(killed), flow.used_at(moved)
    grew = sorted(u for u in users if after.get(u, 0) > before.get(u, 0))
    orphans = {u for u in flow.latest if partition_of(u, PARTITIONS) in e_shares[dead_e]}
    print(f"\nkilled projector-{dead_p} and enforcer-{dead_e}; the survivors share "
          f"partitions {sorted(kept)} ({len(users)} users): {len(grew)} of them decided "
          f"anew in the {moved - killed:.1f} s before the group moved the others "
          f"({flow.decided_between(killed, moved, users)} decisions; the killed enforcer's "
          f"{len(orphans)} users: {flow.decided_between(killed, moved, orphans)})")
    assert grew, "the survivors' users got no decision while the others waited"
    for instance in survivors:
        await until(functools.partial(sole_owner, client, instance), 60)
    print(f"takeover: the survivors own every partition {time.monotonic() - killed:.1f} s "
          f"after the kill (session timeout {SESSION_S} s)")
    await projectors[dead_p].service.exited()
    await enforcers[dead_e].service.exited()
    projectors[dead_p].service.start()
    enforcers[dead_e].service.start()
    await until(lambda: all_back(client, projectors, enforcers), 90)


async def first_move(client: httpx.AsyncClient, survivors: list[Instance],
                     shares: list[set[int]], timeout: float = 60) -> float:
    """When a survivor was first seen restoring or owning other partitions than before."""
    async with asyncio.timeout(timeout):
        while True:
            for instance, before in zip(survivors, shares, strict=True):
                share = await instance.share(client)
                if share is None or share["restoring"] or set(share["partitions"]) != before:
                    return time.monotonic()
            await asyncio.sleep(0.1)


async def roll(client: httpx.AsyncClient, projectors: list[Instance],
               enforcers: list[Instance]) -> None:
    """A rolling restart: each stopped cleanly and started, back before the next goes."""
    for instance in [*projectors, *enforcers]:
        assert await stopped(instance) == 0, instance.service.label
        instance.service.start()
        await until(lambda: all_back(client, projectors, enforcers), 90)


async def stopped(instance: Instance) -> int | None:
    await instance.service.stop()
    return instance.service.process.returncode if instance.service.process else None


async def decided_as_simulate(setup: Setup, flow: Flow, timeout: float = 60) -> None:
    """Until every user's latest decision is simulate's over all the events (checked each
    second: the check folds every event)."""
    async with asyncio.timeout(timeout):
        while True:
            found = check_decisions(setup.workload.events, setup.config,
                                    flow.latest.values(), datetime.now(UTC))
            if not found.mismatched and not found.missing:
                return
            await asyncio.sleep(1)
