"""Limits: override > role (daily only) > default; the rollover chain; shared budgets."""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from tally.config.models import Limits, ResetSchedule, Rollover
from tally.core.limits import (
    GroupUsage,
    base_limits,
    group_budgets,
    group_usage,
    period_limit,
    rolled_limit,
)
from tally.core.periods import Calendar, Window
from tally.core.usage import UserUsage, fold_events

from .corekit import budgets, event, utc

CAL = Calendar(ResetSchedule())
CONFIGURED = budgets(
    1000,
    10000,
    user_overrides={
        "alice": {"daily_tokens": 5000, "monthly_tokens": 90000},
        "dora": {"daily_tokens": 7},
        "mona": {"monthly_tokens": 3},
    },
    role_limits={"admin": 200, "viewer": 10},
)


def day(n: int) -> Window:
    """The UTC day n days after 2026-05-01."""
    return CAL.daily_window(utc(2026, 5, 1) + timedelta(days=n))


def used(**days: int) -> dict[datetime, int]:
    """used(d0=5, d3=7): tokens on day 0 and day 3."""
    return {day(int(k[1:])).start: v for k, v in days.items()}


ON = Rollover(enabled=True, max_rollover_tokens=300)


# base limits ------------------------------------------------------------------------------


def test_default_limits() -> None:
    assert base_limits(CONFIGURED, "zed", None) == Limits(daily_tokens=1000, monthly_tokens=10000)


def test_override_both() -> None:
    assert base_limits(CONFIGURED, "alice", "viewer") == Limits(
        daily_tokens=5000, monthly_tokens=90000
    )


def test_role_sets_daily_only() -> None:
    assert base_limits(CONFIGURED, "zed", "admin") == Limits(daily_tokens=200, monthly_tokens=10000)


def test_unknown_role_falls_back_to_default() -> None:
    assert base_limits(CONFIGURED, "zed", "intern").daily_tokens == 1000


def test_daily_override_beats_role_and_monthly_falls_to_default() -> None:
    assert base_limits(CONFIGURED, "dora", "admin") == Limits(daily_tokens=7, monthly_tokens=10000)


def test_monthly_override_only_keeps_role_daily() -> None:
    assert base_limits(CONFIGURED, "mona", "viewer") == Limits(daily_tokens=10, monthly_tokens=3)


def test_zero_override_is_an_override() -> None:
    zero = budgets(user_overrides={"z": {"daily_tokens": 0}}, role_limits={"admin": 5})
    assert base_limits(zero, "z", "admin").daily_tokens == 0


# rollover ---------------------------------------------------------------------------------


def test_rollover_disabled_is_base() -> None:
    assert rolled_limit(1000, Rollover(), used(d0=0, d1=10), day(2), CAL) == 1000


def test_rollover_disabled_even_with_cap() -> None:
    off = Rollover(enabled=False, max_rollover_tokens=500)
    assert rolled_limit(1000, off, used(d1=10), day(2), CAL) == 1000


def test_no_usage_nothing_rolls() -> None:
    assert rolled_limit(1000, ON, {}, day(5), CAL) == 1000


def test_first_period_with_usage_gets_nothing() -> None:
    assert rolled_limit(1000, ON, used(d3=100), day(3), CAL) == 1000


def test_unused_tokens_roll_into_next_period() -> None:
    assert rolled_limit(1000, ON, used(d0=900), day(1), CAL) == 1100


def test_rollover_capped() -> None:
    assert rolled_limit(1000, ON, used(d0=100), day(1), CAL) == 1300


def test_overuse_rolls_nothing_negative() -> None:
    assert rolled_limit(1000, ON, used(d0=5000), day(1), CAL) == 1000


def test_chain_uses_previous_rolled_limit() -> None:
    # d0: limit 1000, used 950 -> d1: 1050, used 1000 -> d2: 1000 + 50
    assert rolled_limit(1000, ON, used(d0=950, d1=1000), day(2), CAL) == 1050


def test_chain_compounds_up_to_cap() -> None:
    cap = Rollover(enabled=True, max_rollover_tokens=10_000)
    # d0: 1000 used 900 -> d1: 1100 used 900 -> d2: 1200 used 900 -> d3: 1300
    assert rolled_limit(1000, cap, used(d0=900, d1=900, d2=900), day(3), CAL) == 1300


def test_empty_period_after_usage_rolls_its_whole_limit_capped() -> None:
    # d0: 1000 used 1000 -> d1: 1000 used 0 -> d2: 1000 + min(300, 1000)
    assert rolled_limit(1000, ON, used(d0=1000), day(2), CAL) == 1300


def test_long_gap_reaches_fixed_point() -> None:
    assert rolled_limit(1000, ON, used(d0=1000), day(300), CAL) == 1300


def test_gap_with_cap_above_base_grows_step_by_step() -> None:
    big = Rollover(enabled=True, max_rollover_tokens=2500)
    # d0 used all (1000) -> d1 1000 -> d2 2000 -> d3 3000 -> d4 3500 (capped)
    expected = {1: 1000, 2: 2000, 3: 3000, 4: 3500, 40: 3500}
    for n, limit in expected.items():
        assert rolled_limit(1000, big, used(d0=1000), day(n), CAL) == limit


def test_zero_base_with_rollover_stays_zero() -> None:
    assert rolled_limit(0, ON, used(d0=5), day(9), CAL) == 0


def test_usage_in_current_period_does_not_change_its_limit() -> None:
    assert rolled_limit(1000, ON, used(d0=900, d1=50_000), day(1), CAL) == 1100


def test_periods_after_the_current_one_are_ignored() -> None:
    assert rolled_limit(1000, ON, used(d5=10), day(3), CAL) == 1000


def test_zero_token_period_does_not_start_the_chain() -> None:
    assert rolled_limit(1000, ON, used(d0=0, d1=100), day(1), CAL) == 1000


def test_monthly_rollover() -> None:
    months = {CAL.monthly_window(utc(2026, 4, 15)).start: 9_800}
    may = CAL.monthly_window(utc(2026, 5, 15))
    assert rolled_limit(10_000, ON, months, may, CAL) == 10_200


def test_rollover_across_dst_days() -> None:
    ny = Calendar(ResetSchedule(timezone="America/New_York"))
    march7 = ny.daily_window(utc(2026, 3, 7, 17))
    march8 = ny.next(march7)
    assert rolled_limit(1000, ON, {march7.start: 800}, march8, ny) == 1200


def test_period_limit_rolls_each_kind_up_from_the_days() -> None:
    rolled = budgets(1000, 10000, rollover={"enabled": True, "max_rollover_tokens": 50})
    usage = UserUsage("a", {"daily": used(d0=10), "monthly": {}})  # stored months not read
    assert period_limit(1000, rolled, usage, day(1), CAL) == 1050
    assert period_limit(10000, rolled, usage, CAL.monthly_window(utc(2026, 6, 2)), CAL) == 10050
    assert period_limit(10000, rolled, usage, CAL.monthly_window(utc(2026, 5, 2)), CAL) == 10000


def reference_limit(
    base: int, rollover: Rollover, spent: dict[datetime, int], target: Window
) -> int:
    """The rule as written: walk every period from the first with usage."""
    starts = [s for s, v in spent.items() if v > 0 and s < target.start]
    if not rollover.enabled or not starts:
        return base
    window, limit = CAL.window(target.kind, min(starts)), base
    while window.start < target.start:
        carry = min(rollover.max_rollover_tokens, max(0, limit - spent.get(window.start, 0)))
        window, limit = CAL.next(window), base + carry
    return limit


@settings(max_examples=300)
@given(
    st.integers(0, 2000),
    st.integers(0, 3000),
    st.dictionaries(st.integers(0, 60), st.integers(0, 3000), max_size=12),
    st.integers(0, 70),
)
def test_rolled_limit_matches_the_rule(base: int, cap: int, days: dict[int, int], at: int) -> None:
    rollover = Rollover(enabled=True, max_rollover_tokens=cap)
    spent = {day(n).start: v for n, v in days.items()}
    assert rolled_limit(base, rollover, spent, day(at), CAL) == reference_limit(
        base, rollover, spent, day(at)
    )


@given(
    st.integers(0, 2000),
    st.integers(0, 3000),
    st.dictionaries(st.integers(0, 30), st.integers(0, 3000)),
)
def test_rolled_limit_bounds(base: int, cap: int, days: dict[int, int]) -> None:
    rollover = Rollover(enabled=True, max_rollover_tokens=cap)
    limit = rolled_limit(base, rollover, {day(n).start: v for n, v in days.items()}, day(31), CAL)
    assert base <= limit <= base + cap


# shared budgets ---------------------------------------------------------------------------

SHARED = budgets(
    department_budgets={"research": {"daily_tokens": 1, "monthly_tokens": 2}},
    project_budgets={"atlas": {"daily_tokens": 3, "monthly_tokens": 4}},
)


def test_group_budgets_for_member_of_both() -> None:
    assert group_budgets(SHARED, "research", "atlas") == [
        ("department:research", Limits(daily_tokens=1, monthly_tokens=2)),
        ("project:atlas", Limits(daily_tokens=3, monthly_tokens=4)),
    ]


def test_group_budgets_skip_unbudgeted_groups() -> None:
    assert group_budgets(SHARED, "ops", None) == []
    assert [n for n, _ in group_budgets(SHARED, None, "atlas")] == ["project:atlas"]


def test_group_usage_sums_members_per_period() -> None:
    events = [
        event("a", tokens=10, department="research", project="atlas"),
        event("b", tokens=20, department="research"),
        event("b", tokens=5, at=utc(2026, 5, 11), department="research"),
        event("c", tokens=40, project="atlas"),
        event("d", tokens=80),
    ]
    groups = group_usage(fold_events(events, budgets()).values())
    assert set(groups) == {"department:research", "project:atlas"}
    research = groups["department:research"]
    assert research == GroupUsage(
        "department:research",
        {"daily": {utc(2026, 5, 10): 30, utc(2026, 5, 11): 5},
         "weekly": {utc(2026, 5, 4): 30, utc(2026, 5, 11): 5}, "monthly": {utc(2026, 5, 1): 35}},
    )
    assert groups["project:atlas"].periods["daily"] == {utc(2026, 5, 10): 50}


def test_group_usage_of_nobody() -> None:
    assert group_usage([]) == {}
