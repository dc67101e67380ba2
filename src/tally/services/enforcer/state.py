"""What the enforcer knows and decides, with no I/O: the shell feeds it and publishes.

State is rebuilt on every start from compacted topics: budget.balances (usage),
budget.decisions and budget.alert_memory (what was already said, memory.py), so a restart
or a replay repeats no decision and no alert.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from tally.config.models import Config
from tally.core import (
    Window,
    calendar_for,
    decide,
    from_balance,
    group_usage,
    known_usages,
    new_alerts,
)
from tally.core.report import with_identities
from tally.core.usage import UserUsage
from tally.services.enforcer.memory import AlertMemory, AlertsSent
from tally.topics import spec_for
from tally.wire import BalanceUpdated, BudgetAlerted, BudgetDecided

__all__ = ["Enforcer", "Outcome", "same_decision"]

# An alert memory key is kept as long as the topic keeps it: past that its period is over.
MEMORY_SPAN = timedelta(milliseconds=spec_for("budget.alert_memory").retention_ms)


@dataclass
class Outcome:
    """What to publish after one step: changed decisions, new alerts, then the alert
    memory records that say those alerts were sent."""

    decisions: list[BudgetDecided] = field(default_factory=list)
    alerts: list[BudgetAlerted] = field(default_factory=list)
    memory: list[AlertsSent] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.decisions or self.alerts)


def same_decision(a: BudgetDecided | None, b: BudgetDecided) -> bool:
    """Equal in everything a gateway acts on; `as_of` alone is not a change. Compared field
    by field (3 us), not as a model_copy with b's as_of (32 us, once per balance judged)."""
    return (a is not None and type(a) is type(b)
            and {**a.__dict__, "as_of": b.as_of} == b.__dict__)


class Enforcer:
    """Usage per user, the decisions already published and the alert ids already sent."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.usages: dict[str, UserUsage] = {}
        self.published: dict[str, BudgetDecided] = {}
        self.memory = AlertMemory()
        self._daily: Window | None = None

    def restore(self, decisions: Iterable[BudgetDecided], memory: Iterable[AlertsSent] = (),
                alerts: Iterable[BudgetAlerted] = ()) -> None:
        """Remember what earlier runs already published (latest decision wins)."""
        for decision in decisions:
            self.published[decision.user_id] = decision
        self.memory.restore(memory, alerts)

    def on_balances(self, balances: Iterable[BalanceUpdated], now: datetime) -> Outcome:
        return self.evaluate(self._affected(self.remember(balances)), now)

    def remember(self, balances: Iterable[BalanceUpdated]) -> set[str]:
        """Take in usage without judging anyone (catching up at start); the users in it."""
        changed = set()
        for balance in balances:
            self.usages[balance.user_id] = from_balance(balance)
            changed.add(balance.user_id)
        return changed

    def on_config(self, config: Config, now: datetime) -> Outcome:
        """New limits: everyone is judged again."""
        self.config = config
        return self.evaluate_everyone(now)

    def on_tick(self, now: datetime) -> Outcome:
        """Periods end on the clock: at a reset, everyone is judged again."""
        schedule = self.config.budgets.per_user_budgets.reset_schedule
        if self._daily is not None and now in self._daily:
            return Outcome()
        self._daily = calendar_for(schedule).daily_window(now)
        self.memory.forget_before(now - MEMORY_SPAN)
        return self.evaluate_everyone(now)

    def evaluate_everyone(self, now: datetime) -> Outcome:
        return self.evaluate(set(self._everyone()), now)

    def evaluate(self, user_ids: set[str], now: datetime) -> Outcome:
        everyone = self._everyone()
        # Summed over everyone (O(users)): only when someone judged belongs to a group.
        in_groups = self._has_group_budgets() and any(_groups_of(everyone[uid])
                                                      for uid in user_ids)
        groups = group_usage(everyone.values()) if in_groups else None
        budgets = self.config.budgets.per_user_budgets
        outcome = Outcome()
        for user_id in sorted(user_ids):
            decision = with_identities(decide(everyone[user_id], budgets, now, groups),
                                       self.config)
            previous = self.published.get(user_id)
            outcome.alerts.extend(new_alerts(previous, decision, budgets, self.memory.ids))
            if not same_decision(previous, decision):
                self.published[user_id] = decision
                outcome.decisions.append(decision)
        outcome.memory = self.memory.add(outcome.alerts)
        return outcome

    def decision_for(self, user_id: str, now: datetime) -> BudgetDecided:
        """The published decision, or what one would be now for a user never judged."""
        published = self.published.get(user_id)
        if published is not None:
            return published
        everyone = self._everyone()
        usage = everyone.get(user_id) or UserUsage(user_id)
        groups = group_usage(everyone.values()) if self._has_group_budgets() else None
        return decide(usage, self.config.budgets.per_user_budgets, now, groups)

    def current(self) -> list[tuple[BudgetDecided, UserUsage]]:
        """Every known user's published decision and labelled usage, sorted by user.

        Known: in users.yaml or seen in balances. A decision restored from an earlier run
        for a user now unknown (removed from users.yaml, never used) is not listed.
        """
        everyone = self._everyone()
        return [(self.published[uid], everyone[uid]) for uid in sorted(everyone)
                if uid in self.published]

    def _everyone(self) -> dict[str, UserUsage]:
        return known_usages(self.usages, self.config)

    def _has_group_budgets(self) -> bool:
        budgets = self.config.budgets.per_user_budgets
        return bool(budgets.department_budgets or budgets.project_budgets)

    def _affected(self, changed: set[str]) -> set[str]:
        """The changed users and everyone who shares a department or project with them."""
        if not self._has_group_budgets():
            return changed
        everyone = self._everyone()
        groups = {g for uid in changed for g in _groups_of(everyone[uid])}
        if not groups:  # no need to look at everyone
            return changed
        return changed | {uid for uid, u in everyone.items() if _groups_of(u) & groups}


def _groups_of(usage: UserUsage) -> set[str]:
    return {f"department:{usage.department}", f"project:{usage.project}"} - {
        "department:None", "project:None"}
