"""A projector's file remembers usage.events' partition count (partitioncount.py): the rule,
the store, and the projector refusing to start on the real broker once it changed; and the
enforcers' rule, budget.balances with the count of usage.events
(tests/enforcer/test_partition_count_kafka.py: on the real broker)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tally.config.loader import load_config
from tally.errors import ExitCode
from tally.kafka import ensure_topics
from tally.services.projector import store
from tally.services.projector.app import run_projector
from tally.services.projector.partitioncount import (
    PartitionCountChanged,
    check_partition_count,
    check_same_count,
    keep_partition_count,
)
from tally.topics import Topics


def test_the_same_count_or_none_stored_yet_passes() -> None:
    check_partition_count("usage.events", 6, 6, "p.duckdb")
    check_partition_count("usage.events", None, 12, "p.duckdb")


def test_another_count_is_refused_naming_the_topic_both_counts_and_what_to_do() -> None:
    with pytest.raises(PartitionCountChanged) as refused:
        check_partition_count("x.usage.events", 6, 12, "data/p.duckdb")
    message = str(refused.value)
    assert message.startswith("x.usage.events has 12 partitions, but data/p.duckdb was "
                              "written when it had 6")
    assert "new namespace" in message and refused.value.exit_code == ExitCode.REFUSED


def test_the_file_records_the_count_it_first_sees_and_keeps_it(tmp_path: Path) -> None:
    db = tmp_path / "p.duckdb"
    with store.connect(db) as con:  # a file written before the count was recorded
        assert store.setting(con, "partitions:usage.events") is None
        assert keep_partition_count(con, "usage.events", 6, db) == 6
    with store.connect(db) as con:
        assert keep_partition_count(con, "usage.events", 6, db) == 6
        with pytest.raises(PartitionCountChanged, match="has 12 partitions"):
            keep_partition_count(con, "usage.events", 12, db)
        assert store.setting(con, "partitions:usage.events") == "6"


@pytest.mark.kafka
async def test_the_projector_refuses_to_start_once_partitions_were_added(
        kafka_bootstrap: str, unique_name: str, config_dir: Path, tmp_path: Path) -> None:
    topics = Topics(f"count-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, 3)
    db = tmp_path / "p.duckdb"
    with store.connect(db) as con:  # written when usage.events had 2 partitions
        keep_partition_count(con, topics.usage_events, 2, db)
    with pytest.raises(PartitionCountChanged) as refused:
        await run_projector(load_config(config_dir), kafka_bootstrap, topics, db,
                            asyncio.Event())
    assert str(refused.value).startswith(f"{topics.usage_events} has 3 partitions, but {db} "
                                         "was written when it had 2")


def test_budget_balances_with_the_count_of_usage_events_passes() -> None:
    check_same_count("budget.balances", 6, "usage.events", 6)


def test_budget_balances_with_another_count_is_refused_naming_both_and_what_to_do() -> None:
    with pytest.raises(PartitionCountChanged) as refused:
        check_same_count("x.budget.balances", 8, "x.usage.events", 6)
    message = str(refused.value)
    assert message.startswith("x.budget.balances has 8 partitions, but x.usage.events has 6")
    assert "enforcers' ownership" in message and "new namespace" in message
    assert message.endswith("restore x.budget.balances with its 6 partitions")
    assert refused.value.exit_code == ExitCode.REFUSED
