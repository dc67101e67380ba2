"""`python -m bench.faults`: one fault run against a dedicated local broker; prints the
figures and a verdict (exit 0 on PASS, 1 on FAIL)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

from bench.faults import Broker, Plan, render, run_faults
from bench.faults.run import delete_topics
from tally.topics import Topics
from tests.paths import project_root


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__)
    parser.add_argument("--events", type=int, default=200_000, help="distinct messages")
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs over the 3 services")
    parser.add_argument("--rate", type=float, default=2_000.0, help="messages per second")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--span-minutes", type=float, default=360,
                        help="events' occurred_at spread over the last N minutes of today "
                             "(2: all inside the projector's recent ids, judged in memory)")
    parser.add_argument("--port", type=int, default=18092, help="the dedicated broker's port")
    parser.add_argument("--controller-port", type=int, default=18093)
    parser.add_argument("--data-dir", type=Path,
                        default=project_root() / ".local" / "kafka-faults")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work dir, the topics and the broker running "
                             "(a failed run keeps the first two anyway)")
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace, work_dir: Path) -> bool:
    broker = Broker(args.port, args.controller_port, args.data_dir)
    await asyncio.to_thread(broker.start)
    try:
        plan = Plan(events=args.events, kills=args.kills, rate=args.rate, seed=args.seed,
                    span=timedelta(minutes=args.span_minutes))
        figures = await run_faults(plan, broker, work_dir)
        print(render(figures), flush=True)
        passed = not figures.failures()
        if passed and not args.keep:  # a failed run's topics stay for a look
            await delete_topics(broker.bootstrap, Topics(figures.namespace))
        return passed
    finally:
        if not args.keep:
            await asyncio.to_thread(broker.stop)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # reconnect chatter while down
    work_dir = Path(tempfile.mkdtemp(prefix="tally-faults-"))
    print(f"work dir (config, service logs, DuckDB): {work_dir}", file=sys.stderr, flush=True)
    passed = asyncio.run(_run(args, work_dir))
    if passed and not args.keep:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
