"""DecisionCache on a real broker: reads from the beginning, follows, fails open or closed."""

from __future__ import annotations

import asyncio

import pytest

from tally.config.models import Config
from tally.core import fold_events, to_balance
from tally.decision_cache import DecisionCache, DecisionTable
from tally.kafka import ensure_topics, make_producer
from tally.services.enforcer.state import Enforcer
from tally.topics import Topics
from tally.wire import BudgetDecided
from tests.core.corekit import event, utc

NOON = utc(2026, 5, 10, 12)
CONFIG = Config.model_validate({"budgets": {"per_user_budgets": {
    "default_limits": {"daily_tokens": 1000, "monthly_tokens": 100000},
    "on_limit_exceeded": {"action": "hard_stop"}}}})


def decision_for(user: str, tokens: int) -> BudgetDecided:
    budgets = CONFIG.budgets.per_user_budgets
    usage = fold_events([event(user, at=NOON, tokens=tokens)], budgets)[user]
    return Enforcer(CONFIG).on_balances([to_balance(usage, NOON)], NOON).decisions[0]


@pytest.mark.parametrize(("fail_open", "allowed"), [(True, True), (False, False)])
def test_a_user_without_a_decision_follows_fail_open(fail_open: bool, allowed: bool) -> None:
    cache = DecisionCache("127.0.0.1:1", fail_open=fail_open)
    assert cache.get("nobody") is None
    assert cache.allows("nobody") is allowed


@pytest.mark.kafka
async def test_reads_history_then_follows_new_decisions(
    kafka_bootstrap: str, unique_name: str
) -> None:
    topics = Topics(f"cache-{unique_name}")
    await ensure_topics(kafka_bootstrap, topics, 3)
    producer = make_producer(kafka_bootstrap)
    await producer.start()
    try:
        async def publish(decision: BudgetDecided | None, user: str) -> None:
            value = decision.model_dump_json().encode() if decision else None
            await producer.send_and_wait(topics.budget_decisions, value, key=user.encode())

        await publish(decision_for("alice", 100), "alice")
        await publish(decision_for("alice", 1200), "alice")
        await publish(decision_for("bob", 10), "bob")
        cache = DecisionCache(kafka_bootstrap, topics, fail_open=True)
        await cache.start()
        try:
            stopped = cache.get("alice")
            assert stopped is not None and stopped.action == "hard_stop"
            assert stopped.as_of == NOON
            assert not cache.allows("alice") and cache.allows("bob") and len(cache) == 2

            await publish(decision_for("carol", 950), "carol")
            await publish(None, "bob")  # a tombstone withdraws bob's decision
            for _ in range(200):
                if cache.get("carol") is not None and cache.get("bob") is None:
                    break
                await asyncio.sleep(0.02)
            carol = cache.get("carol")
            assert carol is not None and (carol.status, carol.tokens_used) == ("ok", 950)
            assert cache.get("bob") is None
        finally:
            await cache.stop()
    finally:
        await producer.stop()


def test_packed_decisions_come_back_equal_with_their_identities_and_key_digests() -> None:
    from tally.decision_cache import DecisionTable

    table = DecisionTable()
    plain = decision_for("bob", 10)
    claimed = decision_for("alice", 1200).model_copy(
        update={"identities": ("openai-user:alice", "telegram:1"),
                "key_digests": ("sha256:" + "ab" * 32,)})
    table.put("alice", claimed)
    table.put("bob", plain)
    assert table.build("alice") == claimed
    assert table.build("bob") == plain
    assert not table._odd  # both packed in columns, neither kept as a model


def test_a_weekly_period_comes_back_from_the_packed_table() -> None:
    config = CONFIG.model_copy(update={"budgets": CONFIG.budgets.model_validate(
        {"per_user_budgets": {"default_limits": {"daily_tokens": 1000, "weekly_tokens": 500,
                                                 "monthly_tokens": 100000}}})})
    usage = fold_events([event("alice", at=NOON, tokens=600)],
                        config.budgets.per_user_budgets)["alice"]
    weekly = Enforcer(config).on_balances([to_balance(usage, NOON)], NOON).decisions[0]
    table = DecisionTable()
    table.put("alice", weekly)
    table.put("bob", decision_for("bob", 10))  # no weekly limit: none comes back
    assert table.build("alice") == weekly and weekly.weekly is not None
    assert table.build("bob") == decision_for("bob", 10) and table.build("bob").weekly is None
    assert "alice" not in table._odd  # packed, not kept as its model
