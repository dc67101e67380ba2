"""Every Kafka topic, in one place: its name and the settings it needs (the topic table).

Services take a `Topics`; the default has the plain names. Tests pass a namespace so each
test gets its own topics on one shared broker. `TABLE` is what topics are created with and
what existing topics are checked against (tally.topiccheck); the README's table in
"Running on your Kafka cluster" is this one, and a test keeps them equal.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DAY_MS", "TABLE", "TopicSpec", "Topics", "spec_for"]

DAY_MS = 86_400_000
FOREVER = -1

# Compaction settings of the snapshot topics: clean often, so that a restart reads about one
# record per key rather than every update since the last cleaning.
COMPACTION = {"min.cleanable.dirty.ratio": "0.1", "segment.ms": str(10 * 60 * 1000)}


@dataclass(frozen=True)
class TopicSpec:
    """One row of the topic table.

    `vital`: a looser setting than the table's loses data or repeats alerts, so services
    refuse to start on it; on the other topics a difference is a warning.
    """

    base: str
    key: str
    cleanup_policy: str  # "delete", "compact" or "compact,delete"
    retention_ms: int  # FOREVER (-1) keeps every record; ignored by a compact-only topic
    vital: bool
    purpose: str

    @property
    def compacted(self) -> bool:
        return "compact" in self.cleanup_policy

    @property
    def deletes(self) -> bool:
        return "delete" in self.cleanup_policy

    def configs(self, replicas: int) -> dict[str, str]:
        """The topic-level configs to create it with, given its replication factor."""
        configs = {"cleanup.policy": self.cleanup_policy,
                   "min.insync.replicas": str(min_insync_replicas(replicas))}
        if self.deletes:
            configs["retention.ms"] = str(self.retention_ms)
        return configs | (COMPACTION if self.compacted else {})


def min_insync_replicas(replicas: int) -> int:
    """2 where there are 3 or more replicas: an acknowledged write survives losing a broker,
    and one broker down still leaves writes possible. 1 below that (nothing else works)."""
    return 2 if replicas >= 3 else 1


TABLE: tuple[TopicSpec, ...] = (
    TopicSpec("usage.raw", "none (gateways)", "delete", 3 * DAY_MS, vital=False,
              purpose="raw usage from gateways; the ingest reads it within seconds"),
    TopicSpec("usage.events", "user_id", "delete", FOREVER, vital=True,
              purpose="the event store: replay rebuilds every balance from it"),
    TopicSpec("usage.dlq", "none", "delete", 30 * DAY_MS, vital=False,
              purpose="rejected events with the reason, kept to investigate"),
    TopicSpec("budget.balances", "user_id", "compact", FOREVER, vital=True,
              purpose="each user's latest balance (the enforcer's input)"),
    TopicSpec("budget.decisions", "user_id", "compact", FOREVER, vital=True,
              purpose="each user's latest decision (gateways' caches read it whole)"),
    TopicSpec("budget.alerts", "user_id", "delete", 30 * DAY_MS, vital=False,
              purpose="the alert log, for the webhook and the dashboard's recent alerts"),
    # Keys live at most one period (a month of 31 days) plus margin: the delete half of the
    # policy drops the keys of periods long over, so the topic does not grow with time.
    TopicSpec("budget.alert_memory", "user_id|period|period_start", "compact,delete",
              62 * DAY_MS, vital=True,
              purpose="the alerts already sent in each user's current periods"),
    TopicSpec("tally.instances", "instance id", "compact,delete", DAY_MS, vital=False,
              purpose="each running instance's share of the partitions and lag "
                      "(tally status --instances)"),
)


def spec_for(base: str) -> TopicSpec:
    return next(spec for spec in TABLE if spec.base == base)


@dataclass(frozen=True)
class Topics:
    """The topic names under a namespace, and the replication factor to create them with
    (None: the broker's default.replication.factor)."""

    namespace: str = ""
    replication_factor: int | None = None

    def _name(self, base: str) -> str:
        return f"{self.namespace}.{base}" if self.namespace else base

    @property
    def usage_raw(self) -> str:
        return self._name("usage.raw")

    @property
    def usage_events(self) -> str:
        return self._name("usage.events")

    @property
    def usage_dlq(self) -> str:
        return self._name("usage.dlq")

    @property
    def budget_balances(self) -> str:
        return self._name("budget.balances")

    @property
    def budget_decisions(self) -> str:
        return self._name("budget.decisions")

    @property
    def budget_alerts(self) -> str:
        return self._name("budget.alerts")

    @property
    def budget_alert_memory(self) -> str:
        return self._name("budget.alert_memory")

    @property
    def instances(self) -> str:
        return self._name("tally.instances")

    def all(self) -> tuple[str, ...]:
        return tuple(self._name(spec.base) for spec in TABLE)

    def specs(self) -> dict[str, TopicSpec]:
        """Every topic name under this namespace with its row of the table."""
        return {self._name(spec.base): spec for spec in TABLE}
