"""What tests/test_sasl.py and tests/test_tls.py run through a secured listener, with the
client settings already in the environment (KAFKA_SECURITY_PROTOCOL and the rest), as
every service, the CLI, the decision cache and the OpenClaw plugin take them."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import subprocess
from collections.abc import Awaitable
from pathlib import Path

import pytest

from tally import topicadmin
from tally.config.loader import load_config
from tally.decision_cache import DecisionCache
from tally.kafka import ensure_topics, read_to_end
from tally.services.enforcer.app import run_enforcer
from tally.services.ingest.app import run_ingest
from tally.services.projector import store
from tally.services.projector.app import run_projector
from tally.services.projector.replay import replay
from tally.topics import Topics
from tests.paths import project_root
from tests.test_pipeline import BUDGETS, NOON, eventually, produce, raw, running, write_config


async def pipeline_round_trip(bootstrap: str, topics: Topics, tmp_path: Path,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A usage message through the three services to a decision in a DecisionCache,
    `tally topics check` on the same cluster, and a replay of it."""
    config_dir = tmp_path / "config"
    write_config(config_dir, BUDGETS)
    config = load_config(config_dir)
    cache = DecisionCache(bootstrap, topics)

    def ingest(stop: asyncio.Event) -> Awaitable[None]:
        return run_ingest(config, bootstrap, topics, None, stop)

    def projector(stop: asyncio.Event) -> Awaitable[None]:
        return run_projector(config, bootstrap, topics, tmp_path / "p.db", stop)

    def enforcer(stop: asyncio.Event) -> Awaitable[None]:
        return run_enforcer(config_dir, bootstrap, topics, stop, clock=lambda: NOON)

    async with running(ingest), running(projector), running(enforcer):
        await asyncio.sleep(1)  # topics exist once every service started
        await cache.start()
        await produce(bootstrap, topics.usage_raw, [raw("s1", "alice", 800)])
        await eventually(lambda: (d := cache.get("alice")) is not None
                         and d.daily.tokens_used == 800, "alice's decision")
    await cache.stop()
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
    monkeypatch.setenv("TALLY_TOPIC_NAMESPACE", topics.namespace)
    assert await asyncio.to_thread(topicadmin.main, ["check"]) == 0  # the CLI too
    # replay reads with librdkafka, signed in through the same settings
    await replay(config, bootstrap, topics, tmp_path / "replayed.db", out=io.StringIO())
    with store.connect(tmp_path / "replayed.db", read_only=True) as con:
        assert con.execute("SELECT user_id, tokens FROM ledger").fetchall() == [("alice", 800)]


def plugin_round_trip(bootstrap: str, topics: Topics) -> None:
    """The OpenClaw plugin's Kafka link sends a usage event and reads its budget book."""
    asyncio.run(ensure_topics(bootstrap, topics, 3))
    plugin = project_root() / "integrations" / "openclaw"
    subprocess.run(["bash", str(plugin / "setup.sh")], check=True, capture_output=True,
                   timeout=300)  # kafkajs, from the plugin's lockfile
    node = shutil.which("node")
    assert node is not None, "node is not installed: the OpenClaw plugin needs Node 20+"
    script = Path(__file__).parent / "openclaw" / "sasl_link.mjs"
    done = subprocess.run([node, str(script), bootstrap, topics.namespace], env=os.environ,
                          capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout) == {"sent": 1, "ready": True}, done.stderr[-2000:]
    sent = asyncio.run(read_to_end(bootstrap, topics.usage_raw))
    assert [json.loads(r.value or b"")["event_id"] for r in sent] == ["js-1"]
