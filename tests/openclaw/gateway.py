"""The real OpenClaw gateway for the end-to-end tests: installed, configured, started.

`install()` runs integrations/openclaw/setup.sh, which installs openclaw and Node 24 from
npm into .local/openclaw-gateway (once per lockfile) and the plugin's kafkajs. The gateway
runs inside a LoopbackNamespace with a temporary config, state and home, loading the
plugin from integrations/openclaw.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.paths import project_root

from .netns import LoopbackNamespace

__all__ = ["GatewayPaths", "gateway_config", "install", "start_gateway", "wait_ready"]

PLUGIN_DIR = project_root() / "integrations" / "openclaw"
TOKEN = "tally-e2e-token"
PORT = 18789
ENV = {
    "OPENCLAW_DISABLE_BONJOUR": "1",
    "OPENCLAW_NO_AUTO_UPDATE": "1",
    "OPENCLAW_NO_RESPAWN": "1",
    "OPENCLAW_SKIP_CHANNELS": "1",
    "DO_NOT_TRACK": "1",
}


@dataclass(frozen=True)
class GatewayPaths:
    node: Path
    openclaw: Path


def install() -> GatewayPaths:
    """Install (or find installed) the gateway and the plugin's dependencies."""
    done = subprocess.run(["bash", str(PLUGIN_DIR / "setup.sh"), "--gateway"],
                          capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"integrations/openclaw/setup.sh failed:\n{done.stderr[-3000:]}")
    found = dict(line.split("=", 1) for line in done.stdout.split() if "=" in line)
    return GatewayPaths(Path(found["NODE"]), Path(found["OPENCLAW"]))


def model(model_id: str, cost: float) -> dict[str, Any]:
    return {"id": model_id, "name": model_id, "reasoning": False, "input": ["text"],
            "cost": {"input": cost, "output": cost, "cacheRead": 0, "cacheWrite": 0},
            "contextWindow": 100_000, "maxTokens": 4096,
            "compat": {"supportsUsageInStreaming": True}}


def gateway_config(home: Path, upstream_port: int, plugin: dict[str, Any],
                   agents: tuple[str, ...] = ("main",)) -> dict[str, Any]:
    """openclaw.json: loopback only, the fake provider, the Tally plugin."""
    return {
        "gateway": {"mode": "local", "bind": "loopback", "port": PORT,
                    "auth": {"mode": "token", "token": TOKEN},
                    "http": {"endpoints": {"chatCompletions": {"enabled": True}}}},
        "discovery": {"mdns": {"mode": "off"}},
        "update": {"checkOnStart": False},
        "telemetry": {"enabled": False},
        "logging": {"file": str(home / "gateway.log")},
        "models": {"catalogRefresh": {"enabled": False}, "mode": "merge", "providers": {
            "fake": {"baseUrl": f"http://127.0.0.1:{upstream_port}/v1", "apiKey": "sk-fake",
                     "api": "openai-completions",
                     "models": [model("big-model", 10.0), model("cheap-model", 0.1)]}}},
        "agents": {"defaults": {"model": {"primary": "fake/big-model"}},
                   "entries": {agent: {} for agent in agents}},
        "plugins": {"load": {"paths": [str(PLUGIN_DIR)]},
                    "entries": {"tally": {"enabled": True,
                                          "hooks": {"allowConversationAccess": True},
                                          "config": plugin}}},
    }


def start_gateway(ns: LoopbackNamespace, paths: GatewayPaths, home: Path,
                  config: dict[str, Any], *, channels: bool = False) -> subprocess.Popen[bytes]:
    """`channels`: start the channels `config` configures (skipped otherwise)."""
    (home / "state").mkdir(parents=True, exist_ok=True)
    (home / "openclaw.json").write_text(json.dumps(config, indent=2))
    skipped = {"OPENCLAW_SKIP_CHANNELS"} if channels else set()
    env = {**os.environ, **{k: v for k, v in ENV.items() if k not in skipped}, "HOME": str(home),
           "OPENCLAW_CONFIG_PATH": str(home / "openclaw.json"),
           "OPENCLAW_STATE_DIR": str(home / "state")}
    out = (home / "gateway.out").open("wb")
    return ns.popen([str(paths.node), str(paths.openclaw), "gateway", "run"], env=env,
                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def wait_ready(client: httpx.AsyncClient, process: subprocess.Popen[bytes],
                     timeout: float = 120) -> float:
    """Seconds until GET /v1/models answers 200."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the gateway exited with {process.returncode}")
        try:
            if (await client.get("/v1/models", timeout=2)).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.25)
    raise TimeoutError("the gateway did not answer in time")

