"""Enforcer instances share the users by budget.balances partition, without Kafka: each
decides only for its own, together they say what one would, and a user who moves is
neither judged twice nor alerted twice. A balance from an older position is ignored."""

from __future__ import annotations

from datetime import timedelta

from aiokafka.partitioner import DefaultPartitioner

from tally.services.enforcer.state import Enforcer, Outcome, Ownership, partition_of
from tally.wire import BalanceUpdated
from tests.enforcer.test_state import NOON, balance_after, config

PARTITIONS = 6
USERS = [f"user{n:02d}" for n in range(24)]
HALVES = (frozenset({0, 1, 2}), frozenset({3, 4, 5}))


def owning(partitions: frozenset[int], **budgets: object) -> Enforcer:
    enforcer = Enforcer(config(**budgets))
    enforcer.take(Ownership(partitions, PARTITIONS), NOON)
    return enforcer


def balances(tokens: int, department: str | None = None) -> list[BalanceUpdated]:
    cfg = config()
    return [balance_after(cfg, tokens, user=user).model_copy(update={"department": department})
            for user in USERS]


def said(outcome: Outcome) -> tuple[set[tuple[str, str]], list[str]]:
    return {(d.user_id, d.status) for d in outcome.decisions}, [a.alert_id for a in outcome.alerts]


def test_the_partition_is_the_one_the_producer_picks() -> None:
    pick = DefaultPartitioner()
    every = list(range(PARTITIONS))
    assert all(partition_of(u, PARTITIONS) == pick(u.encode(), every, every) for u in USERS)
    assert len({partition_of(u, PARTITIONS) for u in USERS}) > 1  # the test users spread


def test_two_instances_say_together_what_one_says_each_user_by_one() -> None:
    lone, halves = Enforcer(config()), [owning(half) for half in HALVES]
    for tokens in (800, 950, 1100):  # past 75%, past 90%, over
        alone = said(lone.on_balances(balances(tokens), NOON))
        shared = [said(e.on_balances(balances(tokens), NOON)) for e in halves]
        assert shared[0][0] | shared[1][0] == alone[0]
        assert not shared[0][0] & shared[1][0]
        assert sorted(shared[0][1] + shared[1][1]) == sorted(alone[1])
        assert alone[1]  # each step crosses a threshold


def test_a_shared_budget_is_judged_on_every_instance_usage_by_its_owner() -> None:
    budget = {"department_budgets": {"research": {"daily_tokens": 5000,
                                                  "monthly_tokens": 100000}}}
    lone, halves = Enforcer(config(**budget)), [owning(h, **budget) for h in HALVES]
    # 24 users at 300 each: 7200 of research's 5000, though each user is well under 1000.
    alone = said(lone.on_balances(balances(300, "research"), NOON))
    shared = [said(e.on_balances(balances(300, "research"), NOON)) for e in halves]
    assert {status for _, status in alone[0]} == {"over_limit"}
    assert shared[0][0] | shared[1][0] == alone[0]


def test_no_one_is_judged_by_an_instance_that_owns_nothing() -> None:
    enforcer = owning(frozenset())
    assert not enforcer.on_balances(balances(1100), NOON)
    assert not enforcer.on_tick(NOON + timedelta(days=1))
    assert len(enforcer.usages) == len(USERS)  # usage is still held, for shared budgets


def test_taking_users_over_after_hearing_their_owner_repeats_nothing() -> None:
    first, second = owning(HALVES[0]), owning(HALVES[1])
    second.on_balances(balances(800), NOON)
    sent = first.on_balances(balances(800), NOON)
    second.hear(sent.decisions, sent.memory, sent.alerts)
    took = second.take(Ownership(HALVES[0] | HALVES[1], PARTITIONS), NOON + timedelta(seconds=1))
    assert not took


def test_taking_users_over_says_what_their_owner_left_unsaid() -> None:
    first, second = owning(HALVES[0]), owning(HALVES[1])
    second.on_balances(balances(800), NOON)
    first.on_balances(balances(300), NOON)  # then it died before judging the 800
    took = second.take(Ownership(HALVES[0] | HALVES[1], PARTITIONS), NOON)
    users = {u for u in USERS if partition_of(u, PARTITIONS) in HALVES[0]}
    assert {d.user_id for d in took.decisions} == users
    assert {a.user_id for a in took.alerts} == users  # the 75% warning, once each


def test_hearing_skips_decisions_of_users_an_instance_owns() -> None:
    enforcer = owning(HALVES[0])
    mine = next(u for u in USERS if partition_of(u, PARTITIONS) in HALVES[0])
    theirs = next(u for u in USERS if partition_of(u, PARTITIONS) in HALVES[1])
    held = enforcer.on_balances(balances(800), NOON).decisions
    older = Enforcer(config()).on_balances(balances(300), NOON).decisions
    taken = enforcer.hear(older)
    assert {d.user_id for d in taken} == {d.user_id for d in older} - {d.user_id for d in held}
    assert enforcer.published[mine].status == "warning"  # not the older "ok" read back
    assert enforcer.published[theirs].status == "ok"


def test_an_older_balance_from_the_same_partition_is_ignored() -> None:
    cfg = config()
    enforcer = Enforcer(cfg)

    def at(tokens: int, partition: int, offset: int) -> BalanceUpdated:
        return balance_after(cfg, tokens).model_copy(
            update={"source_partition": partition, "source_offset": offset})

    assert enforcer.on_balances([at(800, 2, 100)], NOON).decisions[0].status == "warning"
    assert not enforcer.on_balances([at(300, 2, 99)], NOON)  # a zombie projector's
    assert enforcer.usages["alice"].used("daily", NOON.replace(hour=0)) == 800
    assert enforcer.on_balances([at(1100, 2, 101)], NOON).decisions[0].status == "over_limit"
    assert enforcer.remember([at(200, 4, 7)]) == {"alice"}  # repartitioned: taken as is


def test_a_decision_sent_by_another_for_an_owned_user_is_said_again() -> None:
    enforcer = owning(HALVES[0])
    mine = next(u for u in USERS if partition_of(u, PARTITIONS) in HALVES[0])
    sent = [d for d in enforcer.on_balances(balances(300), NOON).decisions if d.user_id == mine]
    later = [d for d in enforcer.on_balances(balances(800), NOON).decisions
             if d.user_id == mine]
    enforcer.hear(sent + later)  # its own two, read back in order
    assert not enforcer.restate()
    enforcer.hear(sent)  # the older one again, from an instance that lost the user
    assert [d.status for d in enforcer.restate().decisions] == ["warning"]
    enforcer.hear(later)  # that restatement read back
    assert not enforcer.restate()


def test_what_was_read_back_while_owning_stands_once_the_users_are_lost() -> None:
    """A paused instance resumes believing it owns its users and reads what their new
    owner decided meanwhile, before the group tells it: once told, that stands."""
    zombie = owning(HALVES[0])
    zombie.on_balances(balances(300), NOON)
    meanwhile = Enforcer(config()).on_balances(balances(800), NOON).decisions
    zombie.hear(meanwhile)
    zombie.lose(Ownership.nobody(PARTITIONS))
    assert {d.status for d in zombie.published.values()} == {"warning"}
    assert not zombie.restate()


def test_a_decision_withheld_is_held_no_more_and_judging_again_says_it() -> None:
    """Decisions whose alerts' transaction did not commit are not sent (app.py): judged
    again, their users get them, and their alerts, once each."""
    enforcer = owning(HALVES[0])
    before = enforcer.on_balances(balances(300), NOON)
    withheld = enforcer.on_balances(balances(1100), NOON)  # over the limit: alerts
    users = {d.user_id for d in withheld.decisions}
    assert users and {a.user_id for a in withheld.alerts} == users
    enforcer.withhold(withheld, users)
    enforcer.memory.roll_back(withheld.alerts)
    assert [enforcer.published[d.user_id] for d in before.decisions] == before.decisions
    assert said(enforcer.evaluate(users, NOON)) == said(withheld)
