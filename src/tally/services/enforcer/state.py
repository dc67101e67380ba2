"""What the enforcer knows and decides, with no I/O: the shell feeds it and publishes.

State is rebuilt on every start from compacted topics: budget.balances (usage),
budget.decisions and budget.alert_memory (what was already said, memory.py), so a restart
or a replay repeats no decision and no alert.

With more than one instance (group.py), each holds every user's usage (a shared budget sums
users of every partition) but decides only for the users its `Ownership` names; what the
others decide it hears back from the topics (`hear`), to answer for everyone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from aiokafka.partitioner import murmur2

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
from tally.wire import BalanceUpdated, BudgetAlerted, BudgetDecided, SourcePosition

log = logging.getLogger(__name__)

__all__ = ["Enforcer", "Outcome", "Ownership", "partition_of", "same_decision"]

# An alert memory key is kept as long as the topic keeps it: past that its period is over.
MEMORY_SPAN = timedelta(milliseconds=spec_for("budget.alert_memory").retention_ms)


@dataclass
class Outcome:
    """What to publish after one step: changed decisions, new alerts, then the alert
    memory records that say those alerts were sent."""

    decisions: list[BudgetDecided] = field(default_factory=list)
    alerts: list[BudgetAlerted] = field(default_factory=list)
    memory: list[AlertsSent] = field(default_factory=list)
    # Per decision, the one it replaced as held (None: none was): held again if it is not
    # sent after all (`Enforcer.withhold`).
    replaced: dict[str, BudgetDecided | None] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.decisions or self.alerts)

    def then(self, step: Outcome) -> None:
        """Adds a later step's outcome to this one, in order; a user's decision replaced in
        both is held again, if unsent, as it was before the first."""
        self.decisions += step.decisions
        self.alerts += step.alerts
        self.memory += step.memory
        for user_id, previous in step.replaced.items():
            self.replaced.setdefault(user_id, previous)


def partition_of(user_id: str, partitions: int) -> int:
    """The budget.balances partition of a user's balances: the Kafka clients' default
    partitioner (murmur2 of the key, as Java's), which the projector's keyed sends use.
    Computed rather than learnt from records, so a user no balance has named yet (in
    users.yaml, never used) still has exactly one owner among the instances."""
    hashed: int = murmur2(user_id.encode())
    return (hashed & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Ownership:
    """The users this instance decides and alerts for: those of the budget.balances
    partitions the group gave it. `partitions` None: every user (a lone instance, tests,
    `tally simulate`)."""

    partitions: frozenset[int] | None = None
    count: int = 1  # partitions of budget.balances

    @classmethod
    def nobody(cls, count: int) -> Ownership:
        return cls(frozenset(), count)

    def owns(self, user_id: str) -> bool:
        return self.partitions is None or partition_of(user_id, self.count) in self.partitions


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
        self.ownership = Ownership()
        self._sources: dict[str, SourcePosition] = {}  # the usage.events position of each
        # Per owned user, decisions this instance sent and has not yet heard back, and the
        # owned users whose latest decision on the topic is not the one held (`restate`).
        self._unheard: dict[str, int] = {}
        self._contradicted: set[str] = set()
        # Per owned user, the latest decision read back when it is not the held one (one
        # of this instance's still to be overtaken, or another's): the user's decision
        # once this instance no longer decides for them (`lose`).
        self._on_topic: dict[str, BudgetDecided] = {}
        self._daily: Window | None = None

    def restore(self, decisions: Iterable[BudgetDecided], memory: Iterable[AlertsSent] = (),
                alerts: Iterable[BudgetAlerted] = ()) -> None:
        """Remember what earlier runs already published (latest decision wins)."""
        self._said(decisions, memory, alerts)

    def on_balances(self, balances: Iterable[BalanceUpdated], now: datetime) -> Outcome:
        return self.evaluate(self._affected(self.remember(balances)), now)

    def remember(self, balances: Iterable[BalanceUpdated]) -> set[str]:
        """Take in usage without judging anyone (catching up at start); the users in it.

        A balance from an older usage.events position than the one held is ignored: a
        projector that lost the partition (a zombie finishing its batch) sent it after
        the new owner had sent a later one."""
        changed = set()
        for balance in balances:
            held = self._sources.get(balance.user_id)
            if held is not None and not held.superseded_by(balance.source):
                continue
            self._sources[balance.user_id] = balance.source
            self.usages[balance.user_id] = from_balance(balance)
            changed.add(balance.user_id)
        return changed

    def take(self, ownership: Ownership, now: datetime) -> Outcome:
        return self.evaluate(self.gain(ownership), now)

    def gain(self, ownership: Ownership) -> set[str]:
        """Decide for these users from now on; the users gained, to judge at once: their
        usage is known already (every instance reads every balance), so whatever the last
        owner left unsaid is said then. `hear` first, or what it did say is said again."""
        before, self.ownership = self.ownership, ownership
        gained = {uid for uid in self._everyone()
                  if ownership.owns(uid) and not before.owns(uid)}
        for uid in gained:  # all heard before gaining: nothing of this instance's is due
            self._unheard.pop(uid, None)
        return gained

    def lose(self, ownership: Ownership) -> None:
        """Decide only for these users from now on. For those lost, what was read back
        last stands; anything published since is heard as it comes."""
        self.ownership = ownership
        for user_id in [u for u in self._on_topic if not ownership.owns(u)]:
            self.published[user_id] = self._on_topic.pop(user_id)
        for user_id in [u for u in self._unheard if not ownership.owns(u)]:
            del self._unheard[user_id]

    def hear(self, decisions: Iterable[BudgetDecided], memory: Iterable[AlertsSent] = (),
             alerts: Iterable[BudgetAlerted] = ()) -> list[BudgetDecided]:
        """What the instances published, read back from the topics; the decisions taken.

        Decisions only of users this instance does not decide for: its own it holds
        already, and reading back one of them can be older than what it has sent since.
        Alerts and alert memory of everyone: the memory only grows, and holding the
        others' makes taking their users over repeat none of their alerts."""
        decisions = list(decisions)
        taken = [d for d in decisions if not self.ownership.owns(d.user_id)]
        self._said(taken, memory, alerts)
        for decision in decisions:
            if self.ownership.owns(decision.user_id):
                self._heard_own(decision)
        return taken

    def _heard_own(self, decision: BudgetDecided) -> None:
        """A decision read back for a user this instance decides for: its own, or (none of
        its own being due) another's, sent after losing the user (a zombie's late batch).
        The topic's latest must be the held one, or gateways keep the other."""
        user_id = decision.user_id
        if same_decision(self.published.get(user_id), decision):
            self._on_topic.pop(user_id, None)
        else:
            self._on_topic[user_id] = decision
        due = self._uncount(user_id)
        if not due and not same_decision(self.published.get(user_id), decision):
            self._contradicted.add(user_id)

    def _uncount(self, user_id: str) -> int:
        """One of the user's decisions sent and not yet heard back is accounted for (heard,
        or never sent); how many there were."""
        due = self._unheard.pop(user_id, 0)
        if due > 1:
            self._unheard[user_id] = due - 1
        return due

    def withhold(self, outcome: Outcome, users: Iterable[str]) -> None:
        """The outcome's decisions for these users were not sent (their alerts' transaction
        did not commit: fence.py): each holds the decision it had before again, the one on
        the topic, so that judging them again sends theirs. (Kept, the unsent one would
        look said: an instance fenced off a partition it then takes again would judge its
        users the same and send nothing, leaving gateways on the older decision.)"""
        for user_id in users:
            if user_id not in outcome.replaced:
                continue
            previous = outcome.replaced[user_id]
            if previous is None:
                self.published.pop(user_id, None)
            else:
                self.published[user_id] = previous
            self._uncount(user_id)

    def restate(self) -> Outcome:
        """The held decisions of owned users whose latest one on the topic is another's:
        to send again, so that the topic ends with them."""
        users = sorted(u for u in self._contradicted
                       if self.ownership.owns(u) and u in self.published)
        self._contradicted.clear()
        outcome = Outcome(decisions=[self.published[u] for u in users])
        self._count_sent(outcome)
        return outcome

    def _count_sent(self, outcome: Outcome) -> None:
        for decision in outcome.decisions:
            self._unheard[decision.user_id] = self._unheard.get(decision.user_id, 0) + 1

    def _said(self, decisions: Iterable[BudgetDecided], memory: Iterable[AlertsSent],
              alerts: Iterable[BudgetAlerted]) -> None:
        for decision in decisions:
            self.published[decision.user_id] = decision
        self.memory.restore(memory, alerts)

    def on_config(self, config: Config, now: datetime) -> Outcome:
        return self.evaluate(self.reconfigure(config), now)

    def reconfigure(self, config: Config) -> set[str]:
        """New limits: everyone is judged again (the users to judge)."""
        self.config = config
        return set(self._everyone())

    def on_tick(self, now: datetime) -> Outcome:
        return self.evaluate(self.tick(now), now)

    def tick(self, now: datetime) -> set[str]:
        """Periods end on the clock: at a reset, everyone is judged again (the users to
        judge; none between resets)."""
        schedule = self.config.budgets.per_user_budgets.reset_schedule
        if self._daily is not None and now in self._daily:
            return set()
        self._daily = calendar_for(schedule).daily_window(now)
        self.memory.forget_before(now - MEMORY_SPAN)
        return set(self._everyone())

    def evaluate(self, user_ids: set[str], now: datetime) -> Outcome:
        everyone = self._everyone()
        judged = sorted(u for u in user_ids if self.ownership.owns(u))
        # Summed over everyone (O(users)): only when someone judged belongs to a group.
        in_groups = self._has_group_budgets() and any(_groups_of(everyone[uid])
                                                      for uid in judged)
        groups = group_usage(everyone.values()) if in_groups else None
        budgets = self.config.budgets.per_user_budgets
        outcome = Outcome()
        for user_id in judged:
            previous = self.published.get(user_id)
            try:
                decision = with_identities(decide(everyone[user_id], budgets, now, groups),
                                           self.config)
                alerts = new_alerts(previous, decision, budgets, self.memory.ids)
            except Exception:
                # One user's failure (a bug the policy meets on their usage) must not stop
                # the others' decisions: theirs stays as it was, judged again next time.
                log.exception("judging %s failed: their decision stays as it was", user_id)
                continue
            outcome.alerts.extend(alerts)
            if not same_decision(previous, decision):
                outcome.decisions.append(decision)
                outcome.replaced[user_id] = previous
        # Held as said only once all are judged: an outcome is taken whole or not at all.
        self.published.update((d.user_id, d) for d in outcome.decisions)
        outcome.memory = self.memory.add(outcome.alerts)
        self._count_sent(outcome)
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
