"""The projector's partition book (ownership.py) and the instances table, without Kafka."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa

from tally.instances import InstanceSeen, format_instances
from tally.services.projector.fanout import answering
from tally.services.projector.ownership import PartitionBook

TOPIC = "usage.events"


def rows(*pairs: tuple[str, int]) -> pa.Table:
    return pa.table({"user_id": [u for u, _ in pairs],
                     "topic_partition": pa.array([p for _, p in pairs], pa.int32())})


def test_a_balance_carries_its_users_partition_and_the_position_folded_up_to() -> None:
    book = PartitionBook(TOPIC, owned={0, 1})
    book.note(rows(("alice", 0), ("bob", 1)), {(TOPIC, 0): 12, (TOPIC, 1): 7, ("dlq", 0): 3})
    book.note(rows(("alice", 0)), {(TOPIC, 0): 20})
    assert book.source("alice") == (0, 20) and book.source("bob") == (1, 7)
    assert book.source("nobody") is None


def test_only_owned_partitions_not_restoring_send_and_a_hold_ends_at_its_end() -> None:
    book = PartitionBook(TOPIC, owned={0, 1}, partition_of={"a": 0, "b": 1, "c": 2})
    book.hold({1}, stored={(TOPIC, 1): 5}, ends={(TOPIC, 1): 9})
    assert book.positions[1] == 5 and book.sendable({"a", "b", "c"}) == ["a"]
    assert book.reached({(TOPIC, 1): 8}) == set()
    assert book.reached({(TOPIC, 1): 9}) == {1}
    assert book.sendable({"a", "b", "c"}) == ["a", "b"]


def test_a_partition_already_at_its_end_is_not_held_and_a_lost_one_forgets_its_users() -> None:
    book = PartitionBook(TOPIC, owned={0, 1}, partition_of={"a": 0, "b": 1})
    book.hold({0}, stored={(TOPIC, 0): 4}, ends={(TOPIC, 0): 4})
    assert book.held == {}
    assert book.forget({1}) == {"b"}
    assert book.owned == {0} and book.partition_of == {"a": 0}


def test_the_instances_table_marks_a_silent_instance() -> None:
    now = datetime(2026, 12, 3, 9, tzinfo=UTC)
    seen = [InstanceSeen(instance="projector@h:1", role="projector", url="http://h:8082",
                         topic=TOPIC, partitions=[0, 2], restoring=[2], lag={"0": 3, "2": 40},
                         at=now - timedelta(seconds=1)),
            InstanceSeen(instance="projector@h:2", role="projector", topic=TOPIC,
                         partitions=[1], at=now - timedelta(minutes=5))]
    lines = format_instances(seen, now).splitlines()
    assert lines[1].split() == ["projector@h:1", "projector", "http://h:8082", "0,2", "2",
                                "43", "1", "s", "ago"]
    assert lines[2].endswith("300 s ago (silent)") and " - " in lines[2]
    assert format_instances([], now) == "no instances running"


def test_the_audit_asks_the_actives_or_else_a_standby_that_took_over_alone() -> None:
    now = datetime(2026, 12, 3, 9, tzinfo=UTC)

    def seen(name: str, partitions: list[int], standby: bool = False) -> InstanceSeen:
        return InstanceSeen(instance=name, role="projector", url=f"http://{name}:1",
                            topic=TOPIC, partitions=partitions, standby=standby, at=now)

    a, b = seen("a", [0, 2]), seen("b", [1])
    waiting, took_over = seen("s", [], standby=True), seen("s", [0, 2], standby=True)
    assert answering([a, b, waiting]) == [a, b]
    assert answering([b, took_over]) == [took_over]
    lines = format_instances([took_over], now).splitlines()
    assert lines[1].split()[:4] == ["s", "projector/standby", "http://s:1", "0,2"]
