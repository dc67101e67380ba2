"""The enforcer's send of one batch that carries alerts, alone: as main sent it (one
idempotent producer: decisions and alerts, their acknowledgements, then the alert memory
records and theirs) and as it is sent now (app.py `_alert`, fence.py: the decisions of
users without an alert on the plain producer, the alerts and their memory records in a
transaction of their budget.balances partition's own producer, then the alerted users'
decisions), alternating, in one process on the bench broker.

    .venv/bin/python -m bench.enforcer_send [--batches 100] [--sizes 10,50] [--alerted 1,5]
                                            [--partitions 3] [--gap-ms 0,200]

Each batch is `size` decisions of as many users over the partitions of budget.balances
(this process owns them all), `alerted` of them with two alerts each (a warning and the
limit). "wall" is from the first send until everything is acknowledged (main) or
committed and acknowledged (now): what the loop waits before judging its next batch.
"CPU" is this process's CPU per batch. `--gap-ms`: the pause between batches: 0 sends
them back to back (a producer's next transaction then waits for the markers of its last:
aiokafka retries after 20 ms), 200 as alert batches come in a live stream (rarely).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
import uuid
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer

from bench.common import CONFIG_DIR, bench_broker, machine, print_table
from tally.config.loader import load_config
from tally.core import fold_events, to_balance
from tally.kafka import ensure_topics, make_producer
from tally.service import started
from tally.services.enforcer.fence import AlertSenders, shares_of
from tally.services.enforcer.state import Enforcer, Outcome, partition_of
from tally.topics import Topics
from tally.wire import UsageRecorded

__all__ = ["main"]

AT = datetime.now(UTC).replace(microsecond=0)


def outcome_of(size: int, alerted: int, round_: int) -> Outcome:
    """`size` users' decisions, `alerted` of them over their daily limit (new users each
    round, so each batch's alerts are new)."""
    config = load_config(CONFIG_DIR)
    limit = config.budgets.per_user_budgets.default_limits.daily_tokens or 50_000
    events = [UsageRecorded(event_id=f"u{n}-{round_}", occurred_at=AT,
                            user_id=f"bench-{round_}-u{n}", model="m/x",
                            input_tokens=limit + 1 if n < alerted else 10, output_tokens=0)
              for n in range(size)]
    usages = fold_events(events, config.budgets.per_user_budgets)
    return Enforcer(config).on_balances([to_balance(u, AT) for u in usages.values()], AT)


async def as_main(producer: AIOKafkaProducer, topics: Topics, outcome: Outcome) -> None:
    """As main's app.py `publish` sent an outcome with alerts."""
    sends = ([await producer.send(topics.budget_decisions, d.model_dump_json().encode(),
                                  key=d.user_id.encode()) for d in outcome.decisions]
             + [await producer.send(topics.budget_alerts, a.model_dump_json().encode(),
                                    key=a.user_id.encode()) for a in outcome.alerts])
    await asyncio.gather(*sends)
    await asyncio.gather(*[await producer.send(topics.budget_alert_memory,
                                               m.model_dump_json().encode(),
                                               key=m.key.encode()) for m in outcome.memory])


async def as_now(producer: AIOKafkaProducer, senders: AlertSenders, topics: Topics,
                 outcome: Outcome, count: int) -> None:
    """As app.py `_alert` sends it (the acks it leaves to the next batch awaited here)."""
    alerted = {a.user_id for a in outcome.alerts}
    sends = [await producer.send(topics.budget_decisions, d.model_dump_json().encode(),
                                 key=d.user_id.encode())
             for d in outcome.decisions if d.user_id not in alerted]
    sent = await senders.send(shares_of(outcome.alerts, outcome.memory, count))
    assert not sent.fenced and sent.error is None, sent
    sends += [await producer.send(topics.budget_decisions, d.model_dump_json().encode(),
                                  key=d.user_id.encode())
              for d in outcome.decisions if d.user_id in alerted
              and partition_of(d.user_id, count) in sent.committed]
    await asyncio.gather(*sends)


async def measure(bootstrap: str, batches: int, size: int, alerted: int, partitions: int,
                  gap: float) -> dict[str, tuple[list[float], float]]:
    topics = Topics(f"send-{uuid.uuid4().hex[:8]}")
    await ensure_topics(bootstrap, topics, partitions)
    outcomes = [outcome_of(size, alerted, n) for n in range(batches + 2)]
    walls: dict[str, list[float]] = {"main": [], "now": []}
    cpu = dict.fromkeys(walls, 0.0)
    async with (started(make_producer(bootstrap)) as producer,
                started(AlertSenders(bootstrap, topics, partitions)) as senders):
        await senders.own(range(partitions))
        for n, outcome in enumerate(outcomes):  # the first two warm up, one each way
            for way in ("main", "now") if n % 2 else ("now", "main"):
                cpu_before, before = time.process_time(), time.perf_counter()
                if way == "main":
                    await as_main(producer, topics, outcome)
                else:
                    await as_now(producer, senders, topics, outcome, partitions)
                if n >= 2:
                    walls[way].append((time.perf_counter() - before) * 1000)
                    cpu[way] += time.process_time() - cpu_before
                await asyncio.sleep(gap)
    return {way: (walls[way], cpu[way] / len(walls[way])) for way in walls}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.enforcer_send")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--sizes", default="10,50")
    parser.add_argument("--alerted", default="1,5")
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--gap-ms", default="0,200")
    args = parser.parse_args()
    rows = []
    with bench_broker() as bootstrap:
        print(f"machine: {machine()}; {args.batches} batches each way, alternating, "
              f"{args.partitions} partitions owned")
        for gap in (int(g) for g in args.gap_ms.split(",")):
            for size in (int(s) for s in args.sizes.split(",")):
                for alerted in (int(a) for a in args.alerted.split(",")):
                    figures = asyncio.run(measure(bootstrap, args.batches, size, alerted,
                                                  args.partitions, gap / 1000))
                    for way, (walls, cpu) in figures.items():
                        walls.sort()
                        rows.append((gap, size, alerted, way,
                                     f"{statistics.median(walls):.1f}",
                                     f"{walls[int(len(walls) * 0.95)]:.1f}",
                                     f"{cpu * 1000:.2f}"))
    print_table(("gap ms", "decisions", "alerted users", "send", "wall p50 ms",
                 "wall p95 ms", "CPU ms/batch"), rows)
    print(f"load average {', '.join(f'{x:.1f}' for x in os.getloadavg())} at the end")


if __name__ == "__main__":
    main()
