"""The period table: which daily, weekly and monthly windows contain an instant.

`PERIODS` lists the kinds, shortest first; everything that handles periods iterates over it
(or over the windows `Calendar.windows_at` returns, one per kind) instead of naming kinds.

A boundary is a local wall-clock time in the schedule's time zone, so a day lasts 23 or 25
hours across DST. A reset time that falls in a DST gap moves to the first instant after the
gap; one that falls in a repeated hour is the first of the two. Weeks and months start at a
day's boundary: a week on `weekly_reset_day`, a month on `monthly_reset_day`, clamped to the
last day of shorter months. So every week and month is made of whole days.

Every instant a `Window` holds is an aware UTC datetime; windows of one kind are contiguous
and half-open: start <= t < end.
"""

from __future__ import annotations

import calendar as _calendar
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from typing import get_args
from zoneinfo import ZoneInfo

from tally.config.models import ResetSchedule, Weekday
from tally.wire import PeriodName

__all__ = [
    "NOUNS",
    "PERIODS",
    "WEEKDAYS",
    "Calendar",
    "Window",
    "calendar_for",
    "daily_window",
    "monthly_window",
    "next_window",
    "parse_reset_time",
    "previous_window",
    "roll_up",
    "weekly_window",
    "window_of",
    "windows_at",
]

# The period table: every kind, shortest first (a tie between periods goes to the longer).
PERIODS: tuple[PeriodName, ...] = get_args(PeriodName)
# How people name one period of each kind ("the day resets at ..."); every kind has one.
NOUNS: Mapping[PeriodName, str] = {"daily": "day", "weekly": "week", "monthly": "month"}
WEEKDAYS: tuple[Weekday, ...] = get_args(Weekday)  # date.weekday() order: monday is 0


_HHMM = re.compile(r"([01][0-9]|2[0-3]):([0-5][0-9])")
_ONE_DAY = timedelta(days=1)
_ONE_WEEK = timedelta(days=7)
_TINY = timedelta(microseconds=1)
_HOUR = 3600
_MINUTE = 60
# Bounds the memo of windows per hour/minute; a replay moves forward in time, so dropping
# the whole memo now and then costs one recomputation per bucket.
_MEMO_LIMIT = 200_000


@dataclass(frozen=True, slots=True)
class Window:
    """One period: [start, end), both aware UTC datetimes."""

    kind: PeriodName
    start: datetime
    end: datetime

    def __contains__(self, at: datetime) -> bool:
        return self.start <= at < self.end


Windows = tuple[Window, ...]  # one per kind of PERIODS, in that order


def parse_reset_time(text: str) -> time:
    """'HH:MM' (24-hour clock) -> time; ValueError otherwise."""
    match = _HHMM.fullmatch(text)
    if match is None:
        raise ValueError(f"reset time {text!r} is not HH:MM (00:00 to 23:59)")
    return time(int(match.group(1)), int(match.group(2)))


class Calendar:
    """A reset schedule compiled for fast, repeated lookups (keep one per schedule)."""

    __slots__ = (
        "_boundaries",
        "_by_hour",
        "_by_minute",
        "reset_day",
        "reset_time",
        "schedule",
        "week_day",
        "zone",
    )

    def __init__(self, schedule: ResetSchedule) -> None:
        self.schedule = schedule
        self.zone = ZoneInfo(schedule.timezone)
        self.reset_time = parse_reset_time(schedule.daily_reset_time)
        self.reset_day = schedule.monthly_reset_day
        self.week_day = WEEKDAYS.index(schedule.weekly_reset_day)
        self._boundaries: dict[date, datetime] = {}
        self._by_hour: dict[int, Windows] = {}
        self._by_minute: dict[int, Windows] = {}

    # boundaries ---------------------------------------------------------------------------

    def boundary(self, day: date) -> datetime:
        """The reset instant (UTC) of a local calendar day."""
        found = self._boundaries.get(day)
        if found is None:
            found = self._boundaries[day] = self._resolve(datetime.combine(day, self.reset_time))
        return found

    def _resolve(self, wall: datetime) -> datetime:
        first = wall.replace(tzinfo=self.zone, fold=0).astimezone(UTC)
        if first.astimezone(self.zone).replace(tzinfo=None) == wall:
            return first  # fold=0 is the earlier of a repeated time
        return self._end_of_gap(wall)

    def _end_of_gap(self, wall: datetime) -> datetime:
        # The wall time does not exist. Its two readings (with the offsets before and after
        # the transition) bracket the transition, which is the first instant whose local time
        # comes after `wall`; tz transitions fall on whole seconds.
        readings = [wall.replace(tzinfo=self.zone, fold=f).timestamp() for f in (0, 1)]
        low, high = int(min(readings)), int(max(readings))
        while high - low > 1:
            middle = (low + high) // 2
            if self._wall(middle) > wall:
                high = middle
            else:
                low = middle
        return datetime.fromtimestamp(high, UTC)

    def _wall(self, seconds: int) -> datetime:
        return datetime.fromtimestamp(seconds, self.zone).replace(tzinfo=None)

    def month_start(self, year: int, month: int) -> datetime:
        last = _calendar.monthrange(year, month)[1]
        return self.boundary(date(year, month, min(self.reset_day, last)))

    # windows ------------------------------------------------------------------------------

    def day_of(self, at: datetime) -> date:
        """The local day whose boundary starts the daily period holding `at`."""
        day = at.astimezone(self.zone).date()
        while at < self.boundary(day):
            day -= _ONE_DAY
        while at >= self.boundary(day + _ONE_DAY):
            day += _ONE_DAY
        return day

    def daily_window(self, at: datetime) -> Window:
        day = self.day_of(at)
        return Window("daily", self.boundary(day), self.boundary(day + _ONE_DAY))

    def weekly_window(self, at: datetime) -> Window:
        """Seven days from the boundary of the latest `weekly_reset_day` (168 hours, or
        one hour less or more across a DST change)."""
        day = self.day_of(at)
        first = day - timedelta(days=(day.weekday() - self.week_day) % 7)
        return Window("weekly", self.boundary(first), self.boundary(first + _ONE_WEEK))

    def monthly_window(self, at: datetime) -> Window:
        local = at.astimezone(self.zone)
        year, month = local.year, local.month
        start = self.month_start(year, month)
        while at < start:
            year, month = _shift_month(year, month, -1)
            start = self.month_start(year, month)
        end = self.month_start(*_shift_month(year, month, 1))
        while at >= end:
            year, month = _shift_month(year, month, 1)
            start, end = end, self.month_start(*_shift_month(year, month, 1))
        return Window("monthly", start, end)

    def window(self, kind: PeriodName, at: datetime) -> Window:
        return _WINDOW_OF[kind](self, at)

    def previous(self, window: Window) -> Window:
        return self.window(window.kind, window.start - _TINY)

    def next(self, window: Window) -> Window:
        return self.window(window.kind, window.end)

    def windows_at(self, at: datetime) -> Windows:
        """The window of each kind of PERIODS containing `at`, in PERIODS order; memoized per
        hour, or per minute near a reset."""
        if at.tzinfo is None:  # timestamp() would silently read it as the host's local time
            raise ValueError(f"naive datetime {at.isoformat()}: a time zone is required")
        seconds = at.timestamp()
        hour = int(seconds // _HOUR)
        found = self._by_hour.get(hour)
        if found is not None:
            return found
        minute = int(seconds // _MINUTE)
        found = self._by_minute.get(minute)
        if found is not None:
            return found
        return self._remember(at, hour, minute)

    def _remember(self, at: datetime, hour: int, minute: int) -> Windows:
        windows = tuple(self.window(kind, at) for kind in PERIODS)
        if len(self._by_hour) + len(self._by_minute) > _MEMO_LIMIT:
            self._by_hour.clear()
            self._by_minute.clear()
        if _covers(windows, hour * _HOUR, _HOUR):
            self._by_hour[hour] = windows
        elif _covers(windows, minute * _MINUTE, _MINUTE):
            self._by_minute[minute] = windows
        # else: a boundary inside this very minute (an odd historical offset): not memoized
        return windows


_WINDOW_OF = {"daily": Calendar.daily_window, "weekly": Calendar.weekly_window,
              "monthly": Calendar.monthly_window}


def _covers(windows: Windows, start_seconds: int, length: int) -> bool:
    first = datetime.fromtimestamp(start_seconds, UTC)
    last = first + timedelta(seconds=length)
    return all(w.start <= first and last <= w.end for w in windows)


def _shift_month(year: int, month: int, step: int) -> tuple[int, int]:
    index = year * 12 + (month - 1) + step
    return index // 12, index % 12 + 1


@lru_cache(maxsize=64)
def calendar_for(schedule: ResetSchedule) -> Calendar:
    """The shared Calendar of a schedule (hot paths should hold on to it instead)."""
    return Calendar(schedule)


def daily_window(at: datetime, schedule: ResetSchedule) -> Window:
    return calendar_for(schedule).daily_window(at)


def weekly_window(at: datetime, schedule: ResetSchedule) -> Window:
    return calendar_for(schedule).weekly_window(at)


def monthly_window(at: datetime, schedule: ResetSchedule) -> Window:
    return calendar_for(schedule).monthly_window(at)


def previous_window(window: Window, schedule: ResetSchedule) -> Window:
    """The period of the same kind just before `window`."""
    return calendar_for(schedule).previous(window)


def next_window(window: Window, schedule: ResetSchedule) -> Window:
    """The period of the same kind just after `window`."""
    return calendar_for(schedule).next(window)


def last_days(calendar: Calendar, at: datetime, count: int) -> list[Window]:
    """The `count` daily periods up to the one holding `at`, oldest first (a 23- or 25-hour
    day across a DST change is one day): the demo's history and the dashboard's charts."""
    days = [calendar.daily_window(at)]
    while len(days) < count:
        days.append(calendar.previous(days[-1]))
    return days[::-1]


def windows_at(at: datetime, schedule: ResetSchedule) -> Windows:
    """The windows of every kind (PERIODS order) that contain `at` (an aware datetime)."""
    return calendar_for(schedule).windows_at(at)


def window_of(windows: Windows, kind: PeriodName) -> Window:
    """The window of `kind` among windows_at's."""
    return windows[PERIODS.index(kind)]


def roll_up(days: Mapping[datetime, int], kind: PeriodName, calendar: Calendar) -> dict[
        datetime, int]:
    """Tokens per `kind` period, summed from tokens per daily period start: every period is
    made of whole days, so this is what folding events into `kind` would have given."""
    index = PERIODS.index(kind)
    found: dict[datetime, int] = {}
    for start, tokens in days.items():
        key = calendar.windows_at(start)[index].start  # memoized per hour: cheap
        found[key] = found.get(key, 0) + tokens
    return found
