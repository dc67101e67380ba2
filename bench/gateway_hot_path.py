"""Benchmark 3: the gateway's hot path, one decision lookup in the Python DecisionCache.

    .venv/bin/python -m bench.gateway_hot_path [--users 10000] [--runs 5]

Decisions for `--users` users (made by the real enforcer core, a tenth of them over the
limit under a hard stop) are fed to a DecisionCache as records of budget.decisions (no
broker: the lookups never touch one). Beside it, the baseline measured in the same run: a
plain dict of pydantic BudgetDecided per user (what the cache kept before). Lookups are
timed with timeit over all users, median of `--runs`; memory with tracemalloc.
"""

from __future__ import annotations

import argparse
import gc
import timeit
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime

from bench.common import machine, median, print_table
from tally.config.models import Config
from tally.core import fold_events, to_balance
from tally.decision_cache import BUILT, DecisionCache
from tally.kafka import Record
from tally.services.enforcer.state import Enforcer
from tally.wire import BudgetDecided, UsageRecorded

__all__ = ["main"]

NOON = datetime(2026, 5, 10, 12, tzinfo=UTC)
CONFIG = Config.model_validate({"budgets": {"per_user_budgets": {
    "default_limits": {"daily_tokens": 100_000, "monthly_tokens": 2_000_000},
    "warnings": [{"at_percent": 75, "message": "You've used 75% of your daily budget"}],
    "on_limit_exceeded": {"action": "hard_stop"}}}})


def decisions(users: int) -> list[BudgetDecided]:
    budgets = CONFIG.budgets.per_user_budgets
    events = [UsageRecorded(event_id=f"e{i}", user_id=f"user_{i:06d}", occurred_at=NOON,
                            model="m", input_tokens=(i * 7919) % 110_000, output_tokens=0)
              for i in range(users)]
    usages = fold_events(events, budgets)
    balances = [to_balance(u, NOON) for u in usages.values()]
    return list(Enforcer(CONFIG).on_balances(balances, NOON).decisions)


def allocated(build: Callable[[], object]) -> tuple[object, int]:
    """What `build` returns, and the bytes it left allocated."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    made = build()
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return made, after - before


def per_call_ns(call: Callable[[str], object], users: list[str], repeat: int) -> float:
    def once() -> float:
        loops = 5
        seconds = timeit.timeit(lambda: [call(u) for u in users], number=loops)
        return seconds / (loops * len(users)) * 1e9
    return median(repeat, once)[0]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_hot_path")
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    made = decisions(args.users)
    values = [(d.user_id, d.model_dump_json().encode()) for d in made]
    users = [user for user, _ in values]
    blocked = sum(d.action == "hard_stop" for d in made)

    def fill_dict() -> dict[str, BudgetDecided]:
        return {user: BudgetDecided.model_validate_json(v) for user, v in values}

    def fill_cache() -> DecisionCache:
        cache = DecisionCache("127.0.0.1:1")
        cache._apply([Record("t", 0, i, user.encode(), v, 0)
                      for i, (user, v) in enumerate(values)])
        return cache

    plain, plain_bytes = allocated(fill_dict)
    cache, cache_bytes = allocated(fill_cache)
    assert isinstance(plain, dict) and isinstance(cache, DecisionCache)
    same, built_bytes = allocated(lambda: all(cache.get(u) == plain[u] for u in users))
    assert same  # the same answers; and the cache now keeps its BUILT models
    hot = users[:BUILT]  # users whose model the cache keeps built

    def plain_allows(user: str) -> bool:
        d = plain.get(user)
        return d is None or d.action != "hard_stop"

    rows = [
        ("allows(user)", per_call_ns(cache.allows, users, args.runs),
         per_call_ns(plain_allows, users, args.runs)),
        (f"get(user), one of the {BUILT} kept built", per_call_ns(cache.get, hot, args.runs),
         per_call_ns(plain.get, hot, args.runs)),
        ("get(user), built again (others)", per_call_ns(cache._table.build, users, args.runs),
         per_call_ns(plain.get, users, args.runs)),
    ]
    print(f"machine: {machine()}; {args.users:,} users ({blocked:,} under a hard stop), "
          f"median of {args.runs} runs")
    print_table(("lookup", "DecisionCache ns", "dict of pydantic ns", "ratio"),
                [(name, f"{new:,.0f}", f"{old:,.0f}", f"{new / old:.2f}x")
                 for name, new, old in rows])
    print()
    print_table(("memory per user", "DecisionCache", "dict of pydantic", "ratio"),
                [("bytes (tracemalloc, all users cached)", f"{cache_bytes / args.users:,.0f}",
                  f"{plain_bytes / args.users:,.0f}", f"{cache_bytes / plain_bytes:.2f}x")])
    print(f"plus, whatever the number of users, the {BUILT} models kept built: "
          f"{built_bytes / 2**20:.1f} MiB. Plugin per-call cost: see the README's "
          "Use with OpenClaw.")


if __name__ == "__main__":
    main()
