"""A warm standby (`tally projector --standby`) on the real broker: it follows every
partition without sending anything, takes a SIGKILLed instance's partitions over from its
own file, reading only the tail, and gives them back when the instance returns."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import httpx
import pytest

from tally.config.loader import load_config
from tally.core.usage import from_balance
from tally.errors import ExitCode
from tally.kafka import ensure_topics, make_consumer
from tally.service import started
from tally.services.projector.app import run_projector
from tally.services.projector.assignor import StandbyRefused
from tally.services.projector.ownership import group_id
from tally.topics import Topics
from tests.projector.test_instances_kafka import (
    PARTITIONS,
    balances_on_topic,
    folding,
    instance,
    latest_by_position,
    metric_lines,
    readyz,
    settled,
    spread,
)
from tests.projector.test_projector_kafka import (
    BALANCES,
    RECOUNT,
    db_rows,
    expected,
    free_port,
    make_events,
    period_rows,
    produce,
    usage_messages,
    with_duplicates,
)


async def test_a_standby_takes_a_killed_instances_partitions_over_with_only_the_tail(
    kafka_bootstrap: str, unique_name: str, config_dir: Path, tmp_path: Path
) -> None:
    config = load_config(config_dir)
    topics = Topics(f"stby-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    events = spread(make_events(8_000, seed=16), users=60)
    sent = with_duplicates(events, every=40)
    later = spread(make_events(1_000, seed=17, prefix="f"), users=60)
    ports = [free_port(), free_port()]
    warm, first = tmp_path / "standby.duckdb", tmp_path / "a.duckdb"
    # Started together: whichever joins first, the active instance ends up owning every
    # partition (a standby gives back to an instance that owns nothing).
    async with (instance(kafka_bootstrap, topics, first, config_dir, ports[0]) as active,
                instance(kafka_bootstrap, topics, warm, config_dir, ports[1],
                         "--standby") as standby):
        await owning(ports[0], list(range(PARTITIONS)))
        producing = asyncio.create_task(produce(kafka_bootstrap, topics.usage_events,
                                                usage_messages(sent), pause_every=20))
        await folding(ports[1:], topics.usage_events, len(sent) // 4)  # following
        before = await readyz(ports[1])
        assert before["partitions"] == [] and before["standby"] is True
        assert sorted(before["lag"]) == [str(p) for p in range(PARTITIONS)]  # how warm
        # /metrics says it too: the lag of each partition followed, and that it follows it.
        gauges = await metric_lines(ports[1], topics.usage_events)
        assert gauges["tally_consumer_lag"] == gauges["tally_partitions_following"] == set(
            range(PARTITIONS))
        assert "tally_partitions_owned" not in gauges
        assert (await readyz(ports[0]))["partitions"] == list(range(PARTITIONS))
        active.send_signal(signal.SIGKILL)
        await active.wait()
        assert not producing.done(), "the kill should land in the middle of the stream"
        await producing
        await settled(ports[1:], topics.usage_events, len(sent))
        # Each record read once: the partitions it took over were not read again from
        # offset 0 (a replay would take in every record folded before the kill twice).
        assert await events_in(ports[1], topics.usage_events) <= len(sent)
        # The active instance back, with its file: it takes its partitions back from
        # the standby, which goes on following them.
        async with instance(kafka_bootstrap, topics, first, config_dir,
                            ports[0]) as again:
            await owning(ports[0], list(range(PARTITIONS)))
            await produce(kafka_bootstrap, topics.usage_events, usage_messages(later))
            total = len(sent) + len(later)
            await settled(ports[:1], topics.usage_events, total)
            await folding(ports[1:], topics.usage_events, total)
            assert (await readyz(ports[1]))["partitions"] == []
            again.send_signal(signal.SIGTERM)
            standby.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(again.wait(), 30) == 0
            assert await asyncio.wait_for(standby.wait(), 30) == 0
    everything = events + later
    want = expected(everything, config)
    for db in (warm, first):  # each holds every partition, each event once
        assert db_rows(db, "SELECT count(*) FROM ledger") == {(len(everything),)}
        assert db_rows(db, "SELECT event_id FROM ledger") == {(e.event_id,) for e in everything}
        assert db_rows(db, BALANCES) == db_rows(db, RECOUNT) == period_rows(want)
    published = latest_by_position(await balances_on_topic(kafka_bootstrap,
                                                           topics.budget_balances))
    assert period_rows({u: from_balance(b) for u, b in published.items()}) == period_rows(want)


async def owning(port: int, partitions: list[int], timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            if (await readyz(port)).get("partitions") == partitions:
                return
        except httpx.TransportError:
            pass  # not listening yet
        await asyncio.sleep(0.1)
    raise AssertionError(f"the instance on {port} did not come to own {partitions}")


async def events_in(port: int, topic: str) -> float:
    """The records of `topic` an instance has taken in (its tally_events_in counter)."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    [line] = [line for line in text.splitlines()
              if line.startswith("tally_events_in_total{") and f'"{topic}"' in line]
    return float(line.rsplit(" ", 1)[1])


async def test_a_standby_started_alone_owns_every_partition_and_is_ready(
    kafka_bootstrap: str, unique_name: str, config_dir: Path, tmp_path: Path
) -> None:
    """No active instance (the only one died before the standby started, or the standby
    was started first): the group gives the standby every partition, and it serves them as
    an owner, ready once caught up, its balances sent."""
    config = load_config(config_dir)
    topics = Topics(f"stby1-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    events = spread(make_events(600, seed=18), users=30)
    await produce(kafka_bootstrap, topics.usage_events, usage_messages(events))
    port = free_port()
    async with instance(kafka_bootstrap, topics, tmp_path / "standby.duckdb", config_dir,
                        port, "--standby") as standby:
        await settled([port], topics.usage_events, len(events))  # ready, owning all
        assert (await readyz(port))["standby"] is True
        gauges = await metric_lines(port, topics.usage_events)
        assert gauges["tally_consumer_lag"] == gauges["tally_partitions_owned"] == set(
            range(PARTITIONS))
        assert "tally_partitions_following" not in gauges
        standby.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(standby.wait(), 30) == 0
    published = latest_by_position(await balances_on_topic(kafka_bootstrap,
                                                           topics.budget_balances))
    want = expected(events, config)
    assert period_rows({u: from_balance(b) for u, b in published.items()}) == period_rows(want)


async def test_a_standby_is_refused_by_a_group_offering_only_round_robin(
    kafka_bootstrap: str, unique_name: str, config_dir: Path, tmp_path: Path
) -> None:
    """A rolling upgrade from before the warm assignor: an old instance (round-robin only)
    in the group; a standby, which offers the warm assignor alone, stops with a line naming
    the cause and the fix instead of an unforeseen error."""
    topics = Topics(f"stby2-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, PARTITIONS)
    old = make_consumer(kafka_bootstrap, group_id=group_id(topics))  # round-robin only
    async with started(old):
        old.subscribe([topics.usage_events, topics.usage_dlq])
        await old.getmany(timeout_ms=100)  # joins the group
        while not old.assignment():
            await old.getmany(timeout_ms=100)
        with pytest.raises(StandbyRefused) as stopped:
            await asyncio.wait_for(run_projector(
                load_config(config_dir), kafka_bootstrap, topics, tmp_path / "s.duckdb",
                asyncio.Event(), partitions=PARTITIONS, standby=True), 60)
    assert "offers only round-robin" in str(stopped.value)
    assert "Upgrade every active projector instance first" in str(stopped.value)
    assert stopped.value.exit_code == ExitCode.REFUSED
