"""One fault run: the services under fire while a gateway's worth of usage flows through.

    workload -> config sized to it -> topics -> three supervised services
    -> produce (paced) | SIGKILLs at random moments | one broker restart, all at once
    -> drain -> SIGTERM everyone -> read back -> figures
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml

from bench.faults.chaos import Broker, kill_on_schedule, kill_plan, restart_broker_at
from bench.faults.checks import (
    check_balances,
    check_decisions,
    check_dlq,
    check_history,
    missing_alerts,
)
from bench.faults.drain import wait_until_drained
from bench.faults.evidence import gather
from bench.faults.producer import produce_paced
from bench.faults.report import Figures
from bench.faults.services import Service, service_env
from bench.faults.workload import Workload, budgets_yaml, make_workload, user_totals, users_yaml
from tally.config.loader import load_config
from tally.config.models import Config
from tally.kafka import ensure_topics, make_admin
from tally.topics import Topics

__all__ = ["Plan", "delete_topics", "run_faults"]

SERVICES = ("ingest", "projector", "enforcer")


@dataclass(frozen=True)
class Plan:
    events: int = 200_000  # distinct messages: 1% malformed; 10% more are duplicates
    kills: int = 20
    rate: float = 2_000.0  # messages per second the gateway sends
    seed: int = 1
    settle: float = 5.0
    drain_timeout: float = 600.0
    # How far back the events' occurred_at go (within today, UTC). A few minutes keeps
    # every batch inside the projector's recent ids (judged in memory, recent.py); hours
    # send most batches to DuckDB's dedupe first.
    span: timedelta = timedelta(hours=6)

    def produce_seconds(self, sends: int) -> float:
        return sends / self.rate


@dataclass(frozen=True)
class Setup:
    workload: Workload
    config: Config
    config_dir: Path
    topics: Topics
    began_at: datetime


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def prepare(plan: Plan, work_dir: Path) -> Setup:
    """Events with occurred_at earlier today (UTC), and a config sized to them."""
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    workload = make_workload(plan.events, plan.seed, max(midnight, now - plan.span), now)
    config_dir = work_dir / "config"
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "users.yaml").write_text(yaml.safe_dump(users_yaml()))
    budgets = budgets_yaml(user_totals(workload.events))
    (config_dir / "budgets.yaml").write_text(yaml.safe_dump(budgets))
    topics = Topics(f"faults-{uuid.uuid4().hex[:8]}")
    return Setup(workload, load_config(config_dir), config_dir, topics, now)


def make_services(broker: Broker, setup: Setup, work_dir: Path) -> dict[str, Service]:
    ports = {name: free_port() for name in SERVICES}
    env = service_env({
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "TALLY_TOPIC_NAMESPACE": setup.topics.namespace,
        "TALLY_DATA_DIR": str(work_dir / "data"),
        "TALLY_CONFIG_DIR": str(setup.config_dir),
        "TALLY_INGEST_PORT": str(ports["ingest"]),
        "TALLY_PROJECTOR_PORT": str(ports["projector"]),
        "TALLY_ENFORCER_PORT": str(ports["enforcer"]),
    })
    logs = work_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args = {"ingest": ["--no-http"], "projector": [], "enforcer": []}
    return {name: Service(name, args[name], env, logs) for name in SERVICES}


async def run_faults(plan: Plan, broker: Broker, work_dir: Path) -> Figures:
    """The whole run against a running `broker` that this run may restart."""
    setup = prepare(plan, work_dir)
    await ensure_topics(broker.bootstrap, setup.topics, 3)
    services = make_services(broker, setup, work_dir)
    for service in services.values():
        service.start()
    try:
        return await _under_fire(plan, broker, setup, services, work_dir)
    finally:
        await asyncio.gather(*(s.stop() for s in services.values()))


async def _under_fire(plan: Plan, broker: Broker, setup: Setup, services: dict[str, Service],
                      work_dir: Path) -> Figures:
    loop = asyncio.get_running_loop()
    began, sends = loop.time(), setup.workload.sends
    seconds = plan.produce_seconds(len(sends))
    kills = kill_plan(plan.kills, SERVICES, 2.0, seconds, plan.seed)
    produced, killed, down = await asyncio.gather(
        produce_paced(broker.bootstrap, setup.topics.usage_raw, sends, seconds),
        kill_on_schedule(kills, services, began),
        restart_broker_at(broker, seconds / 2, began))
    drained = await wait_until_drained(
        broker.bootstrap, setup.topics, int(services["projector"].env["TALLY_PROJECTOR_PORT"]),
        services["enforcer"], plan.settle, plan.drain_timeout)
    await asyncio.gather(*(s.stop() for s in services.values()))
    figures = await _figures(setup, broker, work_dir)
    return figures.completed(plan, produced, killed, down, drained,
                             {n: s.stats for n, s in services.items()}, loop.time() - began)


async def _figures(setup: Setup, broker: Broker, work_dir: Path) -> Figures:
    end = datetime.now(UTC)
    evidence = await gather(broker.bootstrap, setup.topics,
                            work_dir / "data" / "projector.duckdb")
    events, config = setup.workload.events, setup.config
    crossed = end.date() != setup.began_at.date()
    alert_ids = [a.alert_id for a in evidence.alerts]
    return Figures(
        workload=setup.workload, namespace=setup.topics.namespace, boundary_crossed=crossed,
        balances=check_balances(events, evidence.ledger_ids, evidence.balances),
        dlq=check_dlq(setup.workload, evidence),
        decisions=check_decisions(events, config, evidence.decisions, end),
        history=check_history(evidence.decisions, events),
        alerts=len(alert_ids), duplicate_alerts=len(alert_ids) - len(set(alert_ids)),
        missing_alerts=None if crossed else missing_alerts(events, config, end, alert_ids))


async def delete_topics(bootstrap: str, topics: Topics) -> None:
    admin = make_admin(bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(topics.all()))
    finally:
        await admin.close()
