"""The plugin's own unit tests (node:test), run by the machine's Node inside `make test`.

They cover the pure modules (identity, usage events, the budget view, the hook handlers)
and need nothing installed: the Kafka client is not imported by them.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.paths import project_root

PLUGIN_DIR = project_root() / "integrations" / "openclaw"


def test_plugin_unit_tests_pass() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the OpenClaw plugin's unit tests need Node 20+")
    done = subprocess.run([node, "--test", "test/"], cwd=PLUGIN_DIR, capture_output=True,
                          text=True, timeout=120)
    summary = [line for line in done.stdout.splitlines() if line.startswith("# ")]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "# fail 0" in summary, summary
