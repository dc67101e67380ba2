"""Periods: local wall-clock boundaries, DST days of 23 and 25 hours, gaps, folds, month ends."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tally.config.models import ResetSchedule, Weekday
from tally.core.periods import (
    PERIODS,
    WEEKDAYS,
    Calendar,
    Window,
    calendar_for,
    daily_window,
    monthly_window,
    next_window,
    parse_reset_time,
    previous_window,
    roll_up,
    weekly_window,
    windows_at,
)

NY = "America/New_York"
BERLIN = "Europe/Berlin"


def schedule(tz: str = "UTC", reset: str = "00:00", day: int = 1,
             weekday: Weekday = "monday") -> ResetSchedule:
    return ResetSchedule(timezone=tz, daily_reset_time=reset, monthly_reset_day=day,
                         weekly_reset_day=weekday)


def local(tz: str, *args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=ZoneInfo(tz), fold=fold)  # type: ignore[arg-type,misc]


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[arg-type,misc]


# daily ------------------------------------------------------------------------------------


def test_utc_midnight_day() -> None:
    window = daily_window(utc(2026, 5, 10, 13, 45), schedule())
    assert window == Window("daily", utc(2026, 5, 10), utc(2026, 5, 11))


def test_window_bounds_are_utc() -> None:
    window = daily_window(local(NY, 2026, 5, 10, 12), schedule(NY))
    assert window.start.tzinfo is UTC and window.end.tzinfo is UTC


def test_reset_instant_belongs_to_the_new_day() -> None:
    window = daily_window(utc(2026, 5, 11), schedule())
    assert window.start == utc(2026, 5, 11)


def test_instant_just_before_reset_belongs_to_the_old_day() -> None:
    window = daily_window(utc(2026, 5, 11) - timedelta(microseconds=1), schedule())
    assert window.start == utc(2026, 5, 10)


def test_reset_time_in_local_time() -> None:
    window = daily_window(local(NY, 2026, 5, 10, 12), schedule(NY, "06:30"))
    assert window.start == local(NY, 2026, 5, 10, 6, 30)
    assert window.end == local(NY, 2026, 5, 11, 6, 30)


def test_before_local_reset_time_is_previous_day() -> None:
    window = daily_window(local(NY, 2026, 5, 10, 5), schedule(NY, "06:30"))
    assert window.start == local(NY, 2026, 5, 9, 6, 30)


def test_late_reset_time_near_midnight() -> None:
    window = daily_window(local(BERLIN, 2026, 5, 10, 23, 59), schedule(BERLIN, "23:59"))
    assert window.start == local(BERLIN, 2026, 5, 10, 23, 59)


def test_spring_forward_day_lasts_23_hours() -> None:
    window = daily_window(local(NY, 2026, 3, 8, 12), schedule(NY))
    assert window.end - window.start == timedelta(hours=23)
    assert window.start == local(NY, 2026, 3, 8)


def test_fall_back_day_lasts_25_hours() -> None:
    window = daily_window(local(NY, 2026, 11, 1, 12), schedule(NY))
    assert window.end - window.start == timedelta(hours=25)


def test_ordinary_day_in_new_york_lasts_24_hours() -> None:
    window = daily_window(local(NY, 2026, 6, 1, 12), schedule(NY))
    assert window.end - window.start == timedelta(hours=24)


def test_reset_in_spring_gap_moves_to_end_of_gap() -> None:
    window = daily_window(local(NY, 2026, 3, 8, 12), schedule(NY, "02:30"))
    assert window.start == utc(2026, 3, 8, 7)  # 03:00 EDT
    assert window.start.astimezone(ZoneInfo(NY)).strftime("%H:%M %Z") == "03:00 EDT"


def test_spring_gap_day_around_reset() -> None:
    # 02:30 Mar 7 EST to 03:00 Mar 8 EDT: 23.5 hours; then 02:30 EDT Mar 9: 23.5 hours
    before = daily_window(local(NY, 2026, 3, 8, 1), schedule(NY, "02:30"))
    after = daily_window(local(NY, 2026, 3, 8, 3), schedule(NY, "02:30"))
    assert before.end == after.start == utc(2026, 3, 8, 7)
    assert before.end - before.start == timedelta(hours=23, minutes=30)
    assert after.end - after.start == timedelta(hours=23, minutes=30)


def test_reset_in_repeated_hour_is_the_first() -> None:
    window = daily_window(local(NY, 2026, 11, 1, 12), schedule(NY, "01:30"))
    assert window.start == utc(2026, 11, 1, 5, 30)  # 01:30 EDT, not 01:30 EST
    assert window.start.astimezone(ZoneInfo(NY)).strftime("%H:%M %Z") == "01:30 EDT"


def test_second_01_30_on_fall_back_day_is_inside_the_day() -> None:
    second = local(NY, 2026, 11, 1, 1, 30, fold=1)  # 01:30 EST
    window = daily_window(second, schedule(NY, "01:30"))
    assert window.start == utc(2026, 11, 1, 5, 30)
    assert window.end - window.start == timedelta(hours=25)


def test_berlin_spring_forward_02_30() -> None:
    window = daily_window(local(BERLIN, 2026, 3, 29, 12), schedule(BERLIN, "02:30"))
    assert window.start == utc(2026, 3, 29, 1)  # 03:00 CEST
    assert window.end == local(BERLIN, 2026, 3, 30, 2, 30)


def test_berlin_fall_back_day_lasts_25_hours() -> None:
    window = daily_window(local(BERLIN, 2026, 10, 25, 12), schedule(BERLIN))
    assert window.end - window.start == timedelta(hours=25)


def test_berlin_reset_in_repeated_hour() -> None:
    window = daily_window(local(BERLIN, 2026, 10, 25, 12), schedule(BERLIN, "02:30"))
    assert window.start == utc(2026, 10, 25, 0, 30)  # 02:30 CEST


def test_half_hour_offset_zone() -> None:
    window = daily_window(utc(2026, 1, 1, 20), schedule("Asia/Kolkata"))
    assert window.start == utc(2026, 1, 1, 18, 30)


def test_samoa_skipped_day_makes_no_empty_window() -> None:
    apia = schedule("Pacific/Apia")
    # 2011-12-30 never happened in Samoa: Dec 29 is followed by Dec 31.
    dec29 = daily_window(local("Pacific/Apia", 2011, 12, 29, 12), apia)
    assert dec29.end == local("Pacific/Apia", 2011, 12, 31)
    assert next_window(dec29, apia).start == dec29.end


def test_event_in_another_offset_lands_by_instant() -> None:
    at = datetime(2026, 5, 10, 23, 30, tzinfo=ZoneInfo("Asia/Tokyo"))  # 14:30 UTC
    assert daily_window(at, schedule()).start == utc(2026, 5, 10)


# monthly ----------------------------------------------------------------------------------


def test_first_of_month() -> None:
    window = monthly_window(utc(2026, 5, 10), schedule())
    assert window == Window("monthly", utc(2026, 5, 1), utc(2026, 6, 1))


def test_monthly_reset_day_15() -> None:
    window = monthly_window(utc(2026, 5, 10), schedule(day=15))
    assert (window.start, window.end) == (utc(2026, 4, 15), utc(2026, 5, 15))


def test_monthly_uses_daily_reset_time() -> None:
    window = monthly_window(local(NY, 2026, 5, 10), schedule(NY, "09:00", 15))
    assert window.start == local(NY, 2026, 4, 15, 9)


def test_monthly_day_31_clamps_to_february_28() -> None:
    window = monthly_window(utc(2026, 3, 5), schedule(day=31))
    assert (window.start, window.end) == (utc(2026, 2, 28), utc(2026, 3, 31))


def test_monthly_day_31_clamps_to_february_29_in_leap_year() -> None:
    window = monthly_window(utc(2024, 3, 5), schedule(day=31))
    assert window.start == utc(2024, 2, 29)


def test_monthly_day_30_clamps_in_february_only() -> None:
    window = monthly_window(utc(2026, 2, 27), schedule(day=30))
    assert (window.start, window.end) == (utc(2026, 1, 30), utc(2026, 2, 28))


def test_monthly_day_31_in_30_day_month() -> None:
    window = monthly_window(utc(2026, 5, 1), schedule(day=31))
    assert (window.start, window.end) == (utc(2026, 4, 30), utc(2026, 5, 31))


def test_monthly_across_year_end() -> None:
    window = monthly_window(utc(2026, 12, 20), schedule(day=15))
    assert (window.start, window.end) == (utc(2026, 12, 15), utc(2027, 1, 15))


def test_monthly_before_reset_in_january_goes_to_previous_year() -> None:
    window = monthly_window(utc(2027, 1, 3), schedule(day=15))
    assert window.start == utc(2026, 12, 15)


def test_monthly_across_dst_is_not_whole_days_of_24_hours() -> None:
    window = monthly_window(local(NY, 2026, 3, 15), schedule(NY))
    assert window.end - window.start == timedelta(days=31, hours=-1)


def test_monthly_reset_on_spring_gap_day() -> None:
    window = monthly_window(local(NY, 2026, 3, 20), schedule(NY, "02:30", 8))
    assert window.start == utc(2026, 3, 8, 7)


# weekly ------------------------------------------------------------------------------------


def test_a_utc_week_runs_monday_to_monday() -> None:
    window = weekly_window(utc(2026, 5, 10, 13), schedule())  # a Sunday
    assert window == Window("weekly", utc(2026, 5, 4), utc(2026, 5, 11))


def test_the_week_starts_on_its_reset_day_at_the_daily_reset_time() -> None:
    sched = schedule(BERLIN, "06:00", weekday="wednesday")
    window = weekly_window(local(BERLIN, 2026, 5, 13, 5, 59), sched)  # a Wednesday, before 6
    assert window.start == local(BERLIN, 2026, 5, 6, 6)
    assert window.end == local(BERLIN, 2026, 5, 13, 6)


def test_a_week_across_the_spring_change_lasts_167_hours() -> None:
    window = weekly_window(local(NY, 2026, 3, 8, 12), schedule(NY, weekday="sunday"))
    assert window.start == local(NY, 2026, 3, 8)
    assert window.end - window.start == timedelta(hours=167)


def test_a_week_across_the_autumn_change_lasts_169_hours() -> None:
    window = weekly_window(local(NY, 2026, 11, 3, 12), schedule(NY))
    assert window.start == local(NY, 2026, 11, 2)
    assert window.end - window.start == timedelta(hours=168)  # the change is on Sunday 1st
    earlier = weekly_window(local(NY, 2026, 10, 28), schedule(NY))
    assert earlier.end - earlier.start == timedelta(hours=169)


def test_a_reset_in_a_gap_on_the_reset_day_moves_the_week_too() -> None:
    sched = schedule(NY, "02:30", weekday="sunday")  # 2026-03-08 02:30 does not exist in NY
    window = weekly_window(local(NY, 2026, 3, 9, 12), sched)
    assert window.start == local(NY, 2026, 3, 8, 3)


def test_roll_up_sums_days_into_their_weeks() -> None:
    days = {utc(2026, 5, 3): 1, utc(2026, 5, 4): 2, utc(2026, 5, 10): 4, utc(2026, 5, 11): 8}
    assert roll_up(days, "weekly", Calendar(schedule())) == {
        utc(2026, 4, 27): 1, utc(2026, 5, 4): 6, utc(2026, 5, 11): 8}


# previous / next / windows_at -----------------------------------------------------------------


def test_previous_daily_window() -> None:
    window = daily_window(utc(2026, 3, 1, 5), schedule())
    assert previous_window(window, schedule()) == Window("daily", utc(2026, 2, 28), utc(2026, 3, 1))


def test_previous_monthly_window_clamped() -> None:
    sched = schedule(day=31)
    window = monthly_window(utc(2026, 3, 31, 5), sched)
    assert previous_window(window, sched).start == utc(2026, 2, 28)


def test_next_window_starts_at_end() -> None:
    window = daily_window(local(NY, 2026, 3, 7, 12), schedule(NY))
    following = next_window(window, schedule(NY))
    assert following.start == window.end
    assert following.end - following.start == timedelta(hours=23)


def test_windows_at_returns_one_window_per_kind() -> None:
    daily, weekly, monthly = windows_at(utc(2026, 5, 10, 8), schedule())
    assert (daily.kind, weekly.kind, monthly.kind) == PERIODS == ("daily", "weekly", "monthly")
    assert daily.start == utc(2026, 5, 10) and monthly.start == utc(2026, 5, 1)
    assert weekly == Window("weekly", utc(2026, 5, 4), utc(2026, 5, 11))  # Monday to Monday


def test_windows_at_memo_does_not_leak_across_a_reset_inside_an_hour() -> None:
    cal = Calendar(schedule(NY, "06:30"))
    before = cal.windows_at(local(NY, 2026, 5, 10, 6, 10))
    after = cal.windows_at(local(NY, 2026, 5, 10, 6, 40))
    again = cal.windows_at(local(NY, 2026, 5, 10, 6, 29, 59))
    assert before[0].end == after[0].start == local(NY, 2026, 5, 10, 6, 30)
    assert again == before


def test_window_contains() -> None:
    window = daily_window(utc(2026, 5, 10, 8), schedule())
    assert utc(2026, 5, 10) in window
    assert utc(2026, 5, 11) not in window


def test_calendar_for_is_shared() -> None:
    assert calendar_for(schedule(NY)) is calendar_for(schedule(NY))


@pytest.mark.parametrize("text", ["24:00", "7:00", "07:60", "0700", "", "07:00:00", "ab:cd"])
def test_bad_reset_time(text: str) -> None:
    with pytest.raises(ValueError, match="HH:MM"):
        parse_reset_time(text)


def test_good_reset_time() -> None:
    assert parse_reset_time("23:59").hour == 23


# properties -------------------------------------------------------------------------------

ZONES = ["UTC", NY, BERLIN, "Australia/Lord_Howe", "Asia/Kolkata", "America/Santiago"]
RESETS = ["00:00", "01:30", "02:30", "23:59", "12:00"]

instants = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.just(UTC)
)


weekdays = st.sampled_from(WEEKDAYS)


@given(instants, st.sampled_from(ZONES), st.sampled_from(RESETS), st.integers(1, 31), weekdays)
def test_windows_contain_the_instant_and_chain(
    at: datetime, tz: str, reset: str, day: int, weekday: Weekday
) -> None:
    sched = schedule(tz, reset, day, weekday)
    for window in windows_at(at, sched):
        assert window.start <= at < window.end
        assert previous_window(window, sched).end == window.start
        assert next_window(window, sched).start == window.end


@given(instants, st.sampled_from(ZONES), st.sampled_from(RESETS))
def test_daily_window_lasts_about_a_day(at: datetime, tz: str, reset: str) -> None:
    window = daily_window(at, schedule(tz, reset))
    assert timedelta(hours=22) <= window.end - window.start <= timedelta(hours=26)


@given(instants, st.sampled_from(ZONES), st.sampled_from(RESETS), st.integers(1, 31), weekdays)
def test_memoized_windows_match_fresh_ones(
    at: datetime, tz: str, reset: str, day: int, weekday: Weekday
) -> None:
    cal = calendar_for(schedule(tz, reset, day, weekday))
    assert cal.windows_at(at) == (cal.daily_window(at), cal.weekly_window(at),
                                  cal.monthly_window(at))


@given(instants, st.sampled_from(ZONES), st.sampled_from(RESETS), weekdays)
def test_a_week_is_seven_whole_days_from_its_reset_day(
    at: datetime, tz: str, reset: str, weekday: Weekday
) -> None:
    cal = calendar_for(schedule(tz, reset, weekday=weekday))
    week = cal.weekly_window(at)
    days = [cal.daily_window(week.start)]
    while days[-1].end < week.end:
        days.append(cal.next(days[-1]))
    assert days[0].start == week.start and days[-1].end == week.end and len(days) == 7
    assert cal.day_of(week.start).weekday() == WEEKDAYS.index(weekday)
    assert timedelta(hours=166) <= week.end - week.start <= timedelta(hours=170)


@given(st.dictionaries(instants, st.integers(0, 10**6), max_size=30),
       st.sampled_from(ZONES), weekdays, st.integers(1, 31))
def test_rolled_up_days_give_what_the_periods_hold(
    instants_used: dict[datetime, int], tz: str, weekday: Weekday, day: int
) -> None:
    """Summing each day's tokens into its week or month = summing each instant's."""
    cal = calendar_for(schedule(tz, "01:30", day, weekday))
    days: dict[datetime, int] = {}
    direct: dict[tuple[str, datetime], int] = {}
    for at, tokens in instants_used.items():
        start = cal.daily_window(at).start
        days[start] = days.get(start, 0) + tokens
        for kind in ("weekly", "monthly"):
            key = (kind, cal.window(kind, at).start)
            direct[key] = direct.get(key, 0) + tokens
    for kind in ("weekly", "monthly"):
        assert roll_up(days, kind, cal) == {s: t for (k, s), t in direct.items() if k == kind}


@given(st.dates(date(2020, 1, 1), date(2030, 12, 31)), st.sampled_from(ZONES))
def test_daily_start_is_the_reset_wall_time_unless_in_a_gap(day: date, tz: str) -> None:
    cal = calendar_for(schedule(tz, "02:30"))
    start = cal.boundary(day).astimezone(ZoneInfo(tz))
    if start.date() == day and (start.hour, start.minute) == (2, 30):
        return
    # moved: only by a gap, and then to the first instant after it
    just_before = (cal.boundary(day) - timedelta(seconds=1)).astimezone(ZoneInfo(tz))
    assert just_before.utcoffset() != start.utcoffset()
    assert just_before.replace(tzinfo=None) < datetime.combine(day, parse_reset_time("02:30"))


def test_naive_datetime_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        windows_at(datetime(2026, 5, 10, 12), schedule())
