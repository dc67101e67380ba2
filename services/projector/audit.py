"""Read-only SQL on the projector's DuckDB while the projector writes to it.

DuckDB lets one process open a file read-write, and then no other process may open it at
all. So the running projector answers queries itself (POST /audit {"sql": ...}) on a
separate cursor, which sees the last committed batch. When no projector answers,
`tally audit` opens the file read-only.

Errors: `AuditError` (a write statement, several statements, bad SQL, no data).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import re
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from services.projector import store
from tally.settings import Settings

__all__ = ["AuditError", "QueryResult", "audit_app", "check_read_only", "main", "run_query"]

DESCRIPTION = """Run one read-only query (SELECT, or EXPLAIN of one) on the projector's data.
The running projector answers it (POST /audit); when none answers, the DuckDB file is
opened read-only. Tables: ledger, balances, rejected, offsets; views: users, this_month,
usage_by_day_model, usage_by_model, rejected_by_reason."""
MAX_ROWS = 10_000
_EXPLAIN = re.compile(r"^\s*explain\s+(analy[sz]e\s+)?", re.IGNORECASE)


class AuditError(Exception):
    """A query the audit refuses, or one DuckDB cannot run."""


@dataclass(frozen=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool = False


def check_read_only(sql: str) -> None:
    """Accept exactly one SELECT (or EXPLAIN of one): EXPLAIN ANALYZE would run a write."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise AuditError(f"bad SQL: {e}") from e
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
        raise AuditError(str(e).strip()) from e
    return QueryResult(columns, rows[:max_rows], len(rows) > max_rows)


def to_json(result: QueryResult) -> bytes:
    # Decimal (avg) and INTERVAL have no JSON type: they travel as text.
    return orjson.dumps({"columns": result.columns, "rows": result.rows,
                         "truncated": result.truncated}, default=str)


# the endpoint ------------------------------------------------------------------------------


def audit_app(con: duckdb.DuckDBPyConnection, more: Sequence[BaseRoute] = ()) -> Starlette:
    """POST /audit {"sql": "..."} -> {"columns", "rows", "truncated"}; 400 with {"error"}.
    `more`: routes served beside it (the projector's /metrics, /healthz, /readyz)."""

    async def audit(request: Request) -> Response:
        try:
            sql = orjson.loads(await request.body())["sql"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _error('expected a JSON body {"sql": "..."}')
        # The cursor is made on the loop thread, then used by one worker thread only.
        cursor = con.cursor()
        try:
            result = await asyncio.to_thread(run_query, cursor, str(sql))
        except AuditError as e:
            return _error(str(e))
        finally:
            cursor.close()
        return Response(to_json(result), media_type="application/json")

    return Starlette(routes=[Route("/audit", audit, methods=["POST"]), *more])


def _error(message: str) -> Response:
    return Response(orjson.dumps({"error": message}), 400, media_type="application/json")


# the command -------------------------------------------------------------------------------


def ask_projector(url: str, sql: str, timeout: float = 30.0) -> QueryResult | None:
    """The running projector's answer; None when nobody listens at `url`."""
    request = urllib.request.Request(f"{url.rstrip('/')}/audit", orjson.dumps({"sql": sql}),
                                     {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = orjson.loads(response.read())
    except urllib.error.HTTPError as e:
        raise AuditError(_error_text(e)) from e
    except (urllib.error.URLError, ConnectionError):
        return None
    return QueryResult(body["columns"], [tuple(r) for r in body["rows"]], body["truncated"])


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        return str(orjson.loads(e.read())["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"{e.url}: HTTP {e.code}"


def query_file(db: Path, sql: str) -> QueryResult:
    """Open the DuckDB file read-only: possible only while no projector holds it."""
    if not db.exists():
        raise AuditError(f"no projector answered and {db} does not exist (run the demo, "
                         "or pass --db with a file `tally replay --db` built)")
    try:
        con = store.connect(db, read_only=True)
    except duckdb.Error as e:
        raise AuditError(f"{db} cannot be opened (while a projector runs, only it may open "
                         f"its file: leave --db out to ask it): {e}") from e
    with con:
        return run_query(con, sql)


def render(result: QueryResult, fmt: str) -> str:
    if fmt == "json":
        rows = [dict(zip(result.columns, r, strict=True)) for r in result.rows]
        return orjson.dumps(rows, default=str, option=orjson.OPT_INDENT_2).decode()
    if fmt == "csv":
        out = io.StringIO()
        csv.writer(out, lineterminator="\n").writerows([result.columns, *result.rows])
        return out.getvalue().rstrip("\n")
    return _table(result)


def _table(result: QueryResult) -> str:
    cells = [result.columns, *([_cell(v) for v in r] for r in result.rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(result.columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    more = [f"(first {len(result.rows)} rows)"] if result.truncated else []
    return "\n".join(lines + more)


def _cell(value: Any) -> str:
    return "NULL" if value is None else str(value)


def main(argv: list[str]) -> int:
    settings = Settings.from_env()
    parser = argparse.ArgumentParser(prog="tally audit", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sql", help='one read-only query, e.g. "FROM usage_by_model"')
    default_db = store.default_db_path(settings.data_dir)
    parser.add_argument("--db", type=Path, default=None,
                        help="query this DuckDB file (e.g. one `tally replay --db` built) "
                             "instead of the projector; without it, the running projector "
                             f"answers, else its file is opened ({default_db})")
    parser.add_argument("--url", default=f"http://127.0.0.1:{settings.projector_port}",
                        help="the running projector to ask first (default: %(default)s)")
    parser.add_argument("--format", choices=("table", "json", "csv"), default="table",
                        help="how to print the rows (default: table)")
    args = parser.parse_args(argv)
    try:
        check_read_only(args.sql)  # refuse a write before asking anyone
        if args.db is not None:
            result = query_file(args.db, args.sql)
        else:
            result = ask_projector(args.url, args.sql) or query_file(default_db, args.sql)
    except AuditError as e:
        print(f"tally audit: {e}", file=sys.stderr)
        return 1
    print(render(result, args.format))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
