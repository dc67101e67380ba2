"""Every Kafka topic name, in one place.

Services take a `Topics`; the default has the plain names. Tests pass a namespace so each
test gets its own topics on one shared broker.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Topics"]


@dataclass(frozen=True)
class Topics:
    namespace: str = ""

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

    def all(self) -> tuple[str, ...]:
        return (self.usage_raw, self.usage_events, self.usage_dlq,
                self.budget_balances, self.budget_decisions, self.budget_alerts)

    def compacted(self) -> frozenset[str]:
        """Topics that keep only the latest message per key."""
        return frozenset({self.budget_balances, self.budget_decisions})
