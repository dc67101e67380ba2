"""The verdict's figures: what the run left behind against what was sent.

- balances: DuckDB against the independent recount of the distinct valid events;
- the DLQ: exactly one record per malformed message on usage.raw, found by its source;
- decisions: each user's last decision against `tally simulate`'s functions (read_events,
  fold_events, budgets_report) over the same events, at that decision's own `as_of`
  (the enforcer's wall clock), so a period boundary crossed during the run is no excuse;
  and every decision published: usage never going back within a period, nor beyond the
  recount;
- alerts: no alert_id twice, and (when no period ended during the run) none missing.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from bench.faults.evidence import Evidence, latest_by_user
from bench.faults.workload import Event, Workload, recount
from tally.config.models import Config
from tally.core import budgets_report, fold_events, new_alerts
from tally.core.report import shown_decision
from tally.core.usage import UserUsage
from tally.simulate import read_events
from tally.wire import BudgetDecided, RejectedEvent, UsageRecorded

__all__ = ["Balances", "Decisions", "Dlq", "check_balances", "check_decisions", "check_dlq",
           "check_history", "missing_alerts"]


@dataclass(frozen=True)
class Balances:
    expected_events: int
    ledger_rows: int
    lost: int  # valid events produced and acked, absent from the ledger
    extra: int  # ledger events nobody produced, or the same event twice
    rows: int
    wrong_rows: int
    tokens_over: int  # counted twice (or invented)
    tokens_under: int  # lost


def check_balances(events: Sequence[Event], ids: Sequence[str],
                   balances: Mapping[tuple[str, str, datetime], int]) -> Balances:
    expected = {e.event_id for e in events}
    found = set(ids)
    want = recount(events)
    diffs = [balances.get(k, 0) - want.get(k, 0) for k in want.keys() | balances.keys()]
    return Balances(
        expected_events=len(expected), ledger_rows=len(ids), lost=len(expected - found),
        extra=len(found - expected) + len(ids) - len(found), rows=len(want),
        wrong_rows=sum(1 for d in diffs if d), tokens_over=sum(d for d in diffs if d > 0),
        tokens_under=-sum(d for d in diffs if d < 0))


@dataclass(frozen=True)
class Dlq:
    """usage.dlq (at-least-once: the ingest may reject a record again after a crash) and the
    projector's `rejected` table (each malformed message once), both by source."""

    malformed_on_raw: int  # malformed records on usage.raw (a resent one counts twice)
    records: int
    missing: int
    copies: int  # extra records for a source, from the ingest's redelivery
    not_malformed: int
    wrong_original: int
    rejected_rows: int  # the projector's `rejected` table
    rejected_missing: int
    rejected_duplicated: int
    rejected_not_malformed: int
    raw_valid_ids: set[str] = field(repr=False, default_factory=set)
    raw_foreign: int = 0  # records on usage.raw that the run never sent


def _keeps(dead: RejectedEvent, raw: bytes) -> bool:
    """Whether a DLQ record holds `raw`: whole, or (past its size bound) a prefix with the
    size and hash of the whole."""
    if dead.original_truncated:
        return (dead.original_size == len(raw)
                and dead.original_sha256 == hashlib.sha256(raw).hexdigest()
                and raw.decode(errors="replace").startswith(dead.original[:-1]))
    return dead.original == raw.decode(errors="replace")


def check_dlq(workload: Workload, evidence: Evidence) -> Dlq:
    malformed = {r.source: r.value or b"" for r in evidence.raw
                 if (r.value or b"") in workload.malformed}
    topic = Counter(d.source for d in evidence.dlq)
    table = Counter(evidence.rejected_sources)
    originals = {d.source: d for d in evidence.dlq}
    valid = [r.value for r in evidence.raw if r.value and r.value not in workload.malformed]
    ids = {str(orjson.loads(v)["event_id"]) for v in valid}
    sent = {e.event_id for e in workload.events}
    return Dlq(
        malformed_on_raw=len(malformed), records=len(evidence.dlq),
        missing=len(malformed.keys() - topic.keys()), copies=_copies(topic),
        not_malformed=len(topic.keys() - malformed.keys()),
        wrong_original=sum(1 for s, raw in malformed.items()
                           if s in originals and not _keeps(originals[s], raw)),
        rejected_rows=len(evidence.rejected_sources),
        rejected_missing=len(malformed.keys() - table.keys()),
        rejected_duplicated=_copies(table),
        rejected_not_malformed=len(table.keys() - malformed.keys()),
        raw_valid_ids=ids, raw_foreign=len(ids - sent))


def _copies(sources: Counter[str]) -> int:
    return sum(n - 1 for n in sources.values())


@dataclass(frozen=True)
class Decisions:
    users: int
    mismatched: list[str]  # "user: field a != b" for the first differing fields
    missing: list[str]  # users simulate reports and no decision was published for
    published: int = 0  # every decision on budget.decisions
    went_back: list[str] = field(default_factory=list)  # less usage than the one before
    beyond_final: int = 0  # more usage than the recount of all events


class _Simulation:
    """simulate's functions over the run's events, folded once per cut-off."""

    def __init__(self, events: Sequence[Event], config: Config) -> None:
        parsed = read_events((e.to_json() for e in events), "<faults>")
        self.events: list[UsageRecorded] = sorted(parsed, key=lambda e: e.occurred_at)
        self.times = [e.occurred_at for e in self.events]
        self.config = config
        self._folds: dict[int, dict[str, UserUsage]] = {}

    def report(self, at: datetime) -> dict[str, dict[str, Any]]:
        """user_id -> the decision `tally simulate --at AT` prints for that user."""
        cut = bisect_right(self.times, at)  # simulate ignores events after --at
        if cut not in self._folds:
            budgets = self.config.budgets.per_user_budgets
            self._folds[cut] = fold_events(self.events[:cut], budgets)
        rows = budgets_report(self._folds[cut], self.config, at)["users"]
        return {row["user_id"]: row["decision"] for row in rows}


def check_decisions(events: Sequence[Event], config: Config,
                    decisions: Iterable[BudgetDecided], end: datetime) -> Decisions:
    simulation = _Simulation(events, config)
    latest = latest_by_user(decisions)
    mismatched = []
    for user, decision in sorted(latest.items()):
        want = simulation.report(decision.as_of).get(user)
        got = shown_decision(decision)
        if want != got:
            mismatched.append(f"{user}: {_first_difference(want or {}, got)}")
    missing = sorted(simulation.report(end).keys() - latest.keys())
    return Decisions(len(latest), mismatched, missing)


def check_history(decisions: Sequence[BudgetDecided], events: Sequence[Event]) -> Decisions:
    """Every decision, in order per user: within a period usage only grows, and never
    beyond what all the events come to; otherwise a gateway was told something stale."""
    final = recount(events)
    previous: dict[str, BudgetDecided] = {}
    went_back, beyond = [], 0
    for d in decisions:
        before = previous.get(d.user_id)
        if before is not None and _went_back(before, d):
            went_back.append(f"{d.user_id}: {before.daily.tokens_used:,} then "
                             f"{d.daily.tokens_used:,} at {d.as_of:%H:%M:%S.%f}")
        beyond += any(p.tokens_used > final.get((d.user_id, p.period, p.period_start), 0)
                      for p in (d.daily, d.monthly))
        previous[d.user_id] = d
    return Decisions(len(previous), [], [], len(decisions), went_back, beyond)


def _went_back(before: BudgetDecided, after: BudgetDecided) -> bool:
    return any(b.period_start == a.period_start and a.tokens_used < b.tokens_used
               for b, a in ((before.daily, after.daily), (before.monthly, after.monthly)))


def _first_difference(want: Mapping[str, Any], got: Mapping[str, Any]) -> str:
    keys = sorted(want.keys() | got.keys())
    diffs = [f"{k} simulate={want.get(k)!r} live={got.get(k)!r}"
             for k in keys if want.get(k) != got.get(k)]
    return "; ".join(diffs[:3])


def missing_alerts(events: Sequence[Event], config: Config, at: datetime,
                   alert_ids: Iterable[str]) -> list[str]:
    """The alerts simulate's decisions at `at` call for that budget.alerts lacks."""
    budgets = config.budgets.per_user_budgets
    sent = set(alert_ids)
    wanted = [a.alert_id
              for decision in _Simulation(events, config).report(at).values()
              for a in new_alerts(None, BudgetDecided.model_validate(decision), budgets, set())]
    return sorted(set(wanted) - sent)
