"""Where an audit query runs: a locked-down DuckDB and a small thread pool of its own.

DuckDB settings belong to the database instance, and the audit's cursors come from the
instance the projector writes with, so `lock_down` holds for the fold too. The fold needs
none of what it takes away: it registers its Arrow batches by name (replacement scans of
Python variables are what external access covers), reads no file but its database, loads
no extension, and sets nothing after startup. A query bigger than the memory limit spills
to the database's own temp directory (capped too) before it fails, so the fold's small
batches still find memory while an audit runs.

Audits run on `AuditLimits.concurrency` threads of their own (asyncio.to_thread's default
pool is shared with the fold: six heavy audits once held every thread of it and delayed the
counting of an event by 22 s), and DuckDB gets no worker threads of its own: each query
runs on the thread that asked, so audits take at most `concurrency` cores and the fold's
batches run on the fold's thread. (A lower CPU priority for the audit threads was tried:
at nice 19 a short query starved for a minute behind the process's other threads.)
A query past its time, or whose client hung up, or running when the projector stops, is
interrupted, not waited for.

Errors (all `AuditError`, whose `status` is the HTTP answer): a refused or failing query
(400), a query past its time (408), all audit threads busy (429), the projector stopping
(503).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import duckdb

from tally.services.projector.limits import AuditLimits, add_limit_options
from tally.services.projector.query import AuditError, QueryResult, check_read_only, run_query

__all__ = ["AuditLimits", "Auditor", "add_limit_options", "lock_down"]

POLL_SECONDS = 0.1  # how often a running query looks for its client having hung up


def lock_down(con: duckdb.DuckDBPyConnection, limits: AuditLimits) -> None:
    """No file but the database, no extension, the limits, then no more changes to any of
    it (by anyone in this process: the configuration is the instance's)."""
    for setting in (
        "SET autoinstall_known_extensions = false",
        "SET autoload_known_extensions = false",
        "SET allow_community_extensions = false",
        f"SET memory_limit = '{limits.memory_limit}'",
        f"SET max_temp_directory_size = '{limits.spill_limit}'",
        # No DuckDB worker threads: a query runs on the thread that asked (see the docstring).
        "SET threads = 1",
        "SET enable_external_access = false",
        "SET lock_configuration = true",
    ):
        con.execute(setting)


class Auditor:
    """Runs audit queries on cursors of `con`, on threads of its own."""

    def __init__(self, con: duckdb.DuckDBPyConnection, limits: AuditLimits) -> None:
        self.con, self.limits = con, limits
        self._pool = ThreadPoolExecutor(limits.concurrency, thread_name_prefix="audit")
        self._running: dict[duckdb.DuckDBPyConnection, asyncio.Future[QueryResult]] = {}
        self._stopping = False
        self._orphans: set[asyncio.Future[None]] = set()  # interrupts nobody awaits

    @property
    def busy(self) -> int:
        """Queries whose thread still runs (an interrupted one until it has returned)."""
        return len(self._running)

    async def run(self, sql: str, hung_up: Callable[[], Awaitable[bool]]) -> QueryResult:
        """The query's result; `hung_up` says whether its client is gone."""
        self._admit()
        check_read_only(sql)
        cursor = self.con.cursor()  # made on the loop thread, used by one audit thread
        job = asyncio.get_running_loop().run_in_executor(
            self._pool, run_query, cursor, sql, self.limits.max_rows)
        self._running[cursor] = job
        job.add_done_callback(lambda _: self._release(cursor))
        try:
            return await self._watch(job, cursor, hung_up)
        finally:
            if not job.done():  # cancelled (the server stopping): stop the thread too
                orphan = asyncio.ensure_future(self._interrupt(cursor, job))
                self._orphans.add(orphan)
                orphan.add_done_callback(self._orphans.discard)

    async def stop(self) -> None:
        """Refuse new queries, interrupt the running ones and wait for their threads."""
        self._stopping = True
        await asyncio.gather(*(self._interrupt(c, job) for c, job in list(self._running.items())))
        self._pool.shutdown(wait=False)

    def _admit(self) -> None:
        if self._stopping:
            raise AuditError("the projector is stopping: no more audit queries", 503)
        if self.busy >= self.limits.concurrency:
            raise AuditError(f"all {self.limits.concurrency} audit threads are busy: retry "
                             "once a query has finished", 429)

    async def _watch(self, job: asyncio.Future[QueryResult], cursor: duckdb.DuckDBPyConnection,
                     hung_up: Callable[[], Awaitable[bool]]) -> QueryResult:
        deadline = asyncio.get_running_loop().time() + self.limits.timeout_seconds
        while not job.done():
            left = deadline - asyncio.get_running_loop().time()
            await asyncio.wait({job}, timeout=max(0.0, min(POLL_SECONDS, left)))
            if job.done():
                break
            if await hung_up():
                await self._interrupt(cursor, job)
                raise AuditError("the client hung up: query interrupted", 499)
            if left <= 0:
                await self._interrupt(cursor, job)
                raise AuditError(f"the query ran past the audit's limit of "
                                 f"{self.limits.timeout_seconds:g} s and was interrupted", 408)
        if self._stopping and job.exception() is not None:
            raise AuditError("the projector is stopping: query interrupted", 503)
        return job.result()

    async def _interrupt(self, cursor: duckdb.DuckDBPyConnection, job: asyncio.Future[Any],
                         ) -> None:
        """Until its thread returns: an interrupt sent before the query began is lost."""
        while not job.done():
            cursor.interrupt()
            await asyncio.wait({job}, timeout=0.05)
        job.exception()  # DuckDB's "Interrupted!": the caller says why instead

    def _release(self, cursor: duckdb.DuckDBPyConnection) -> None:
        self._running.pop(cursor, None)
        cursor.close()

