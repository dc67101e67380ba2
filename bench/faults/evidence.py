"""What a finished fault run left behind, read back: the topics and the projector's DuckDB
(or the files of several projector instances, taken together).

Read only after every service has stopped: DuckDB is opened read-only, as `tally audit`
does when no projector runs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tally.kafka import Record, read_to_end
from tally.services.projector import store
from tally.topics import Topics
from tally.wire import BudgetAlerted, BudgetDecided, RejectedEvent

__all__ = ["Evidence", "gather", "latest_by_user"]

BalanceRow = tuple[str, str, datetime]


@dataclass(frozen=True)
class Evidence:
    raw: list[Record]
    dlq: list[RejectedEvent]
    decisions: list[BudgetDecided]  # in publishing order per user
    alerts: list[BudgetAlerted]
    ledger_ids: list[str]
    balances: dict[BalanceRow, int]
    rejected_sources: list[str]


def in_order(records: Iterable[Record]) -> list[Record]:
    return sorted(records, key=lambda r: (r.partition, r.offset))


async def gather(bootstrap: str, topics: Topics, *dbs: Path) -> Evidence:
    """The topics, and the union of the projector files `dbs`: an event in two files shows
    as a ledger id twice, a balance row in two as their sum (both then fail the checks)."""
    raw = await read_to_end(bootstrap, topics.usage_raw)
    dlq = [RejectedEvent.model_validate_json(r.value or b"")
           for r in await read_to_end(bootstrap, topics.usage_dlq)]
    decisions = [BudgetDecided.model_validate_json(r.value or b"")
                 for r in in_order(await read_to_end(bootstrap, topics.budget_decisions))]
    alerts = [BudgetAlerted.model_validate_json(r.value or b"")
              for r in await read_to_end(bootstrap, topics.budget_alerts)]
    ids: list[str] = []
    balances: Counter[BalanceRow] = Counter()
    rejected: list[str] = []
    for db in dbs:
        its_ids, its_balances, its_rejected = read_store(db)
        ids += its_ids
        balances.update(its_balances)
        rejected += its_rejected
    return Evidence(raw, dlq, decisions, alerts, ids, dict(balances), rejected)


def read_store(db: Path) -> tuple[list[str], dict[BalanceRow, int], list[str]]:
    with store.connect(db, read_only=True) as con:
        ids = [row[0] for row in con.execute("SELECT event_id FROM ledger").fetchall()]
        rows = con.execute("SELECT user_id, period, period_start, tokens FROM balances")
        balances = {(u, p, s): t for u, p, s, t in rows.fetchall()}
        sources = [row[0] for row in con.execute("SELECT source FROM rejected").fetchall()]
    return ids, balances, sources


def latest_by_user(decisions: Iterable[BudgetDecided]) -> dict[str, BudgetDecided]:
    """What a gateway's cache ends with: the last decision per user."""
    return {d.user_id: d for d in decisions}
