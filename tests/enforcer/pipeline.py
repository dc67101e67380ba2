"""The three services in this event loop on a real broker, with both HTTP surfaces on free
ports: for the tests that go through the whole pipeline to the API and the dashboard."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from tally.config.loader import load_config
from tally.ops import Metrics
from tally.services.enforcer.app import run_enforcer
from tally.services.ingest.app import run_ingest
from tally.services.projector.app import run_projector
from tally.topics import Topics
from tests.test_pipeline import running

from .kit import BUDGETS, USERS, free_port


def write_config(directory: Path, budgets: dict[str, Any] = BUDGETS) -> Path:
    """The kit's team and `budgets` as config files in a new `directory`."""
    directory.mkdir()
    (directory / "users.yaml").write_text(yaml.safe_dump(
        {"user_identification": {"users": USERS}}))
    (directory / "budgets.yaml").write_text(yaml.safe_dump(budgets))
    return directory


@contextlib.asynccontextmanager
async def pipeline(bootstrap: str, topics: Topics, config_dir: Path, db: Path, now: datetime,
                   metrics: Metrics | None = None) -> AsyncIterator[tuple[str, str]]:
    """Ingest (with HTTP), projector (with HTTP: the history), and the enforcer (with the
    API, its clock stopped at `now`, its metrics into `metrics`); yields the ingest's and
    the enforcer's base URLs."""
    config = load_config(config_dir)
    ingest_port, projector_port, enforcer_port = free_port(), free_port(), free_port()

    def ingest(stop: asyncio.Event) -> Awaitable[None]:
        return run_ingest(config, bootstrap, topics, ingest_port, stop)

    def projector(stop: asyncio.Event) -> Awaitable[None]:
        return run_projector(config, bootstrap, topics, db, stop, port=projector_port,
                             config_dir=config_dir)

    def enforcer(stop: asyncio.Event) -> Awaitable[None]:
        return run_enforcer(config_dir, bootstrap, topics, stop, clock=lambda: now,
                            tick_seconds=0.2, port=enforcer_port, metrics=metrics,
                            projector_url=f"http://127.0.0.1:{projector_port}")

    async with running(ingest), running(projector), running(enforcer):
        url = f"http://127.0.0.1:{enforcer_port}"
        # The enforcer's API answers once it has read the topics and joined its group (its
        # first transactional producer, on a fresh broker, can take seconds).
        async with httpx.AsyncClient(timeout=10) as client:
            await until(lambda: ready(client, url))
        yield f"http://127.0.0.1:{ingest_port}", url


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 60) -> None:
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.1)


async def ready(client: httpx.AsyncClient, base_url: str) -> bool:
    try:
        return (await client.get(f"{base_url}/readyz")).status_code == 200
    except httpx.TransportError:  # not listening yet
        return False

