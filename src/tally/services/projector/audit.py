"""Read-only SQL on the projector's DuckDB while the projector writes to it.

DuckDB lets one process open a file read-write, and then no other process may open it at
all. So the running projector answers queries itself (POST /audit {"sql": ...}) on a
separate cursor, which sees the last committed batch. When no projector answers,
`tally audit` opens the file read-only.

The audit reads everything everyone used, so it is behind the admin API's door
(`tally.access`: an admin's API key or JWT), takes JSON only, of a bounded size, from a
caller that names this host; the query runs sandboxed (`sandbox`: no files, no extensions,
a time and a memory limit, a cap on rows, threads of its own), in the projector and in a
file opened read-only alike.

With {"instances": true} in the body, the projector answering asks every projector
instance (fanout.py) and answers with all their rows, each led by its instance.

Errors: `AuditError` (`query`, `sandbox`, `fanout`); its `status` is the HTTP answer.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import duckdb
import httpx
import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tally.access import Access
from tally.auth import AuthError
from tally.cli import command_main
from tally.services.projector import store
from tally.services.projector.atrest import HELD_SQL, check_disjoint
from tally.services.projector.fanout import LOCAL_HOSTS, ask_instances
from tally.services.projector.query import (
    AuditError,
    Dropping,
    QueryResult,
    check_read_only,
    led_by,
    run_query,
    settled,
)
from tally.services.projector.sandbox import AuditLimits, Auditor, lock_down
from tally.settings import Settings
from tally.topics import Topics

__all__ = ["AuditError", "FanOut", "QueryResult", "audit_app", "check_read_only",
           "instances_asker", "main", "run_query"]

CREDENTIAL_HINT = "the audit needs an admin credential: set TALLY_API_KEY (or TALLY_TOKEN)"


def to_json(result: QueryResult) -> bytes:
    # Decimal (avg) and INTERVAL have no JSON type: they travel as text; so do integers
    # past 64 bits (a HUGEINT sum), which orjson refuses.
    body = {"columns": result.columns, "rows": result.rows, "truncated": result.truncated,
            "restoring": result.restoring}
    try:
        return orjson.dumps(body, default=str)
    except TypeError:
        body["rows"] = [tuple(_json_safe(v) for v in row) for row in result.rows]
        return orjson.dumps(body, default=str)


def _json_safe(value: Any) -> Any:
    if isinstance(value, int) and not -2**63 <= value < 2**64:
        return str(value)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


# the endpoint ------------------------------------------------------------------------------

# The query and the caller's credential headers -> every instance's answer (fanout.py).
FanOut = Callable[[str, dict[str, str]], Coroutine[Any, Any, QueryResult]]
# The only headers forwarded to the instances asked: the caller's credential, which each
# instance checks again as its own users.yaml says (no cookie, no Host, nothing else).
CREDENTIAL_HEADERS = ("X-API-Key", "Authorization")


def audit_app(auditor: Auditor, access: Access, more: Sequence[BaseRoute] = (),
              fan_out: FanOut | None = None,
              restoring: Callable[[], Sequence[int]] = tuple,
              dropping: Dropping | None = None) -> Starlette:
    """POST /audit {"sql": "..."} -> {"columns", "rows", "truncated"}; else {"error"} with
    400 (bad query, file asked for, wrong Host), 401/403 (no admin credential), 408 (past
    the time limit), 413 (body too big), 415 (not JSON), 429 (audit threads busy).
    {"sql": "...", "instances": true}: every instance's rows, led by an "instance" column,
    through `fan_out` (502 an instance not answering, 503 one restoring, 504 one too slow).
    `restoring`: the partitions restoring now, which an answer names ("restoring").
    `dropping`: waits (up to the query's time limit) for the deletion of partitions lost in
    a rebalance (ownership.py), which the file still holds; 503 if it has not ended.
    `more`: routes served beside it (the projector's /metrics, /healthz, /readyz)."""

    async def audit(request: Request) -> Response:
        try:
            _check_host(request)
            access.admin(request)  # before anything is asked of anyone
            sql, everywhere = await _query_of(request, auditor.limits.max_body_bytes)
            if everywhere:
                result = await _fanned_out(sql, request)
            else:
                await settled(dropping, auditor.limits.timeout_seconds)
                holding = tuple(restoring())  # as the query begins
                result = replace(await auditor.run(sql, request.is_disconnected),
                                 restoring=holding)
        except AuthError as e:
            return _error(e.reason, e.status, {"WWW-Authenticate": "Bearer"}
                          if e.status == 401 else None)
        except AuditError as e:
            return _error(str(e), e.status)
        return Response(to_json(result), media_type="application/json")

    async def _fanned_out(sql: str, request: Request) -> QueryResult:
        # Opt-in, not the default: each instance is asked for its own share with a plain
        # request (itself included), which must not fan out again; and one instance's own
        # file stays askable (a move under way, a file to compare).
        if fan_out is None:
            raise AuditError("this projector does not know its instances (no Kafka)", 501)
        check_read_only(sql)  # refused here once, not by each instance
        credential = {name: value for name in CREDENTIAL_HEADERS
                      if (value := request.headers.get(name)) is not None}
        return await fan_out(sql, credential)

    return Starlette(routes=[Route("/audit", audit, methods=["POST"]), *more])


def _check_host(request: Request) -> None:
    """A web page the browser reaches this port from (DNS rebinding) names its own host."""
    host = request.url.hostname
    if host not in LOCAL_HOSTS:
        raise AuditError(f"Host {host!r} is not this projector: the audit answers to "
                         f"{', '.join(sorted(LOCAL_HOSTS))} only")


async def _query_of(request: Request, limit: int) -> tuple[str, bool]:
    """The body's "sql" and "instances" (false if absent), from a JSON body of at most
    `limit` bytes."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise AuditError(f"expected Content-Type application/json, not {kind or 'none'}", 415)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise AuditError(f"the body is over the audit's limit of {limit:,} bytes", 413)
    try:
        fields = orjson.loads(body)
        sql, everywhere = fields["sql"], fields.get("instances", False)
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        sql = everywhere = None
    if not isinstance(sql, str) or not isinstance(everywhere, bool):
        raise AuditError('expected a JSON body {"sql": "...", "instances": false}')
    return sql, everywhere


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status, headers,
                    media_type="application/json")


# the command -------------------------------------------------------------------------------


async def ask_projector(url: str, sql: str, credential: dict[str, str],
                        timeout: float = 60.0) -> QueryResult | None:
    """The running projector's answer; None when nobody listens at `url`. No redirect is
    followed and no proxy used: the credential goes to `url` and nowhere else."""
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False) as client:
            response = await client.post(f"{url.rstrip('/')}/audit", json={"sql": sql},
                                         headers=credential)
    except httpx.TimeoutException as e:
        raise AuditError(f"the projector at {url} did not answer within {timeout:g} s",
                         504) from e
    except httpx.TransportError:
        return None
    try:
        body = orjson.loads(response.content)
        if response.status_code == 200:
            return QueryResult(body["columns"], [tuple(r) for r in body["rows"]],
                               body["truncated"], tuple(body.get("restoring", ())))
        text = str(body["error"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = f"{url}/audit: HTTP {response.status_code}"
    status = response.status_code if response.is_error else 502
    raise AuditError(text, status)


def instances_asker(bootstrap: str, topics: Topics, timeout: float) -> FanOut:
    """The projector's fan-out: every instance asked with the caller's credential, each
    given `timeout` seconds (its own audit's time limit, and a margin)."""
    async def fan_out(sql: str, credential: dict[str, str]) -> QueryResult:
        return await ask_instances(bootstrap, topics,
                                   lambda url: ask_projector(url, sql, credential, timeout))
    return fan_out


def credential_headers(api_key: str | None, token: str | None) -> dict[str, str]:
    """The headers that carry the caller's credential (none: the projector says 401)."""
    if api_key and token:
        raise AuditError("give an API key or a token, not both")
    if token:
        return {"Authorization": f"Bearer {token}"}
    return {"X-API-Key": api_key} if api_key else {}


def query_file(db: Path, sql: str, limits: AuditLimits) -> QueryResult:
    """Open the DuckDB file read-only (possible only while no projector holds it) and run
    the query in the same sandbox as the projector's."""
    if not db.exists():
        raise AuditError(f"no projector answered and {db} does not exist (run the demo, "
                         "or pass --db with a file `tally replay --db` built)")
    try:
        con = store.connect(db, read_only=True)
    except duckdb.Error as e:
        raise AuditError(f"{db} cannot be opened (while a projector runs, only it may open "
                         f"its file: leave --db out to ask it): {e}") from e
    with con:
        lock_down(con, limits)
        return asyncio.run(_run_alone(Auditor(con, limits), sql))


def query_files(dbs: Sequence[Path], sql: str, limits: AuditLimits) -> QueryResult:
    """One file's answer; or several files' (stopped projector instances'), each row led by
    a "db" column naming its file, once they are known to hold no partition twice
    (atrest.py: else AuditError naming the files and the partition)."""
    if len(dbs) == 1:
        return query_file(dbs[0], sql, limits)
    check_disjoint({str(db): query_file(db, HELD_SQL, limits).rows for db in dbs})
    return led_by("db", [(str(db), query_file(db, sql, limits)) for db in dbs])


async def _run_alone(auditor: Auditor, sql: str) -> QueryResult:
    async def never() -> bool:  # no client to hang up: Ctrl-C cancels, and so interrupts
        return False

    try:
        return await auditor.run(sql, never)
    finally:
        await auditor.stop()


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


def run(args: argparse.Namespace) -> int:
    """`tally audit` (options: tally.cli)."""
    default_db = store.default_db_path(Settings.from_env().data_dir)
    try:
        check_read_only(args.sql)  # refuse a write before asking anyone
        if args.db:
            result = query_files(args.db, args.sql, AuditLimits())
        elif args.instances:
            settings, credential = Settings.from_env(), credential_headers(args.api_key,
                                                                           args.token)
            result = asyncio.run(instances_asker(settings.bootstrap_servers, settings.topics,
                                                 60.0)(args.sql, credential))
        else:
            credential = credential_headers(args.api_key, args.token)
            result = (asyncio.run(ask_projector(args.url, args.sql, credential))
                      or query_file(default_db, args.sql, AuditLimits()))
    except AuditError as e:
        refused = e.status in (401, 403)  # said by a projector: the CLI's way to fix it
        print(f"tally audit: {f'{CREDENTIAL_HINT} ({e})' if refused else e}", file=sys.stderr)
        return 1
    print(render(result, args.format))
    return 0


main = command_main("audit")
