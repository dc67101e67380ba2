"""Projector instances in a group: one against two on the same topic, and a takeover.

    python -m bench.instances [--events 200000]

usage.events of six partitions holds `--events` events (produced once, bench/common.py).
Each run starts `tally projector` processes with fresh DuckDB files and times them until
their offsets together cover every event: wall time from the processes' start (their
start-up included) and CPU seconds per event (user + system of all of them, start-up
included). Then, with two instances done, one is SIGKILLed: the takeover is the time from
the kill to the survivor owning all six partitions with none restoring (the session
timeout, 6 s here, then the replay of the lost partitions into the survivor's file).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import BENCH_DATA, ROOT, bench_broker, ensure_usage, machine, print_table
from tally.topics import Topics

PARTITIONS = 6
SESSION_S = 6
BUDGETS = """
per_user_budgets:
  default_limits: {daily_tokens: 100000000, monthly_tokens: 1000000000}
  reset_schedule: {daily_reset_time: "00:00", monthly_reset_day: 1, timezone: UTC}
"""
USERS = """
user_identification:
  users:
    - {id: auditor, api_key: ak_bench_auditor_0123456789, role: admin}
"""
ADMIN = {"X-API-Key": "ak_bench_auditor_0123456789"}


def config_dir() -> Path:
    directory = BENCH_DATA / "instances-config"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "budgets.yaml").write_text(BUDGETS)
    (directory / "users.yaml").write_text(USERS)
    return directory


async def start(bootstrap: str, topics: Topics, n: int, port: int) -> asyncio.subprocess.Process:
    db = BENCH_DATA / f"instances-{n}.duckdb"
    db.unlink(missing_ok=True)
    Path(f"{db}.wal").unlink(missing_ok=True)
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tally.cli", "projector", "--config", str(config_dir()),
        "--db", str(db), "--port", str(port), "--session-timeout", str(SESSION_S), cwd=ROOT,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
             "TALLY_TOPIC_NAMESPACE": topics.namespace, "TALLY_PARTITIONS": str(PARTITIONS)})


async def ask(client: httpx.AsyncClient, port: int) -> tuple[int, dict[str, Any]]:
    sql = "SELECT coalesce(sum(next_offset), 0) FROM offsets WHERE topic LIKE '%usage.events'"
    folded = (await client.post(f"http://127.0.0.1:{port}/audit", json={"sql": sql},
                                headers=ADMIN)).json()["rows"][0][0]
    return int(folded), (await client.get(f"http://127.0.0.1:{port}/readyz")).json()


async def until_done(ports: list[int], total: int) -> None:
    """Until the instances own all partitions between them, none restoring, and have
    folded `total` events."""
    async with httpx.AsyncClient(timeout=30) as client:
        while True:
            try:
                answers = [await ask(client, port) for port in ports]
            except (httpx.TransportError, KeyError):
                answers = []
            owned = sorted(p for _, r in answers for p in r.get("partitions", []))
            if (answers and owned == list(range(PARTITIONS))
                    and not any(r["restoring"] for _, r in answers)
                    and sum(f for f, _ in answers) == total):
                return
            await asyncio.sleep(0.2)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run(bootstrap: str, topics: Topics, events: int, count: int,
              ) -> tuple[list[Any], float | None]:
    ports = [28400 + n for n in range(count)]
    began = time.monotonic()
    processes = [await start(bootstrap, topics, n, port) for n, port in enumerate(ports)]
    try:
        await until_done(ports, events)
        wall = time.monotonic() - began
        cpu = sum(cpu_seconds(p.pid) for p in processes)
        row = [count, f"{wall:.1f}", f"{events / wall:,.0f}", f"{cpu:.1f}",
               f"{cpu / events * 1e6:.0f}"]
        takeover = None
        if count > 1:
            killed_at = time.monotonic()
            processes[0].send_signal(signal.SIGKILL)
            await processes[0].wait()
            await until_done(ports[1:], events)
            takeover = time.monotonic() - killed_at
        return row, takeover
    finally:
        for process in processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
                await process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    print(machine())
    with bench_broker() as bootstrap:
        topics = Topics(f"bench-instances-{args.events}")
        asyncio.run(ensure_usage(bootstrap, topics, args.events, PARTITIONS))
        rows, takeovers = [], []
        for count in (1, 2):
            row, takeover = asyncio.run(run(bootstrap, topics, args.events, count))
            rows.append(row)
            if takeover is not None:
                takeovers.append(takeover)
        print_table(["instances", "wall s (start-up included)", "events/s", "CPU s",
                     "CPU us/event"], rows)
        for takeover in takeovers:
            print(f"takeover after SIGKILL (session timeout {SESSION_S} s + replay of "
                  f"half the partitions, {args.events // 2:,} events): {takeover:.1f} s")
        print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
