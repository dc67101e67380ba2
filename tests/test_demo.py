"""`tally run --once`, the README's main command, on the test broker in its own namespace."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_demo_shows_every_status_and_the_alerts(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
           "TALLY_TOPIC_NAMESPACE": f"demo-{unique_name}", "TALLY_DATA_DIR": str(tmp_path),
           "TALLY_INGEST_PORT": str(free_port()), "TALLY_PROJECTOR_PORT": str(free_port()),
           "TALLY_ENFORCER_PORT": str(free_port())}
    done = subprocess.run([sys.executable, "-m", "tally.cli", "run", "--once"], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in done.stdout.splitlines()
            if line.startswith(("user_", "openai-user:"))}
    assert rows["user_alice"] == ["warning", "warn"]
    assert rows["user_bob"] == ["over_limit", "hard_stop"]
    assert rows["user_carol"] == ["ok", "allow"]
    assert rows["openai-user:guest"] == ["ok", "allow"]
    assert "POST /v1/usage -> 202" in done.stderr
    assert "user_bob: limit 100% daily" in done.stdout
    logs = {p.name for p in (tmp_path / "logs").iterdir()}
    assert logs == {"ingest.log", "projector.log", "enforcer.log"}
