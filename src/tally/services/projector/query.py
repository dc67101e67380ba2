"""The audit's rule for a query: one read, run on a cursor of its own, at most so many rows.

Errors: `AuditError` (a write statement, several statements, bad SQL, a file or an
extension asked for, too much memory); its `status` is the HTTP answer (400 here).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import duckdb

from tally.errors import RequestRefused

__all__ = ["MAX_ROWS", "AuditError", "Dropping", "QueryResult", "check_read_only", "led_by",
           "run_query", "settled"]

MAX_ROWS = 10_000
_EXPLAIN = re.compile(r"^\s*explain\s+(analy[sz]e\s+)?", re.IGNORECASE)


class AuditError(RequestRefused):
    """A query the audit refuses, or one DuckDB cannot run; `status` is the HTTP answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


# Until the partitions lost in a rebalance are deleted from the file (ownership.py), at
# most so many seconds: what is still being deleted, or None.
Dropping = Callable[[float], Awaitable[str | None]]


async def settled(dropping: Dropping | None, timeout: float) -> None:
    """Nothing of a partition this instance lost is in an answer read from its file (the
    audit's, the history's): the deletion ends first, else AuditError 503."""
    if dropping is not None and (left := await dropping(timeout)) is not None:
        raise AuditError(f"this projector instance is still deleting {left}, lost in a "
                         "rebalance, from its file; ask again shortly", 503)


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool = False
    # The usage.events partitions the projector answering was restoring as the query began:
    # their rows are still incomplete (an audit over all instances refuses such an answer).
    restoring: tuple[int, ...] = ()


def led_by(column: str, answers: Iterable[tuple[str, QueryResult]]) -> QueryResult:
    """Several answers to one query, one after the other, each row led by a `column` naming
    where it came from (an instance, a file); at least one answer."""
    columns: list[str] | None = None
    rows: list[tuple[Any, ...]] = []
    truncated = False
    for source, answer in answers:
        columns = columns or [column, *answer.columns]
        rows += [(source, *row) for row in answer.rows]
        truncated = truncated or answer.truncated
    assert columns is not None, "no answer to lead"
    return QueryResult(columns, rows, truncated)


def check_read_only(sql: str) -> None:
    """Accept exactly one SELECT (or EXPLAIN of one): EXPLAIN ANALYZE would run a write."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise AuditError(f"bad SQL: {_first_line(e)}") from e
    if len(statements) != 1:
        raise AuditError(f"expected one statement, got {len(statements)}")
    kind = statements[0].type
    if kind == duckdb.StatementType.EXPLAIN:
        check_read_only(_EXPLAIN.sub("", statements[0].query, count=1))
    elif kind != duckdb.StatementType.SELECT:
        raise AuditError(f"read-only: only SELECT queries run here, not {kind.name}")


def run_query(cursor: duckdb.DuckDBPyConnection, sql: str,
              max_rows: int = MAX_ROWS) -> QueryResult:
    """Run a checked query on a cursor of its own (a cursor serves one thread at a time)."""
    check_read_only(sql)
    try:
        cursor.execute(sql)
        columns = [d[0] for d in cursor.description or []]
        rows = cursor.fetchmany(max_rows + 1)
    except duckdb.Error as e:
        raise AuditError(_explained(e)) from e
    return QueryResult(columns, rows[:max_rows], len(rows) > max_rows)


def _explained(error: duckdb.Error) -> str:
    """DuckDB's message, after what the sandbox (tally.services.projector.sandbox) refused."""
    message = _first_line(error)
    if isinstance(error, duckdb.PermissionException):
        return f"file access is disabled in audit queries (and so are extensions): {message}"
    if isinstance(error, duckdb.OutOfMemoryException):
        return f"the query needs more than the audit's memory limit: {message}"
    return message


def _first_line(error: duckdb.Error) -> str:
    """One line: what follows in DuckDB's message is the query again, with a caret."""
    return str(error).strip().splitlines()[0]
