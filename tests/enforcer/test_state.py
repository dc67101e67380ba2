"""The enforcer's state machine, without Kafka: what it publishes and what it keeps quiet."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tally.config.models import Config
from tally.core import fold_events, to_balance
from tally.kafka import Record
from tally.services.enforcer.heard import Said
from tally.services.enforcer.state import Enforcer, same_decision
from tally.wire import BalanceUpdated, BudgetDecided
from tests.core.corekit import event

NOON = datetime(2026, 5, 10, 12, tzinfo=UTC)


def config(action: str = "hard_stop", **budgets: object) -> Config:
    return Config.model_validate({
        "budgets": {"per_user_budgets": {
            "default_limits": {"daily_tokens": 1000, "monthly_tokens": 100000},
            "warnings": [{"at_percent": 75, "message": "75% used"},
                         {"at_percent": 90, "message": "90% used"}],
            "on_limit_exceeded": {"action": action},
            **budgets,
        }},
    })


def balance_after(cfg: Config, *tokens: int, user: str = "alice",
                  at: datetime = NOON) -> BalanceUpdated:
    events = [event(user, at=at, tokens=t) for t in tokens]
    usage = fold_events(events, cfg.budgets.per_user_budgets)[user]
    return to_balance(usage, at)


def test_a_first_balance_publishes_a_decision_and_no_alert_below_the_warnings() -> None:
    cfg = config()
    enforcer = Enforcer(cfg)
    outcome = enforcer.on_balances([balance_after(cfg, 100)], NOON)
    assert [(d.user_id, d.status, d.action) for d in outcome.decisions] == [
        ("alice", "ok", "allow")]
    assert outcome.alerts == []


def test_crossing_two_warnings_at_once_sends_both_alerts() -> None:
    cfg = config()
    outcome = Enforcer(cfg).on_balances([balance_after(cfg, 950)], NOON)
    assert sorted(a.threshold for a in outcome.alerts) == [75, 90]
    assert outcome.decisions[0].action == "warn"


def test_the_limit_stops_the_user_with_the_hard_stop_message() -> None:
    cfg = config()
    outcome = Enforcer(cfg).on_balances([balance_after(cfg, 1000)], NOON)
    decision = outcome.decisions[0]
    assert (decision.status, decision.action, decision.status_code) == (
        "over_limit", "hard_stop", 429)
    assert {a.kind for a in outcome.alerts} == {"warning", "limit"}


def test_reduced_priority_names_the_cheaper_model() -> None:
    cfg = config("reduced_priority")
    decision = Enforcer(cfg).on_balances([balance_after(cfg, 1200)], NOON).decisions[0]
    assert decision.action == "reduced_priority"
    assert decision.force_model == "anthropic/claude-3-haiku"


def test_the_same_balance_twice_publishes_nothing_new() -> None:
    cfg = config()
    enforcer = Enforcer(cfg)
    enforcer.on_balances([balance_after(cfg, 950)], NOON)
    assert not enforcer.on_balances([balance_after(cfg, 950)], NOON + timedelta(seconds=5))


def test_a_restored_enforcer_repeats_no_decision_and_no_alert() -> None:
    cfg = config()
    first = Enforcer(cfg)
    said = first.on_balances([balance_after(cfg, 1000)], NOON)
    second = Enforcer(cfg)
    second.restore(said.decisions, said.memory)
    assert not second.on_balances([balance_after(cfg, 1000)], NOON + timedelta(minutes=1))


def test_at_the_daily_reset_an_over_limit_user_is_ok_again_without_new_usage() -> None:
    cfg = config()
    enforcer = Enforcer(cfg)
    enforcer.on_tick(NOON)
    enforcer.on_balances([balance_after(cfg, 1000)], NOON)
    assert not enforcer.on_tick(NOON + timedelta(hours=1))
    after_reset = enforcer.on_tick(datetime(2026, 5, 11, 0, 0, 1, tzinfo=UTC))
    assert [(d.status, d.action) for d in after_reset.decisions] == [("ok", "allow")]
    assert [a.kind for a in after_reset.alerts] == ["reset"]


def test_new_limits_reevaluate_everyone() -> None:
    cfg = config()
    enforcer = Enforcer(cfg)
    enforcer.on_balances([balance_after(cfg, 800)], NOON)
    looser = config(default_limits={"daily_tokens": 10000, "monthly_tokens": 100000})
    outcome = enforcer.on_config(looser, NOON)
    assert [(d.status, d.tokens_limit) for d in outcome.decisions] == [("ok", 10000)]


def test_a_department_budget_reaches_every_member() -> None:
    cfg = config(department_budgets={"research": {"daily_tokens": 1500,
                                                  "monthly_tokens": 100000}})
    enforcer = Enforcer(cfg)
    alice = balance_after(cfg, 800, user="alice").model_copy(update={"department": "research"})
    dave = balance_after(cfg, 800, user="dave").model_copy(update={"department": "research"})
    enforcer.on_balances([alice], NOON)
    outcome = enforcer.on_balances([dave], NOON)
    by_user = {d.user_id: d for d in outcome.decisions}
    assert set(by_user) == {"alice", "dave"}
    assert by_user["alice"].budget == "department:research"
    assert by_user["alice"].action == "hard_stop"


def test_same_decision_ignores_only_as_of() -> None:
    cfg = config()
    decision = Enforcer(cfg).on_balances([balance_after(cfg, 100)], NOON).decisions[0]
    later = decision.model_copy(update={"as_of": NOON + timedelta(hours=1)})
    assert same_decision(decision, later)
    assert not same_decision(decision, later.model_copy(update={"tokens_used": 101}))
    assert not same_decision(None, decision)


def test_a_decision_names_the_identities_its_user_claims() -> None:
    cfg = Config.model_validate({
        "users": {"user_identification": {"users": [
            {"id": "alice", "identities": ["openai-user:Alice", "telegram:42"]}]}},
        "budgets": config().budgets.model_dump(),
    })
    decision = Enforcer(cfg).on_balances([balance_after(cfg, 100)], NOON).decisions[0]
    assert decision.identities == ("openai-user:alice", "telegram:42")


def test_alert_memory_is_one_record_per_user_and_period() -> None:
    cfg = config()
    outcome = Enforcer(cfg).on_balances([balance_after(cfg, 1000)], NOON)
    assert {a.kind for a in outcome.alerts} == {"limit", "warning"}
    (record,) = outcome.memory  # the daily warning and limit share one key
    assert record.key == "alice|daily|2026-05-10T00:00:00+00:00"
    assert set(record.alert_ids) == {a.alert_id for a in outcome.alerts}


def test_alerts_read_back_from_budget_alerts_count_as_sent() -> None:
    cfg = config()
    said = Enforcer(cfg).on_balances([balance_after(cfg, 1000)], NOON)
    second = Enforcer(cfg)
    second.restore(said.decisions, memory=(), alerts=said.alerts)  # memory never written
    assert not second.on_balances([balance_after(cfg, 1000)], NOON + timedelta(minutes=1))


def test_alert_memory_forgets_periods_long_over() -> None:
    cfg = config()
    enforcer = Enforcer(cfg)
    enforcer.on_balances([balance_after(cfg, 1000)], NOON)
    first_day = set(enforcer.memory.ids)
    enforcer.on_tick(NOON + timedelta(days=61))  # a new day: the reset alert's own key
    assert len(enforcer.memory) == 2 and first_day <= enforcer.memory.ids
    enforcer.on_tick(NOON + timedelta(days=63))
    assert len(enforcer.memory) == 1 and not first_day & enforcer.memory.ids


def test_a_decision_heard_back_as_sent_is_taken_as_it_is_and_others_are_decoded() -> None:
    cfg = config()
    sent, other = (Enforcer(cfg).on_balances([balance_after(cfg, n, user=u)], NOON).decisions[0]
                   for n, u in ((950, "alice"), (100, "bob")))
    said = Said()
    records = [Record("budget.decisions", 0, offset, user.encode(), value, 0)
               for offset, (user, value) in enumerate([
                   ("alice", said.encode(sent)), ("bob", other.model_dump_json().encode()),
                   ("alice", b"not json"), ("alice", said.encode(sent))])]
    heard = said.decode(records[:3])
    # Taken as sent (the same object), equal to what decoding gives; bob's decoded;
    # the undecodable record skipped.
    assert heard[0] is sent
    assert heard[0] == BudgetDecided.model_validate_json(records[0].value or b"")
    assert heard[1:] == [other]
    # Sent twice before either was heard: the second is taken as sent too; heard once
    # more than sent, decoded.
    assert said.decode(records[3:])[0] is sent
    again = said.decode(records[3:])
    assert again == [sent] and again[0] is not sent


def test_a_decision_record_whose_key_is_not_utf8_is_skipped_not_a_crash() -> None:
    said = Said()
    records = [Record("budget.decisions", 0, 0, b"\xff\xfe", b"\xff not json", 0),
               Record("budget.decisions", 0, 1, None, b"{}", 0)]
    assert said.decode(records) == []


def test_alerts_rolled_back_after_an_abort_are_sent_again_when_judged_again() -> None:
    cfg = config()
    enforcer = Enforcer(cfg)
    first = enforcer.on_balances([balance_after(cfg, 800), balance_after(cfg, 950, user="bob")],
                                 NOON)
    alice = [a for a in first.alerts if a.user_id == "alice"]
    bob = [a for a in first.alerts if a.user_id == "bob"]
    assert alice and bob and {a.alert_id for a in first.alerts} <= enforcer.memory.ids
    # Alice's partition committed, bob's transaction was aborted (fenced, or failed).
    enforcer.memory.settle(alice)
    enforcer.memory.roll_back(bob)
    assert not {a.alert_id for a in bob} & enforcer.memory.ids
    assert {a.alert_id for a in alice} <= enforcer.memory.ids
    again = enforcer.evaluate({"alice", "bob"}, NOON)
    assert again.alerts == bob  # judged again: bob's alerts are due, alice's are not
    (record,) = again.memory
    assert record.user_id == "bob" and record.alert_ids == tuple(sorted(a.alert_id for a in bob))


def test_a_roll_back_keeps_an_alert_heard_meanwhile_and_one_committed() -> None:
    cfg = config()
    enforcer = Enforcer(cfg)
    outcome = enforcer.on_balances([balance_after(cfg, 950)], NOON)
    warned_75, warned_90 = outcome.alerts
    # While the transaction was out, another instance's alert memory record said 75 % sent.
    (record,) = outcome.memory
    enforcer.hear([], [record.model_copy(update={"alert_ids": (warned_75.alert_id,)})])
    enforcer.memory.roll_back(outcome.alerts)
    assert warned_75.alert_id in enforcer.memory.ids
    assert warned_90.alert_id not in enforcer.memory.ids
    assert enforcer.evaluate({"alice"}, NOON).alerts == [warned_90]
    enforcer.memory.settle([warned_90])
    enforcer.memory.roll_back([warned_90])  # too late: committed
    assert warned_90.alert_id in enforcer.memory.ids


def test_outcomes_judged_one_balance_at_a_time_add_up_to_one_with_their_memory() -> None:
    """The enforcer's fallback judges a batch balance by balance: the combined outcome
    carries every step's alert memory records, or its alerts would go out unremembered."""
    cfg = config()
    enforcer = Enforcer(cfg)
    outcome = enforcer.on_balances([balance_after(cfg, 800)], NOON)
    outcome.then(enforcer.on_balances([balance_after(cfg, 1000)], NOON))
    outcome.then(enforcer.on_balances([balance_after(cfg, 950, user="bob")], NOON))
    assert [(d.user_id, d.action) for d in outcome.decisions] == [
        ("alice", "warn"), ("alice", "hard_stop"), ("bob", "warn")]
    remembered = {i for record in outcome.memory for i in record.alert_ids}
    assert {a.alert_id for a in outcome.alerts} <= remembered
    assert {r.user_id for r in outcome.memory} == {"alice", "bob"}
    # alice's stop unsent after all: she is held at what she had before the first step
    enforcer.withhold(outcome, ["alice"])
    assert enforcer.evaluate({"alice"}, NOON).decisions[0].action == "hard_stop"
    assert outcome.replaced["alice"] is None


def test_a_user_whose_judging_fails_leaves_the_others_decided(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug the policy meets on one user's usage costs that user's new decision only: the
    others' decisions and alerts go out together, and the failed one is judged again."""
    from tally.services.enforcer import state

    cfg = config()
    enforcer = Enforcer(cfg)
    decide = state.decide

    def failing_for_zed(usage: Any, *args: Any) -> BudgetDecided:
        if usage.user_id == "zed":
            raise ValueError("a bug met on zed's usage")
        return decide(usage, *args)

    monkeypatch.setattr(state, "decide", failing_for_zed)
    outcome = enforcer.on_balances([balance_after(cfg, 800), balance_after(cfg, 950, user="zed")],
                                   NOON)
    assert [(d.user_id, d.action) for d in outcome.decisions] == [("alice", "warn")]
    assert {a.user_id for a in outcome.alerts} == {"alice"} == {r.user_id for r in outcome.memory}
    assert "judging zed failed" in caplog.text
    monkeypatch.setattr(state, "decide", decide)
    again = enforcer.evaluate({"alice", "zed"}, NOON)
    assert [(d.user_id, d.action) for d in again.decisions] == [("zed", "warn")]
