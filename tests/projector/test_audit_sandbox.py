"""Issue 9, findings 3 and 4: the projector's POST /audit was an unauthenticated file reader
that could starve the fold. One test per reproduction, against the real projector (real
broker, real DuckDB file, real HTTP), with short limits so a refusal comes quickly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from tally.services.projector import store
from tally.services.projector.app import run_projector
from tally.services.projector.sandbox import AuditLimits
from tally.topics import Topics
from tests.enforcer.kit import KEYS, bearer, config, free_port, token
from tests.enforcer.pipeline import ready, until
from tests.paths import project_root
from tests.projector.test_projector_kafka import run_tally
from tests.test_pipeline import produce

pytestmark = pytest.mark.kafka

USERS_YAML = project_root() / "config" / "users.yaml"
ADMIN = {"X-API-Key": KEYS["carol"]}  # carol is an admin in tests.enforcer.kit's team
VIEWER = {"X-API-Key": KEYS["bob"]}
# About 10^12 rows to join: hours of work, so only an interrupt ends it.
ENDLESS = "SELECT count(*) FROM range(1000000) a, range(1000000) b WHERE a.range + b.range = 7"
LIMITS = AuditLimits(timeout_seconds=600, concurrency=2)


def usage(event_id: str, user: str = "alice") -> bytes:
    return orjson.dumps({"event_id": event_id, "occurred_at": "2026-05-10T12:00:00Z",
                         "user_id": user, "model": "m/x", "input_tokens": 5,
                         "output_tokens": 0})


@dataclass
class Projector:
    url: str
    client: httpx.AsyncClient
    bootstrap: str
    topics: Topics
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def audit(self, sql: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.client.post(f"{self.url}/audit", json={"sql": sql},
                                      headers=ADMIN if headers is None else headers)

    async def answers(self) -> bool:
        return (await self.audit("SELECT count(*) FROM ledger")).status_code == 200

    async def counted(self, events: int) -> bool:
        line = f'tally_events_in_total{{source="{self.topics.usage_events}"}} {events:.1f}'
        return line in (await self.client.get(f"{self.url}/metrics")).text.splitlines()


@contextlib.asynccontextmanager
async def projector(bootstrap: str, name: str, db: Path,
                    limits: AuditLimits = LIMITS) -> AsyncIterator[Projector]:
    """A live projector serving /audit with `limits`, one event already counted."""
    topics, port, stop = Topics(f"audit-{name}"), free_port(), asyncio.Event()
    url = f"http://127.0.0.1:{port}"
    task = asyncio.create_task(run_projector(config(), bootstrap, topics, db, stop, port,
                                             audit_limits=limits))
    async with httpx.AsyncClient(timeout=30) as client:
        running = Projector(url, client, bootstrap, topics, stop, task)
        try:
            await until(lambda: ready(client, url))
            await produce(bootstrap, topics.usage_events, [usage("first")])
            await until(lambda: running.counted(1))
            yield running
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)


@pytest.fixture
async def live(kafka_bootstrap: str, unique_name: str,
               tmp_path: Path) -> AsyncIterator[Projector]:
    async with projector(kafka_bootstrap, unique_name, tmp_path / "p.duckdb") as running:
        yield running


def error(response: httpx.Response) -> str:
    message: str = response.json()["error"]
    return message


# who may ask -------------------------------------------------------------------------------


async def test_unauthenticated_read_text_of_users_yaml_is_401(live: Projector) -> None:
    response = await live.audit(f"SELECT content FROM read_text('{USERS_YAML}')", headers={})
    assert response.status_code == 401
    assert "missing credentials" in error(response) and "ak_" not in response.text
    assert response.headers["www-authenticate"] == "Bearer"


async def test_non_admin_key_is_403(live: Projector) -> None:
    response = await live.audit("SELECT count(*) FROM ledger", headers=VIEWER)
    assert response.status_code == 403
    assert error(response) == "admin role required: bob has role 'viewer'"


async def test_admin_api_key_and_admin_jwt_are_answered_a_viewer_jwt_is_not(
        live: Projector) -> None:
    for headers in (ADMIN, bearer(token("carol"))):
        response = await live.audit("SELECT count(*) AS n FROM ledger", headers=headers)
        assert response.status_code == 200 and response.json()["rows"] == [[1]]
    assert (await live.audit("SELECT 1", headers=bearer(token("bob")))).status_code == 403
    assert (await live.audit("SELECT 1", headers=bearer(token("carol", key="wrong-secret-"
                                                              "of-enough-length-0123")))
            ).status_code == 401


async def test_text_plain_body_is_415(live: Projector) -> None:
    response = await live.client.post(f"{live.url}/audit", content=b'{"sql": "SELECT 1"}',
                                      headers={**ADMIN, "Content-Type": "text/plain"})
    assert response.status_code == 415
    assert error(response) == "expected Content-Type application/json, not text/plain"


async def test_2mb_body_is_413(live: Projector) -> None:
    sql = "SELECT 1 -- " + "x" * 2_000_000
    response = await live.audit(sql)
    assert response.status_code == 413
    assert error(response) == "the body is over the audit's limit of 65,536 bytes"


async def test_a_foreign_host_is_400(live: Projector) -> None:
    response = await live.client.post(f"{live.url}/audit", json={"sql": "SELECT 1"},
                                      headers={**ADMIN, "Host": "evil.example:8082"})
    assert response.status_code == 400
    assert error(response).startswith("Host 'evil.example' is not this projector")


# what a query may do -----------------------------------------------------------------------


async def test_admin_read_text_of_users_yaml_is_400_naming_file_access(live: Projector) -> None:
    response = await live.audit(f"SELECT content FROM read_text('{USERS_YAML}')")
    assert response.status_code == 400
    assert error(response).startswith("file access is disabled in audit queries")
    assert "ak_" not in response.text


@pytest.mark.parametrize("sql", [
    "SELECT * FROM read_blob('/proc/self/environ')",
    "SELECT * FROM glob('/root/*')",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM 'https://example.com/x.parquet'",
])
async def test_read_blob_proc_self_environ_and_glob_root_are_400(
        live: Projector, sql: str) -> None:
    response = await live.audit(sql)
    assert response.status_code == 400
    assert error(response).startswith("file access is disabled in audit queries")


@pytest.mark.parametrize(("sql", "reason"), [
    ("INSTALL httpfs", "only SELECT queries run here"),
    ("LOAD httpfs", "only SELECT queries run here"),
    ("SET enable_external_access = true", "only SELECT queries run here"),
    ("SELECT * FROM duckdb_extensions()", "file access is disabled in audit queries"),
])
async def test_install_and_load_are_refused(live: Projector, sql: str, reason: str) -> None:
    response = await live.audit(sql)
    assert response.status_code == 400 and reason in error(response)


async def test_rows_are_capped(kafka_bootstrap: str, unique_name: str,
                               tmp_path: Path) -> None:
    limits = AuditLimits(max_rows=5)
    async with projector(kafka_bootstrap, unique_name, tmp_path / "p.duckdb", limits) as live:
        body = (await live.audit("SELECT * FROM range(100)")).json()
    assert body == {"columns": ["range"], "rows": [[n] for n in range(5)], "truncated": True,
                    "restoring": []}


# how long and on which threads -------------------------------------------------------------


async def test_a_long_query_is_interrupted_by_the_timeout(
        kafka_bootstrap: str, unique_name: str, tmp_path: Path) -> None:
    limits = AuditLimits(timeout_seconds=1)
    async with projector(kafka_bootstrap, unique_name, tmp_path / "p.duckdb", limits) as live:
        response = await live.audit(ENDLESS)
        assert response.status_code == 408
        assert error(response) == ("the query ran past the audit's limit of 1 s and was "
                                   "interrupted")
        # Interrupted, not left running: the next query has a thread and answers.
        assert (await live.audit("SELECT count(*) FROM ledger")).json()["rows"] == [[1]]


async def test_audits_beyond_the_pool_are_refused_with_429(live: Projector) -> None:
    async with endless_audits(live):
        response = await live.audit("SELECT 1")
    assert response.status_code == 429
    assert error(response) == "all 2 audit threads are busy: retry once a query has finished"


async def test_a_client_hang_up_interrupts_the_query(live: Projector) -> None:
    """Both audit threads run a query of hours; their clients give up. Were the queries
    still running, every audit would be refused (429) for hours."""
    async with httpx.AsyncClient(timeout=0.5) as impatient:
        gave_up = [impatient.post(f"{live.url}/audit", json={"sql": ENDLESS}, headers=ADMIN)
                   for _ in range(LIMITS.concurrency)]
        outcomes = await asyncio.gather(*gave_up, return_exceptions=True)
    assert all(isinstance(o, httpx.ReadTimeout) for o in outcomes)
    await until(live.answers, timeout=30)  # vs the 600 s the queries would otherwise get


async def test_the_fold_counts_a_new_event_while_heavy_audits_run(live: Projector) -> None:
    async with endless_audits(live) as audits:
        await produce(live.bootstrap, live.topics.usage_events, [usage("second", "bob")])
        await until(lambda: live.counted(2), timeout=300)  # the audits would run 600 s
        assert not any(a.done() for a in audits), "the audits should still be running"
    assert (await live.audit("SELECT user_id FROM ledger ORDER BY 1")).json()["rows"] == [
        ["alice"], ["bob"]]


async def test_sigterm_interrupts_running_queries_instead_of_waiting(live: Projector) -> None:
    async with endless_audits(live) as audits:
        live.stop.set()
        await asyncio.wait_for(live.task, 30)  # far less than the queries' 600 s
        responses = await asyncio.gather(*audits)
    assert {(r.status_code, error(r)) for r in responses} == {
        (503, "the projector is stopping: query interrupted")}


@contextlib.asynccontextmanager
async def endless_audits(live: Projector) -> AsyncIterator[list[asyncio.Task[httpx.Response]]]:
    """ENDLESS queries on every audit thread; their clients (which would wait for ever)
    hang up at the end, and the block ends once the threads are free again."""
    async with httpx.AsyncClient(timeout=None) as patient:
        def endless() -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(patient.post(f"{live.url}/audit", json={"sql": ENDLESS},
                                                    headers=ADMIN))

        audits = [endless() for _ in range(LIMITS.concurrency)]
        head_start = 0.5  # a probe (on a kept-alive connection) would otherwise come first

        async def pool_full() -> bool:
            refused = [i for i, audit in enumerate(audits) if audit.done()]
            for i in refused:  # a probe had the thread: sent again
                audits[i] = endless()
            await asyncio.sleep(head_start)
            return (await live.audit("SELECT 1")).status_code == 429

        await until(pool_full)
        try:
            yield audits
        finally:
            for audit in audits:
                audit.cancel()
            await asyncio.gather(*audits, return_exceptions=True)
    if not live.task.done():
        await until(live.answers)


# the command -------------------------------------------------------------------------------


async def test_tally_audit_on_a_file_runs_in_the_same_sandbox(tmp_path: Path) -> None:
    db = tmp_path / "p.duckdb"
    store.connect(db).close()
    nobody = f"http://127.0.0.1:{free_port()}"
    code, _, err = await run_tally("audit", f"SELECT content FROM read_text('{USERS_YAML}')",
                                   "--db", str(db), "--url", nobody)
    assert code == 1 and len(err.splitlines()) == 1
    assert err.startswith("tally audit: file access is disabled in audit queries")
    code, out, err = await run_tally("audit", "SELECT count(*) AS n FROM ledger", "--db",
                                     str(db), "--url", nobody)
    assert code == 0 and out.split() == ["n", "-", "0"], err
