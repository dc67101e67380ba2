"""An enforcer refuses to start when budget.balances has more partitions than usage.events
(partitioncount.check_same_count): its ownership is per budget.balances partition, and the
added ones moved users between them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from aiokafka.admin import NewPartitions

from tally.errors import ExitCode
from tally.kafka import ensure_topics, make_admin
from tally.services.enforcer.app import run_enforcer
from tally.services.projector.partitioncount import PartitionCountChanged
from tally.topics import Topics
from tests.projector.test_projector_kafka import BUDGETS, USERS_YAML

pytestmark = pytest.mark.kafka


async def test_the_enforcer_refuses_to_start_once_budget_balances_gained_partitions(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "budgets.yaml").write_text(BUDGETS)
    (config_dir / "users.yaml").write_text(USERS_YAML)
    topics = Topics(f"enfcount-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, 2)
    admin = make_admin(kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_partitions({topics.budget_balances: NewPartitions(total_count=3)})
    finally:
        await admin.close()
    with pytest.raises(PartitionCountChanged) as refused:
        await asyncio.wait_for(run_enforcer(config_dir, kafka_bootstrap, topics,
                                            asyncio.Event(), partitions=2), 60)
    assert str(refused.value).startswith(f"{topics.budget_balances} has 3 partitions, but "
                                         f"{topics.usage_events} has 2")
    assert refused.value.exit_code == ExitCode.REFUSED
