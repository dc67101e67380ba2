"""Benchmark 5: event -> decision latency while heavy audit queries run (issue 9, finding 4).

    .venv/bin/python -m bench.audit_load [--rate 100] [--seconds 30] [--audits 4]

The live-latency run (bench.live_latency: the three services as processes, events produced
to usage.raw at a steady rate, decisions followed in a DecisionCache) twice: without
audits, then with `--audits` clients each sending one CPU-heavy query after another to the
projector's POST /audit as the demo's admin (user_carol), the projector allowing that many
at once (--audit-threads). Before the audit pool, six such queries held every thread of
the projector's default executor and delayed the counting of an event by 22 s.
Prints the latency quantiles of both runs, their ratio, the audits' outcomes and the load
average; no assertion (see tests/projector/test_audit_sandbox.py for the rule).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
from collections import Counter
from collections.abc import AsyncIterator

import httpx

from bench.common import bench_broker, machine, print_table
from bench.live_latency import Load, one_run, quantile

__all__ = ["main"]

ADMIN_KEY = "ak_carol_example_0003"  # config/users.yaml: user_carol is an admin
# About 2*10^8 rows hashed and summed: seconds of CPU per query on a laptop.
HEAVY = "SELECT sum(hash(a.range + b.range) % 1000) FROM range(15000) a, range(15000) b"
END_TO_END = "in the cache (end to end)"


class Audits:
    """`count` clients, each running HEAVY again and again while the block runs."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.outcomes: Counter[str] = Counter()
        self.load: list[float] = []  # 1-minute load average, sampled each second

    @contextlib.asynccontextmanager
    async def running(self, projector_url: str) -> AsyncIterator[None]:
        async with httpx.AsyncClient(timeout=120) as client:
            tasks = [asyncio.create_task(self._client(client, projector_url))
                     for _ in range(self.count)]
            tasks.append(asyncio.create_task(self._sample_load()))
            try:
                yield None
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, client: httpx.AsyncClient, url: str) -> None:
        while True:
            response = await client.post(f"{url}/audit", json={"sql": HEAVY},
                                         headers={"X-API-Key": ADMIN_KEY})
            self.outcomes[str(response.status_code)] += 1
            if response.status_code != 200:
                await asyncio.sleep(0.5)

    async def _sample_load(self) -> None:
        while True:
            self.load.append(os.getloadavg()[0])
            await asyncio.sleep(1)


@contextlib.asynccontextmanager
async def sampling_load(samples: list[float]) -> AsyncIterator[None]:
    """The load average alone, for the run without audits."""
    audits = Audits(0)
    async with audits.running("unused"):
        yield None
    samples.extend(audits.load)


def run(bootstrap: str, args: argparse.Namespace, load: Load,
        ) -> tuple[list[float], int]:
    figures = asyncio.run(one_run(bootstrap, args.rate, args.seconds, args.users,
                                  after_commit=False, load=load,
                                  projector_args=["--audit-threads", str(args.audits)]))
    return figures[END_TO_END]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.audit_load")
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--audits", type=int, default=4)
    args = parser.parse_args()
    quiet_load: list[float] = []
    audits = Audits(args.audits)
    with bench_broker() as bootstrap:
        print(f"machine: {machine()}; {args.rate:,} events/s for {args.seconds:g} s, "
              f"{args.users:,} users; {args.audits} heavy audits at once in the second run")
        quiet = run(bootstrap, args, lambda _: sampling_load(quiet_load))
        loaded = run(bootstrap, args, audits.running)
    runs = (("no audits", quiet, quiet_load), (f"{args.audits} heavy audits", loaded,
                                               audits.load))
    print_table(("run", "events", "never", "p50 ms", "p95 ms", "p99 ms", "max ms",
                 "load avg (1 min, max)"),
                [(name, f"{len(found):,}", missing,
                  *(f"{quantile(found, q):,.1f}" for q in (0.5, 0.95, 0.99)),
                  f"{max(found):,.1f}", f"{max(load, default=0):.2f}")
                 for name, (found, missing), load in runs])
    for q in (0.5, 0.99):
        print(f"p{q * 100:g} ratio with/without audits: "
              f"{quantile(loaded[0], q) / quantile(quiet[0], q):.2f}")
    print(f"audit answers during the run: {dict(sorted(audits.outcomes.items()))} "
          "(200 ran to the end; 408 past the time limit; 429 all audit threads busy)")


if __name__ == "__main__":
    main()
