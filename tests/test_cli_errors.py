"""Every `tally` command in the conditions a new user meets: Kafka not running, a missing
config directory, a reader that closes the pipe early (`| head -1`), and `--help`. Each
ends with a line that says what is wrong (or, for the pipe, quietly), never a traceback."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from tally.cli import SUBCOMMANDS

TALLY = [sys.executable, "-m", "tally.cli"]
KAFKA_DOWN = "Kafka is not running at"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def tally(*args: str, env: dict[str, str] | None = None,
          timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TALLY, *args], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def options_without_help(text: str) -> list[str]:
    """Options and arguments in argparse help that have no help text of their own."""
    lines = text.splitlines()
    bare = []
    in_list = False
    for i, line in enumerate(lines):
        if line.endswith(":") and not line.startswith(" "):
            in_list = line in ("options:", "positional arguments:")
            continue
        if not in_list or not line.startswith("  ") or line.startswith("    "):
            continue
        entry = line.strip()
        has_inline = re.search(r"\S {2,}\S", entry) is not None
        following = lines[i + 1] if i + 1 < len(lines) else ""
        has_next = following.startswith(" " * 8) and following.strip() != ""
        if not (has_inline or has_next):
            bare.append(entry)
    return bare


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_help_exits_0_and_explains_every_option(command: str) -> None:
    done = tally(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: tally"), done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    assert options_without_help(done.stdout) == []


def test_the_top_level_help_lists_every_command() -> None:
    done = tally("--help")
    assert done.returncode == 0
    assert all(f"  {name} " in done.stdout for name in SUBCOMMANDS)


@pytest.mark.parametrize("args", [
    ["status"], ["replay", "--db", "{tmp}/r.duckdb"], ["run", "--once"], ["ingest"],
    ["projector", "--db", "{tmp}/p.duckdb"], ["enforcer"],
])
def test_a_command_that_needs_kafka_says_it_is_not_running(args: list[str],
                                                           tmp_path: Path) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = tally(*(a.format(tmp=tmp_path) for a in args),
                 env={"KAFKA_BOOTSTRAP_SERVERS": bootstrap, "TALLY_DATA_DIR": str(tmp_path)})
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"tally {args[0]}: {KAFKA_DOWN} {bootstrap}: check KAFKA_BOOTSTRAP_SERVERS"]


def test_the_default_broker_down_names_the_command_that_starts_it() -> None:
    from tally.clierrors import kafka_down
    assert str(kafka_down("127.0.0.1:9092")).startswith(
        "Kafka is not running at 127.0.0.1:9092: start it with `.venv/bin/tally kafka start`")


def test_audit_with_no_projector_and_no_file_says_so(tmp_path: Path) -> None:
    done = tally("audit", "FROM usage_by_model", "--db", str(tmp_path / "none.duckdb"),
                 "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1
    assert done.stderr.startswith("tally audit: no projector answered and ")
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [
    ["run", "--once"], ["config", "check", "/missing-config"],
    ["simulate", "--config", "/missing-config", "--events", "/dev/null"],
])
def test_a_missing_config_dir_is_named(args: list[str], tmp_path: Path) -> None:
    done = tally(*args, env={"TALLY_CONFIG_DIR": "/missing-config",
                             "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    assert done.returncode == 1
    assert "/missing-config: not a directory" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.kafka
@pytest.mark.parametrize("service", ["ingest", "projector", "enforcer", "replay"])
def test_a_service_with_a_missing_config_dir_refuses_in_words(
        service: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    done = tally(service, "--config", "/missing-config",
                 env={"KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
                      "TALLY_DATA_DIR": str(tmp_path)})
    assert done.returncode != 0
    assert "/missing-config: not a directory" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_reader_that_stops_early_is_no_error(tmp_path: Path) -> None:
    """`tally audit ... | head -1` on more rows than a pipe holds: a broken pipe."""
    db = tmp_path / "p.duckdb"
    duckdb.connect(str(db)).close()
    process = subprocess.Popen(
        [*TALLY, "audit", "SELECT range AS n FROM range(200000)", "--db", str(db),
         "--url", f"http://127.0.0.1:{free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    assert process.stdout.readline().strip() == "n"
    process.stdout.close()  # what `head -1` does after its line
    errors = process.stderr.read()
    assert process.wait(timeout=60) == 0
    assert errors == ""
