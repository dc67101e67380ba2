"""`tally status`: every user's current decision, read from budget.decisions."""

from __future__ import annotations

import argparse
import asyncio
from datetime import UTC, datetime

from tally.cli import command_main
from tally.core.periods import NOUNS, PERIODS
from tally.decision_cache import DecisionCache
from tally.instances import format_instances, read_instances
from tally.settings import Settings
from tally.topics import Topics
from tally.wire import BudgetDecided, PeriodName

__all__ = ["LEGEND", "format_table", "legend", "main", "one_line", "signature"]


def legend(kinds: list[PeriodName]) -> str:
    nouns = [NOUNS[kind] for kind in kinds]
    listed = " and ".join([", ".join(nouns[:-1]), nouns[-1]] if len(nouns) > 1 else nouns)
    return (f"tokens used/limit this {listed}; decided by: the period and budget (user, "
            "department:NAME, project:NAME) whose status sets the action")


LEGEND = legend(list(PERIODS)) + " (a period no user has a limit for is not shown)"


def kinds_shown(decisions: list[BudgetDecided]) -> list[PeriodName]:
    """The period kinds any user has a limit for, shortest first."""
    return [kind for kind in PERIODS if any(kind in d.periods for d in decisions)]


def header(kinds: list[PeriodName]) -> tuple[str, ...]:
    return ("user", "status", "action", *(f"{kind} used/limit" for kind in kinds),
            "decided by")


def row(d: BudgetDecided, kinds: list[PeriodName]) -> tuple[str, ...]:
    periods = d.periods
    figures = (f"{p.tokens_used:,}/{p.tokens_limit:,}" if (p := periods.get(kind)) else "-"
               for kind in kinds)
    return (d.user_id, d.status, d.action, *figures, f"{d.period} {d.budget}")


def resets(decisions: list[BudgetDecided]) -> list[str]:
    """When the periods end: one line when every user shares the schedule (they do, one
    reset_schedule), else one per distinct set."""
    found = sorted({tuple((kind, status.reset_time) for kind, status in d.periods.items())
                    for d in decisions})
    lines = []
    for times in found:
        (first, at), *others = times
        rest = "".join(f", the {NOUNS[kind]} at {later}" for kind, later in others)
        lines.append(f"the {NOUNS[first]} resets at {at}{rest}")
    return lines


def signature(decisions: list[BudgetDecided]) -> tuple[tuple[str, ...], ...]:
    """What the table shows, to notice a change worth printing again."""
    kinds = kinds_shown(decisions)
    return tuple(sorted(row(d, kinds) for d in decisions))


def one_line(text: str) -> str:
    """Templates may span lines (YAML block scalars); a table row may not."""
    return " ".join(text.split())


def format_table(decisions: list[BudgetDecided]) -> str:
    kinds = kinds_shown(decisions)
    rows = [header(kinds), *(row(d, kinds) for d in sorted(decisions, key=lambda d: d.user_id))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    messages = [f"  {d.user_id}: {one_line(d.message)}" for d in decisions if d.message]
    return "\n".join([f"({legend(kinds)})", *lines, *resets(decisions)]
                     + (["", "messages:", *messages] if messages else []))


async def read_decisions(bootstrap: str, topics: Topics) -> list[BudgetDecided]:
    cache = DecisionCache(bootstrap, topics)
    await cache.start()
    try:
        return cache.snapshot()
    finally:
        await cache.stop()


def run(args: argparse.Namespace) -> int:
    """`tally status`: the table, from budget.decisions; with --instances, the running
    instances from the instances topic."""
    settings = Settings.from_env()
    if args.instances:
        seen = asyncio.run(read_instances(settings.bootstrap_servers, settings.topics))
        print(format_instances(seen, datetime.now(UTC)))
        return 0
    decisions = asyncio.run(read_decisions(settings.bootstrap_servers, settings.topics))
    print(format_table(decisions) if decisions else "no decisions yet")
    return 0


main = command_main("status")
