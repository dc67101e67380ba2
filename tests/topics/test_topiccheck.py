"""The topic table against what a cluster has: pure, no broker."""

from __future__ import annotations

from pathlib import Path

from tally.topicadmin import markdown_table
from tally.topiccheck import FoundTopic, compare, describe_ms
from tally.topics import DAY_MS, TABLE, Topics, spec_for


def healthy(name: str, replicas: int = 3, partitions: int = 3) -> FoundTopic:
    spec = Topics().specs()[name]
    return FoundTopic(name, partitions, replicas, spec.configs(replicas))


def cluster(**changed: FoundTopic) -> dict[str, FoundTopic]:
    found = {name: healthy(name) for name in Topics().all()}
    return found | {topic.name: topic for topic in changed.values()}


def differences(found: dict[str, FoundTopic], replicas: int | None = None) -> list[str]:
    return [f"{d.topic} {d.setting} {d.found} -> {d.wanted} refuses={d.refuses} safe={d.safe}"
            for d in compare(Topics().specs(), found, 3, replicas, "k:9092")]


def with_configs(name: str, replicas: int = 3, **configs: str) -> FoundTopic:
    topic = healthy(name, replicas)
    return FoundTopic(name, 3, replicas, dict(topic.configs) | configs)


def test_a_cluster_made_from_the_table_agrees_with_it() -> None:
    assert differences(cluster()) == []


def test_finite_retention_on_the_event_store_refuses_with_the_fixing_command() -> None:
    found = cluster(e=with_configs("usage.events", **{"retention.ms": str(7 * DAY_MS)}))
    (difference,) = compare(Topics().specs(), found, 3, None, "k:9092")
    assert difference.refuses and difference.safe
    assert (difference.topic, difference.setting) == ("usage.events", "retention.ms")
    assert (difference.found, difference.wanted) == ("604800000 (7 days)", "-1 (forever)")
    assert difference.fix == ("kafka-configs.sh --bootstrap-server k:9092 --alter "
                              "--entity-type topics --entity-name usage.events "
                              "--add-config retention.ms=-1")


def test_decisions_without_compaction_refuse() -> None:
    found = cluster(d=with_configs("budget.decisions", **{"cleanup.policy": "delete"}))
    assert differences(found) == [
        "budget.decisions cleanup.policy delete -> compact refuses=True safe=True"]


def test_alert_memory_that_decays_refuses() -> None:
    found = cluster(m=with_configs("budget.alert_memory", **{"cleanup.policy": "delete"}))
    assert differences(found) == [
        "budget.alert_memory cleanup.policy delete -> compact,delete refuses=True safe=True"]


def test_policy_order_does_not_matter() -> None:
    found = cluster(m=with_configs("budget.alert_memory", **{"cleanup.policy": "delete,compact"}))
    assert differences(found) == []


def test_shorter_retention_on_a_buffer_is_only_a_warning() -> None:
    found = cluster(r=with_configs("usage.raw", **{"retention.ms": "60000"}),
                    a=with_configs("budget.alerts", **{"retention.ms": "5000"}))
    assert differences(found) == [
        "usage.raw retention.ms 60000 (60 seconds) -> 259200000 (3 days) refuses=False safe=True",
        "budget.alerts retention.ms 5000 (5 seconds) -> 2592000000 (30 days) refuses=False "
        "safe=True"]


def test_longer_retention_is_a_warning_that_apply_leaves_alone() -> None:
    found = cluster(r=with_configs("usage.raw", **{"retention.ms": "-1"}))
    assert differences(found) == [
        "usage.raw retention.ms -1 (forever) -> 259200000 (3 days) refuses=False safe=False"]


def test_compaction_on_a_buffer_is_not_applied_by_itself() -> None:
    found = cluster(r=with_configs("usage.dlq", **{"cleanup.policy": "compact"}))
    assert differences(found) == ["usage.dlq cleanup.policy compact -> delete refuses=False "
                                  "safe=False"]


def test_min_insync_one_with_three_replicas_refuses_on_vital_topics_only() -> None:
    found = cluster(e=with_configs("usage.events", **{"min.insync.replicas": "1"}),
                    r=with_configs("usage.raw", **{"min.insync.replicas": "1"}))
    assert differences(found) == [
        "usage.raw min.insync.replicas 1 -> 2 refuses=False safe=True",
        "usage.events min.insync.replicas 1 -> 2 refuses=True safe=True"]


def test_min_insync_above_the_replicas_stops_every_write() -> None:
    found = cluster(r=with_configs("usage.raw", replicas=1, **{"min.insync.replicas": "2"}))
    assert differences(found) == ["usage.raw min.insync.replicas 2 -> 1 refuses=True safe=True"]


def test_fewer_replicas_than_asked_refuse_where_vital() -> None:
    found = cluster(e=healthy("usage.events", replicas=1), r=healthy("usage.raw", replicas=1))
    assert differences(found, replicas=3) == [
        "usage.raw replication factor 1 -> 3 refuses=False safe=False",
        "usage.events replication factor 1 -> 3 refuses=True safe=False"]
    assert differences(found, replicas=None) == []


def test_fewer_partitions_warn_and_a_missing_topic_refuses() -> None:
    found = cluster(r=healthy("usage.raw", partitions=1))
    del found["budget.alerts"]
    assert differences(found) == [
        "usage.raw partitions 1 -> 3 refuses=False safe=False",
        "budget.alerts topic missing -> created refuses=True safe=False"]


def test_the_table_has_one_row_per_topic_and_keeps_the_event_store_forever() -> None:
    assert [spec.base for spec in TABLE] == [name for name in Topics().all()]
    assert spec_for("usage.events").retention_ms == -1
    assert spec_for("budget.decisions").cleanup_policy == "compact"
    assert spec_for("usage.events").configs(3)["min.insync.replicas"] == "2"
    assert spec_for("usage.events").configs(1)["min.insync.replicas"] == "1"


def test_durations_are_described_in_words() -> None:
    assert describe_ms("-1") == "-1 (forever)"
    assert describe_ms("3600000") == "3600000 (1 hour)"
    assert describe_ms("1500") == "1500 ms"


def test_the_readme_shows_the_table_of_the_code() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert markdown_table() in readme, "README's topic table is stale: tally topics table"
