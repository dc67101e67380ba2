"""Which projector instances an audit over all of them asks (fanout.py `to_ask`): the
rule that keeps an answer from being silently partial, and the URLs that may be asked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tally.instances import InstanceSeen
from tally.services.projector.fanout import combine, to_ask
from tally.services.projector.query import AuditError, QueryResult

NOW = datetime(2026, 12, 3, 12, tzinfo=UTC)


def seen(name: str, partitions: list[int], ago: float = 1, role: str = "projector",
         url: str | None = "http://127.0.0.1:9000", standby: bool = False) -> InstanceSeen:
    return InstanceSeen(instance=name, role=role, url=url, topic="usage.events",
                        partitions=partitions, at=NOW - timedelta(seconds=ago),
                        standby=standby)


def names(instances: list[InstanceSeen]) -> list[str]:
    return [s.instance for s in instances]


def test_every_projector_heard_lately_is_asked_and_no_other_role() -> None:
    listed = [seen("a", [0, 1]), seen("b", [2]), seen("e", [0], role="enforcer")]
    assert names(to_ask(listed, NOW)) == ["a", "b"]


def test_a_silent_instance_whose_partitions_moved_is_left_out() -> None:
    listed = [seen("a", [0, 1, 2]), seen("dead", [1, 2], ago=60)]
    assert names(to_ask(listed, NOW)) == ["a"]


def test_a_standby_that_took_over_is_asked_alone_and_a_dead_one_not_at_all() -> None:
    took_over = [seen("a", [0, 1]), seen("s", [2], standby=True)]
    assert names(to_ask(took_over, NOW)) == ["s"]
    gave_back_then_died = [seen("a", [0, 1]), seen("b", [2]),
                           seen("s", [2], ago=60, standby=True)]
    assert names(to_ask(gave_back_then_died, NOW)) == ["a", "b"]


def test_a_silent_instance_still_owning_a_partition_is_asked() -> None:
    listed = [seen("a", [0, 1]), seen("dead", [1, 2], ago=60)]
    assert names(to_ask(listed, NOW)) == ["a", "dead"]


@pytest.mark.parametrize("url", [None, "http://10.0.0.5:9000", "https://evil.example/",
                                 "file:///etc/passwd", "ftp://127.0.0.1/"])
def test_an_instance_that_may_not_be_asked_is_an_error_naming_it(url: str | None) -> None:
    with pytest.raises(AuditError, match="instance b serves no audit") as refused:
        to_ask([seen("a", [0]), seen("b", [1], url=url)], NOW)
    assert refused.value.status == 502


def test_an_answer_from_an_instance_restoring_is_an_error_naming_it() -> None:
    answers = [(seen("a", [0]), QueryResult(["n"], [(3,)])),
               (seen("b", [1, 2]), QueryResult(["n"], [(4,)], restoring=(2,)))]
    with pytest.raises(AuditError, match="instance b is restoring partitions 2") as refused:
        combine(answers)
    assert refused.value.status == 503


def test_no_projector_listed_is_an_error() -> None:
    with pytest.raises(AuditError, match="no projector instance"):
        to_ask([seen("e", [0], role="enforcer")], NOW)


def test_answers_are_combined_each_row_led_by_its_instance() -> None:
    answers = [(seen("a", [0]), QueryResult(["n"], [(3,)])),
               (seen("b", [1]), QueryResult(["n"], [(4,)], truncated=True))]
    assert combine(answers) == QueryResult(["instance", "n"], [("a", 3), ("b", 4)], True)
