"""The fold: counted tokens into periods, idempotent by event_id, independent of order."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tally.config.models import ResetSchedule, TokenField
from tally.core.periods import Calendar
from tally.core.usage import (
    Fold,
    MemoryStore,
    UserUsage,
    counted_tokens,
    fold_events,
    from_balance,
    to_balance,
    with_labels,
)
from tally.wire import BalanceUpdated, UsageRecorded

from .corekit import budgets, event, event_lists, utc

ALL: tuple[TokenField, ...] = (
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
)


def full_event(**fields: int) -> UsageRecorded:
    return UsageRecorded(
        event_id="x",
        occurred_at=utc(2026, 5, 10),
        user_id="alice",
        model="m",
        input_tokens=fields.get("i", 1),
        output_tokens=fields.get("o", 20),
        cache_read_tokens=fields.get("r", 300),
        cache_write_tokens=fields.get("w", 4000),
    )


# counted tokens ----------------------------------------------------------------------------


def test_default_counts_all_four_kinds() -> None:
    assert counted_tokens(full_event(), budgets().counted_tokens) == 4321


def test_counted_tokens_configurable() -> None:
    assert counted_tokens(full_event(), ("input_tokens", "output_tokens")) == 21


def test_counted_tokens_cache_only() -> None:
    assert counted_tokens(full_event(), ("cache_read_tokens",)) == 300


def test_fold_events_uses_configured_fields() -> None:
    only_output = budgets(counted_tokens=("output_tokens",))
    usage = fold_events([full_event()], only_output)["alice"]
    assert usage.periods["daily"] == {utc(2026, 5, 10): 20}


# fold --------------------------------------------------------------------------------------


def test_fold_adds_to_every_period_kind() -> None:
    usage = fold_events([event(tokens=70)], budgets())["alice"]
    assert usage.periods == {"daily": {utc(2026, 5, 10): 70}, "weekly": {utc(2026, 5, 4): 70},
                             "monthly": {utc(2026, 5, 1): 70}}
    assert usage.last_event_at == utc(2026, 5, 10, 12)


def test_used_reads_a_kind_and_start() -> None:
    usage = fold_events([event(tokens=70)], budgets())["alice"]
    assert usage.used("daily", utc(2026, 5, 10)) == 70
    assert usage.used("monthly", utc(2026, 4, 1)) == 0


def test_fold_keys_periods_by_the_kinds_the_calendar_gives() -> None:
    """No kind is named by the fold: whatever windows_at returns is folded by its kind."""
    calendar = Calendar(ResetSchedule())
    fold = Fold()
    fold.add_event(event(tokens=5), calendar, ALL)
    assert set(fold.changed()["alice"].periods) == {
        w.kind for w in calendar.windows_at(utc(2026, 5, 10, 12))}


def test_fold_leaves_the_initial_usage_untouched() -> None:
    before = fold_events([event(tokens=1)], budgets())
    fold_events([event(tokens=2)], budgets(), before)
    assert before["alice"].periods["daily"] == {utc(2026, 5, 10): 1}


def test_memory_store_keeps_offsets_and_skips_seen_ids() -> None:
    store = MemoryStore(budgets())
    assert store.apply([event(event_id="a"), event("bob", event_id="b")], {("t", 0): 2}) == {
        "alice", "bob"}
    assert store.apply([event(event_id="a")], {("t", 0): 3}) == set()
    assert store.load_offsets() == {("t", 0): 3}
    assert store.load_usages()["alice"].used("daily", utc(2026, 5, 10)) == 100


def test_events_on_two_days_split_daily_but_share_month() -> None:
    events = [event(at=utc(2026, 5, 10, 23, 59)), event(at=utc(2026, 5, 11, 0, 0))]
    usage = fold_events(events, budgets())["alice"]
    assert usage.periods["daily"] == {utc(2026, 5, 10): 100, utc(2026, 5, 11): 100}
    assert usage.periods["monthly"] == {utc(2026, 5, 1): 200}


def test_event_belongs_to_local_day() -> None:
    ny = budgets(reset_schedule=ResetSchedule(timezone="America/New_York"))
    usage = fold_events([event(at=utc(2026, 5, 11, 3))], ny)["alice"]  # 23:00 EDT May 10
    ny_day = datetime(2026, 5, 10, tzinfo=ZoneInfo("America/New_York"))
    assert usage.periods["daily"] == {ny_day: 100}


def test_users_are_folded_apart() -> None:
    usages = fold_events([event("alice", tokens=1), event("bob", tokens=2)], budgets())
    assert usages["alice"].periods["daily"][utc(2026, 5, 10)] == 1
    assert usages["bob"].periods["daily"][utc(2026, 5, 10)] == 2


def test_duplicate_event_id_counts_once() -> None:
    one = event(event_id="same", tokens=100)
    usage = fold_events([one, one, one], budgets())["alice"]
    assert usage.periods["daily"][utc(2026, 5, 10)] == 100


def test_first_event_with_an_id_wins() -> None:
    first, second = event(event_id="same", tokens=100), event(event_id="same", tokens=999)
    assert fold_events([first, second], budgets())["alice"].used("daily", utc(2026, 5, 10)) == 100


def test_seen_ids_carry_across_batches() -> None:
    seen: set[str] = set()
    one = event(event_id="a")
    usages = fold_events([one], budgets(), seen=seen)
    usages = fold_events([one, event(event_id="b")], budgets(), usages, seen)
    assert usages["alice"].periods["daily"][utc(2026, 5, 10)] == 200
    assert seen == {"a", "b"}


def test_initial_users_without_new_events_are_kept() -> None:
    start = {"carol": UserUsage("carol", {"daily": {utc(2026, 5, 1): 5}})}
    usages = fold_events([event("alice")], budgets(), start)
    assert usages["carol"] is start["carol"]


def test_zero_token_event_still_marks_last_event() -> None:
    usage = fold_events([event(tokens=0)], budgets())["alice"]
    assert usage.periods["daily"] == {utc(2026, 5, 10): 0}
    assert usage.last_event_at == utc(2026, 5, 10, 12)


def test_last_event_at_is_latest_not_last() -> None:
    events = [event(at=utc(2026, 5, 10, 15)), event(at=utc(2026, 5, 10, 9))]
    assert fold_events(events, budgets())["alice"].last_event_at == utc(2026, 5, 10, 15)


def test_last_event_at_is_utc() -> None:
    at = datetime(2026, 5, 10, 12, tzinfo=ZoneInfo("Asia/Tokyo"))
    last = fold_events([event(at=at)], budgets())["alice"].last_event_at
    assert last is not None and last.tzinfo is UTC


# labels ------------------------------------------------------------------------------------


def test_labels_from_latest_event_stating_them() -> None:
    events = [
        event(at=utc(2026, 5, 10, 9), role="admin", department="ops"),
        event(at=utc(2026, 5, 10, 10), role="viewer"),
    ]
    usage = fold_events(events, budgets())["alice"]
    assert (usage.role, usage.department, usage.project) == ("viewer", "ops", None)


def test_labels_do_not_depend_on_arrival_order() -> None:
    late, early = (
        event(at=utc(2026, 5, 10, 10), role="viewer"),
        event(role="admin", at=utc(2026, 5, 10, 9)),
    )
    assert fold_events([late, early], budgets())["alice"].role == "viewer"


def test_with_labels_overrides_events() -> None:
    usage = fold_events([event(role="viewer", project="atlas")], budgets())["alice"]
    labelled = with_labels(usage, role="admin", project=None)
    assert (labelled.role, labelled.project) == ("admin", None)
    later = fold_events([event(at=utc(2026, 5, 11), role="viewer")], budgets(),
                        {"alice": labelled})["alice"]
    assert later.role == "admin"


# wire round trip ---------------------------------------------------------------------------


def test_to_balance_encodes_period_starts_as_utc_iso() -> None:
    usage = fold_events([event(role="dev")], budgets())["alice"]
    balance = to_balance(usage, utc(2026, 5, 10, 13))
    assert balance.periods["daily"] == {"2026-05-10T00:00:00+00:00": 100}
    assert balance.periods["monthly"] == {"2026-05-01T00:00:00+00:00": 100}
    assert balance.role == "dev"
    assert balance.as_of == utc(2026, 5, 10, 13)


def test_balance_round_trip() -> None:
    events = [event(at=utc(2026, 5, d, 12), role="dev", project="atlas") for d in (1, 2, 3)]
    usage = fold_events(events, budgets())["alice"]
    back = from_balance(to_balance(usage, utc(2026, 6, 1)))
    assert (back.periods["daily"], back.periods["monthly"], back.last_event_at) == (
        usage.periods["daily"],
        usage.periods["monthly"],
        usage.last_event_at,
    )
    assert (back.role, back.department, back.project) == ("dev", None, "atlas")


def test_balance_round_trip_through_json() -> None:
    usage = fold_events([event()], budgets())["alice"]
    text = to_balance(usage, utc(2026, 6, 1)).model_dump_json()

    assert from_balance(BalanceUpdated.model_validate_json(text)).periods == usage.periods


def test_folding_onto_a_decoded_balance_continues_it() -> None:
    usage = from_balance(
        to_balance(fold_events([event(role="dev")], budgets())["alice"], utc(2026, 6, 1))
    )
    more = fold_events([event(at=utc(2026, 5, 10, 13), role="admin")], budgets(),
                       {"alice": usage})["alice"]
    assert more.periods["daily"][utc(2026, 5, 10)] == 200
    assert more.role == "admin"


def test_balance_keeps_one_top_level_key_per_period_kind() -> None:
    """budget.balances is compacted, so records written before periods were data stay:
    the JSON keeps the `daily`/`monthly` keys, and a kind a record lacks reads as empty."""
    usage = fold_events([event()], budgets())["alice"]
    sent = orjson.loads(to_balance(usage, utc(2026, 6, 1)).model_dump_json())
    assert "periods" not in sent
    assert sent["daily"] == {"2026-05-10T00:00:00+00:00": 100}
    old = {key: value for key, value in sent.items() if key not in ("weekly", "monthly")}
    back = from_balance(BalanceUpdated.model_validate(old))
    assert back.periods == {"daily": {utc(2026, 5, 10): 100}}


def test_to_balance_needs_usage() -> None:
    with pytest.raises(ValueError, match="no usage"):
        to_balance(UserUsage("nobody"), utc(2026, 5, 10))


# properties --------------------------------------------------------------------------------

PROPERTY_BUDGETS = budgets(
    reset_schedule=ResetSchedule(timezone="Europe/Berlin", monthly_reset_day=31)
)


@settings(max_examples=200)
@given(event_lists(), st.randoms(use_true_random=False))
def test_fold_is_independent_of_order(events: list[UsageRecorded], rng: random.Random) -> None:
    shuffled = list(events)
    rng.shuffle(shuffled)
    assert fold_events(shuffled, PROPERTY_BUDGETS) == fold_events(events, PROPERTY_BUDGETS)


@settings(max_examples=200)
@given(event_lists(), st.data())
def test_fold_is_idempotent_by_event_id(events: list[UsageRecorded], data: st.DataObject) -> None:
    repeats = data.draw(st.lists(st.sampled_from(events), max_size=20)) if events else []
    replayed = data.draw(st.permutations(events + repeats + events))
    assert fold_events(replayed, PROPERTY_BUDGETS) == fold_events(events, PROPERTY_BUDGETS)


@settings(max_examples=100)
@given(event_lists(), st.integers(0, 30))
def test_folding_in_batches_equals_folding_at_once(events: list[UsageRecorded], cut: int) -> None:
    seen: set[str] = set()
    first = fold_events(events[:cut], PROPERTY_BUDGETS, seen=seen)
    both = fold_events(events[cut:] + events[:cut], PROPERTY_BUDGETS, first, seen)
    assert both == fold_events(events, PROPERTY_BUDGETS)


@settings(max_examples=100)
@given(event_lists())
def test_every_period_kind_sums_to_the_total(events: list[UsageRecorded]) -> None:
    fields = PROPERTY_BUDGETS.counted_tokens
    for user_id, usage in fold_events(events, PROPERTY_BUDGETS).items():
        total = sum(counted_tokens(e, fields) for e in events if e.user_id == user_id)
        assert {kind: sum(totals.values()) for kind, totals in usage.periods.items()} == {
            window.kind: total for window in Calendar(ResetSchedule()).windows_at(utc(2026, 1, 1))}
