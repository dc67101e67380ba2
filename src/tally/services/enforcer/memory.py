"""The alerts already sent, kept so that a restart repeats none and reads little.

One record per user and period on the compacted budget.alert_memory topic, keyed
`user_id|period|period_start`, holding every alert id sent for that key (thresholds of the
user's own and of a shared budget). A restart reads the topic whole: with compaction about
one record per key; the delete half of its cleanup policy drops the keys of periods long
over (see tally.topics), and `forget_before` drops them from memory, so neither the read
nor the set grows with time, and `budget.alerts` may keep as little as anyone likes.

The shell publishes an alert and its memory record in one Kafka transaction (fence.py):
readers (all read_committed) see both or neither. The ids of alerts handed to the shell
are held "on the way" until it says their transaction committed (`settle`) or did not
(`roll_back`): then the ids of those alerts are forgotten again, so an alert is never
counted as sent unless it was; one heard meanwhile from the topics (another instance sent
it) is kept. A restart also reads the tail of budget.alerts (for the dashboard) and
remembers the alerts there.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from pydantic import BaseModel, ConfigDict

from tally.wire import BudgetAlerted

__all__ = ["AlertMemory", "AlertsSent", "memory_key"]


class AlertsSent(BaseModel):
    """One budget.alert_memory record: every alert id sent for one user and period."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: str
    period_start: datetime
    alert_ids: tuple[str, ...]

    @property
    def user_id(self) -> str:
        """The user of the key (`memory_key`: neither a period nor a date holds a '|')."""
        return self.key.rsplit("|", 2)[0]


def memory_key(alert: BudgetAlerted) -> str:
    return f"{alert.user_id}|{alert.period}|{alert.period_start.isoformat()}"


class AlertMemory:
    """Alert ids by memory key; `ids` is the flat set the core's `new_alerts` takes."""

    def __init__(self) -> None:
        self._by_key: dict[str, AlertsSent] = {}
        self.ids: set[str] = set()
        self._on_the_way: set[str] = set()  # added, not yet committed nor heard

    def __len__(self) -> int:
        return len(self._by_key)

    def restore(self, records: Iterable[AlertsSent], alerts: Iterable[BudgetAlerted]) -> None:
        """What earlier runs sent: memory records, and alerts read from budget.alerts (the
        ones whose record a crash may have kept from being written)."""
        for record in records:
            self._merge(record.key, record.period_start, record.alert_ids)
            self._on_the_way.difference_update(record.alert_ids)
        for alert in alerts:
            self._merge(memory_key(alert), alert.period_start, (alert.alert_id,))
            self._on_the_way.discard(alert.alert_id)

    def add(self, alerts: Iterable[BudgetAlerted]) -> list[AlertsSent]:
        """Remember alerts about to be sent, on the way until `settle` or `roll_back`;
        the records to publish with them (one per key touched)."""
        alerts = list(alerts)
        touched = {memory_key(a): self._merge(memory_key(a), a.period_start, (a.alert_id,))
                   for a in alerts}
        self._on_the_way.update(a.alert_id for a in alerts)
        return list(touched.values())

    def settle(self, alerts: Iterable[BudgetAlerted]) -> None:
        """These alerts were committed: sent for good."""
        self._on_the_way.difference_update(a.alert_id for a in alerts)

    def roll_back(self, alerts: Iterable[BudgetAlerted]) -> None:
        """These alerts' transaction did not commit: forget the ids still on the way, so
        that judging their users again sends them (an id heard meanwhile stays)."""
        for alert in alerts:
            if alert.alert_id not in self._on_the_way:
                continue
            self._on_the_way.discard(alert.alert_id)
            self.ids.discard(alert.alert_id)
            key = memory_key(alert)
            known = self._by_key.get(key)
            if known is None:  # its period forgotten meanwhile
                continue
            kept = tuple(i for i in known.alert_ids if i != alert.alert_id)
            if kept:
                self._by_key[key] = known.model_copy(update={"alert_ids": kept})
            else:
                del self._by_key[key]

    def forget_before(self, cutoff: datetime) -> None:
        """Drop the keys of periods that started before `cutoff` (long over)."""
        for key, record in list(self._by_key.items()):
            if record.period_start < cutoff:
                del self._by_key[key]
                self.ids.difference_update(record.alert_ids)

    def _merge(self, key: str, period_start: datetime, ids: Iterable[str]) -> AlertsSent:
        known = self._by_key.get(key)
        merged = set(ids) | set(known.alert_ids if known else ())
        record = AlertsSent(key=key, period_start=period_start, alert_ids=tuple(sorted(merged)))
        self._by_key[key] = record
        self.ids.update(merged)
        return record
