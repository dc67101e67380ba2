"""`tally status`: every user's current decision, read from budget.decisions."""

from __future__ import annotations

import argparse
import asyncio

from tally.cli import command_main
from tally.decision_cache import DecisionCache
from tally.settings import Settings
from tally.topics import Topics
from tally.wire import BudgetDecided

__all__ = ["LEGEND", "format_table", "main", "one_line", "signature"]

HEADER = ("user", "status", "action", "daily used/limit", "monthly used/limit", "decided by")
LEGEND = ("tokens used/limit this day and month; decided by: the period and budget (user, "
          "department:NAME, project:NAME) whose status sets the action")


def row(d: BudgetDecided) -> tuple[str, ...]:
    return (
        d.user_id,
        d.status,
        d.action,
        f"{d.daily.tokens_used:,}/{d.daily.tokens_limit:,}",
        f"{d.monthly.tokens_used:,}/{d.monthly.tokens_limit:,}",
        f"{d.period} {d.budget}",
    )


def resets(decisions: list[BudgetDecided]) -> list[str]:
    """When the periods end: one line when every user shares the schedule (they do, one
    reset_schedule), else one per distinct pair."""
    pairs = sorted({(d.daily.reset_time, d.monthly.reset_time) for d in decisions})
    return [f"the day resets at {daily}, the month at {monthly}" for daily, monthly in pairs]


def signature(decisions: list[BudgetDecided]) -> tuple[tuple[str, ...], ...]:
    """What the table shows, to notice a change worth printing again."""
    return tuple(sorted(row(d) for d in decisions))


def one_line(text: str) -> str:
    """Templates may span lines (YAML block scalars); a table row may not."""
    return " ".join(text.split())


def format_table(decisions: list[BudgetDecided]) -> str:
    rows = [HEADER, *(row(d) for d in sorted(decisions, key=lambda d: d.user_id))]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    messages = [f"  {d.user_id}: {one_line(d.message)}" for d in decisions if d.message]
    return "\n".join([f"({LEGEND})", *lines, *resets(decisions)]
                     + (["", "messages:", *messages] if messages else []))


async def read_decisions(bootstrap: str, topics: Topics) -> list[BudgetDecided]:
    cache = DecisionCache(bootstrap, topics)
    await cache.start()
    try:
        return cache.snapshot()
    finally:
        await cache.stop()


def run(args: argparse.Namespace) -> int:
    """`tally status`: the table, from budget.decisions."""
    settings = Settings.from_env()
    decisions = asyncio.run(read_decisions(settings.bootstrap_servers, settings.topics))
    print(format_table(decisions) if decisions else "no decisions yet")
    return 0


main = command_main("status")
