"""Installed as users install it: the wheel, in a fresh venv, run from a folder that is not
the checkout. Nothing may depend on where the source tree is: the defaults come from the
working directory, the Kafka jars' pom.xml ships in the wheel (tally_dev)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.paths import project_root

ROOT = project_root()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def uv() -> str:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    assert Path(found).exists(), "uv is installed with the project (make install)"
    return found


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tally` command of the wheel built from this checkout, in a venv of its own."""
    base = tmp_path_factory.mktemp("wheel")
    subprocess.run([uv(), "build", "--wheel", "--out-dir", str(base / "dist"), str(ROOT)],
                   check=True, capture_output=True)
    (wheel,) = (base / "dist").glob("tally-*.whl")
    subprocess.run([uv(), "venv", "-q", str(base / "venv")], check=True, capture_output=True)
    subprocess.run([uv(), "pip", "install", "-q", "--python", str(base / "venv" / "bin" / "python"),
                    str(wheel)], check=True, capture_output=True)
    return base / "venv" / "bin" / "tally"


def run(tally: Path, cwd: Path, *args: str, timeout: float = 60,
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tally), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_config_check_and_simulate_from_another_folder(installed: Path, tmp_path: Path) -> None:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    events = ROOT / "tests" / "data" / "brief_example_events.jsonl"
    checked = run(installed, tmp_path, "config", "check", "config")
    assert (checked.returncode, checked.stdout) == (0, "ok\n"), checked.stderr
    simulated = run(installed, tmp_path, "simulate", "--config", "config", "--events", str(events),
                    "--at", "2026-05-20T15:00:00+00:00")
    assert simulated.returncode == 0, simulated.stderr
    users = {row["user_id"] for row in json.loads(simulated.stdout)["users"]}
    assert "user_alice" in users


@pytest.mark.kafka
def test_local_kafka_starts_and_stops_from_another_folder(installed: Path,
                                                          tmp_path: Path) -> None:
    port, controller = free_port(), free_port()
    started = run(installed, tmp_path, "kafka", "start", "--port", str(port),
                  "--controller-port", str(controller), timeout=300)
    try:
        assert started.returncode == 0, started.stderr
        assert started.stdout.strip() == f"127.0.0.1:{port}"
        # Its data, logs and jars are under the working directory, nowhere else.
        assert (tmp_path / ".local" / "kafka" / "kafka.pid").exists()
        assert any((tmp_path / ".local" / "kafka" / "libs").glob("kafka_2.13-*.jar"))
    finally:
        stopped = run(installed, tmp_path, "kafka", "stop", timeout=120)
    assert (stopped.returncode, stopped.stdout) == (0, "Kafka stopped\n"), stopped.stderr
