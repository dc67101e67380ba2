"""The figures of a fault run, the verdict drawn from them, and their printout."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from bench.faults.checks import Balances, Decisions, Dlq
from bench.faults.producer import Produced
from bench.faults.services import ServiceStats
from bench.faults.workload import Workload

if TYPE_CHECKING:
    from bench.faults.run import Plan

__all__ = ["Figures", "render"]


@dataclass(frozen=True)
class Figures:
    workload: Workload
    namespace: str
    boundary_crossed: bool
    balances: Balances
    dlq: Dlq
    decisions: Decisions
    history: Decisions
    alerts: int
    duplicate_alerts: int
    missing_alerts: list[str] | None  # None: a period ended during the run, not judged
    planned_kills: int = 0
    kills: int = 0
    produced: Produced = field(default_factory=Produced)
    broker_down: float = 0.0
    drained: bool = False
    services: Mapping[str, ServiceStats] = field(default_factory=dict)
    seconds: float = 0.0

    def completed(self, plan: Plan, produced: Produced, kills: int, broker_down: float,
                  drained: bool, services: Mapping[str, ServiceStats],
                  seconds: float) -> Figures:
        return replace(self, planned_kills=plan.kills, produced=produced, kills=kills,
                       broker_down=broker_down, drained=drained, services=services,
                       seconds=seconds)

    def failures(self) -> list[str]:
        b, d, dec = self.balances, self.dlq, self.decisions
        checks = {
            "not drained before the timeout": not self.drained,
            "fewer kills than planned": self.kills < self.planned_kills,
            "messages never acked": self.produced.acked < len(self.workload.sends),
            "acked events missing on usage.raw": b.expected_events - _on_raw(self) > 0,
            "events lost": b.lost > 0,
            "events counted twice or invented": b.extra > 0 or b.tokens_over > 0,
            "balances differ from the recount": b.wrong_rows > 0,
            "DLQ misses a malformed message or holds another": d.missing + d.not_malformed > 0,
            "DLQ originals differ": d.wrong_original > 0,
            "rejected table is not exactly the malformed messages": (
                d.rejected_missing + d.rejected_duplicated + d.rejected_not_malformed) > 0,
            "usage.raw holds messages the run never sent": d.raw_foreign > 0,
            "decisions differ from simulate": bool(dec.mismatched or dec.missing),
            "decisions went back or beyond the events": bool(
                self.history.went_back or self.history.beyond_final),
            "an alert was sent twice": self.duplicate_alerts > 0,
            "alerts missing": bool(self.missing_alerts),
            "a service did not stop on SIGTERM": any(
                s.stopped_cleanly is False for s in self.services.values()),
        }
        return [what for what, failed in checks.items() if failed]


def _on_raw(f: Figures) -> int:
    return len(f.dlq.raw_valid_ids & {e.event_id for e in f.workload.events})


def render(f: Figures) -> str:
    w, b, d, dec = f.workload, f.balances, f.dlq, f.decisions
    lines = [
        f"fault injection ({f.namespace}): {len(w.events) + len(w.malformed):,} events "
        f"({len(w.events):,} valid, {len(w.malformed):,} malformed) + {w.duplicates:,} "
        f"sent twice = {len(w.sends):,} messages, in {f.seconds:.0f} s",
        f"  produced: {f.produced.acked:,} acked in {f.produced.seconds:.0f} s "
        f"({f.produced.resent:,} sends repeated after errors); valid events on usage.raw: "
        f"{_on_raw(f):,} of {b.expected_events:,}",
        f"  faults: {f.kills} SIGKILLs ({_per_service(f, 'kills')}); broker restarted once, "
        f"down {f.broker_down:.1f} s",
        f"  exits nobody caused (each restarted): {sum(len(s.exits) for s in f.services.values())}"
        f"; stopped cleanly on SIGTERM at the end: {_clean(f)}",
        *_exits(f),
        f"  ledger: {b.ledger_rows:,} events; lost {b.lost}, counted twice {b.extra}; "
        f"balances: {b.rows} rows, {b.wrong_rows} differ from the recount "
        f"(+{b.tokens_over:,} / -{b.tokens_under:,} tokens)",
        f"  usage.dlq: {d.records:,} records for {d.malformed_on_raw:,} malformed messages: "
        f"missing {d.missing}, not malformed {d.not_malformed}, wrong original "
        f"{d.wrong_original}, {d.copies} copies re-sent by the at-least-once ingest",
        f"  rejected table (the DLQ as audited): {d.rejected_rows:,} rows: missing "
        f"{d.rejected_missing}, counted twice {d.rejected_duplicated}, not malformed "
        f"{d.rejected_not_malformed}",
        f"  decisions: {dec.users} users' last decisions vs simulate at their as_of: "
        f"{len(dec.mismatched)} mismatches, {len(dec.missing)} users without a decision",
        f"  every decision ({f.history.published:,}): {len(f.history.went_back)} went back "
        f"within a period, {f.history.beyond_final} beyond the recount",
        f"  alerts: {f.alerts} on budget.alerts, {f.duplicate_alerts} sent twice, "
        f"{_missing(f)} missing",
        f"  period boundary crossed during the run: {'yes' if f.boundary_crossed else 'no'}",
    ]
    lines += [f"    mismatch {m}" for m in dec.mismatched[:5]]
    lines += [f"    went back {m}" for m in f.history.went_back[:5]]
    lines += [f"    missing alert {a}" for a in (f.missing_alerts or [])[:5]]
    failures = f.failures()
    lines.append("verdict: PASS" if not failures else f"verdict: FAIL ({'; '.join(failures)})")
    return "\n".join(lines)


def _per_service(f: Figures, what: str) -> str:
    return ", ".join(f"{name} {getattr(s, what)}" for name, s in f.services.items())


def _exits(f: Figures) -> list[str]:
    """Exits nobody caused, per service and reason (a restart supervised them all)."""
    return [f"    {name} exited by itself {n}x: {reason}"
            for name, s in f.services.items()
            for reason, n in sorted(Counter(s.exits).items())]


def _clean(f: Figures) -> str:
    return ", ".join(f"{n} {'yes' if s.stopped_cleanly else 'NO'}" for n, s in f.services.items())


def _missing(f: Figures) -> str:
    return "n/a (a period ended)" if f.missing_alerts is None else str(len(f.missing_alerts))
