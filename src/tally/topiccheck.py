"""Existing topics against the topic table: what differs, how bad it is, what fixes it.

Pure: tally.kafka describes the cluster into `FoundTopic`s and acts on the `Difference`s
(services refuse to start on a refusing one; `tally topics apply` makes the safe ones).

A difference *refuses* when it loses data or repeats alerts on a vital topic (finite
retention on usage.events, no compaction on budget.decisions, min.insync.replicas 1 with
three replicas...); every other difference is a warning. It is *safe* to apply when the
new setting keeps at least what the old one did (a longer retention, compaction on a
snapshot topic, a higher min.insync.replicas): `tally topics apply` never makes Kafka
delete sooner, and never changes partitions or replicas (that moves data; the fix says how).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tally.errors import ClusterError
from tally.topics import FOREVER, TopicSpec, min_insync_replicas

__all__ = ["Difference", "FoundTopic", "TopicsMisconfigured", "compare", "describe_ms"]


@dataclass(frozen=True)
class FoundTopic:
    """What the cluster has for one topic."""

    name: str
    partitions: int
    replicas: int  # the fewest replicas of any partition
    configs: Mapping[str, str]  # every topic config, defaults included


@dataclass(frozen=True)
class Difference:
    topic: str
    setting: str
    found: str
    wanted: str
    refuses: bool
    safe: bool  # `tally topics apply` makes this change
    fix: str  # the command that fixes it by hand
    value: str = ""  # the config value `tally topics apply` sets (config settings only)

    def describe(self) -> str:
        level = "REFUSED" if self.refuses else "warning"
        how = f"{self.fix}\n      or: tally topics apply" if self.safe else self.fix
        return (f"  [{level}] {self.topic}: {self.setting} is {self.found}, wanted "
                f"{self.wanted}\n      fix: {how}")


class TopicsMisconfigured(ClusterError):
    """Existing topics differ from the table in a way that loses data or repeats alerts."""

    def __init__(self, differences: list[Difference]) -> None:
        self.differences = differences
        lines = "\n".join(d.describe() for d in differences)
        super().__init__("Kafka topics differ from Tally's topic table in ways that would "
                         f"lose data or repeat alerts; not starting:\n{lines}")


def describe_ms(value: str) -> str:
    """A retention.ms value with its meaning: "604800000 (7 days)", "-1 (forever)"."""
    try:
        millis = int(value)
    except ValueError:
        return value
    if millis < 0:
        return f"{value} (forever)"
    for unit, size in (("day", 86_400_000), ("hour", 3_600_000), ("second", 1000)):
        if millis >= size and millis % size == 0:
            count = millis // size
            return f"{value} ({count} {unit}{'s' if count > 1 else ''})"
    return f"{value} ms"


def compare(specs: Mapping[str, TopicSpec], found: Mapping[str, FoundTopic],
            partitions: int, replicas: int | None, bootstrap: str) -> list[Difference]:
    """Every difference between the table (`specs`, by topic name) and the cluster."""
    differences: list[Difference] = []
    for name, spec in specs.items():
        topic = found.get(name)
        if topic is None:
            differences.append(Difference(name, "topic", "missing", "created", True, False,
                                          "tally topics apply (creates it as the table says)"))
            continue
        fixer = _Fixer(bootstrap, name)
        differences += _policy(spec, topic, fixer) + _retention(spec, topic, fixer)
        differences += _insync(spec, topic, fixer) + _layout(spec, topic, partitions,
                                                             replicas, fixer)
    return differences


@dataclass(frozen=True)
class _Fixer:
    bootstrap: str
    topic: str

    def config(self, setting: str, value: str) -> str:
        value = f"[{value}]" if "," in value else value  # kafka-configs' list syntax
        return (f"kafka-configs.sh --bootstrap-server {self.bootstrap} --alter --entity-type "
                f"topics --entity-name {self.topic} --add-config {setting}={value}")

    def partitions(self, count: int) -> str:
        return (f"kafka-topics.sh --bootstrap-server {self.bootstrap} --alter --topic "
                f"{self.topic} --partitions {count}  (moves keys: only while the topic "
                "is empty, or recreate it)")

    def replicas(self, count: int) -> str:
        return (f"kafka-reassign-partitions.sh --bootstrap-server {self.bootstrap} --execute "
                f"--reassignment-json-file <a plan giving each partition of {self.topic} "
                f"{count} replicas>")


def _policy(spec: TopicSpec, topic: FoundTopic, fixer: _Fixer) -> list[Difference]:
    found = topic.configs.get("cleanup.policy", "delete")
    if set(found.split(",")) == set(spec.cleanup_policy.split(",")):
        return []
    # Compaction on a snapshot topic is what its readers expect; a delete policy that keeps
    # everything deletes nothing. Anything else could drop records the old policy kept.
    safe = spec.compacted or spec.retention_ms == FOREVER
    return [Difference(topic.name, "cleanup.policy", found, spec.cleanup_policy, spec.vital,
                       safe, fixer.config("cleanup.policy", spec.cleanup_policy),
                       spec.cleanup_policy)]


def _retention(spec: TopicSpec, topic: FoundTopic, fixer: _Fixer) -> list[Difference]:
    if not spec.deletes:
        return []
    found = int(topic.configs.get("retention.ms", str(FOREVER)))
    if found == spec.retention_ms:
        return []
    wanted = str(spec.retention_ms)
    shorter = found != FOREVER and (spec.retention_ms == FOREVER or found < spec.retention_ms)
    return [Difference(topic.name, "retention.ms", describe_ms(str(found)),
                       describe_ms(wanted), spec.vital and shorter, shorter,
                       fixer.config("retention.ms", wanted), wanted)]


def _insync(spec: TopicSpec, topic: FoundTopic, fixer: _Fixer) -> list[Difference]:
    found = int(topic.configs.get("min.insync.replicas", "1"))
    wanted = min_insync_replicas(topic.replicas)
    if wanted <= found <= topic.replicas:
        return []
    # Above the replica count no write is ever acknowledged: everything stops.
    refuses = found > topic.replicas or spec.vital
    return [Difference(topic.name, "min.insync.replicas", str(found), str(wanted), refuses,
                       True, fixer.config("min.insync.replicas", str(wanted)), str(wanted))]


def _layout(spec: TopicSpec, topic: FoundTopic, partitions: int, replicas: int | None,
            fixer: _Fixer) -> list[Difference]:
    found: list[Difference] = []
    if topic.partitions < partitions:
        found.append(Difference(topic.name, "partitions", str(topic.partitions),
                                str(partitions), False, False, fixer.partitions(partitions)))
    if replicas is not None and topic.replicas < replicas:
        found.append(Difference(topic.name, "replication factor", str(topic.replicas),
                                str(replicas), spec.vital, False, fixer.replicas(replicas)))
    return found
