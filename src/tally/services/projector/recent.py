"""Which events of a live batch are new, judged from memory: the event_ids of the recent past.

Without it a live batch's balances leave only after DuckDB has said which of its events are
new (`dedupe.not_stored`, inside the batch's transaction: milliseconds on a busy machine),
and the next batch waits for the whole transaction. `RecentIds` holds every stored
event_id whose `occurred_at` is at or after its `floor` (loaded from the ledger at start,
then each id the projector counts), so for a batch whose events all fall at or after the
floor, "new or copy" is a set lookup, and its balances go out before any DuckDB statement.
The floor follows the clock at `span` behind it; a batch with an older event is judged by
DuckDB first, as before.

Exact inside the window because a copy states its original's `occurred_at` (a resend is the
same event). DuckDB stays the authority all the same: the batch's write runs the same
dedupe, stores what it finds, and a batch it judges otherwise (a "copy" stating another
time than its stored original, older than the floor) is refolded from the store
(`WindowMissed`). Memory: the ids as Python strings, ~120 bytes each: 5 minutes at 1,000
events/s is ~36 MB.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["SPAN", "RecentIds", "WindowMissed"]

SPAN = timedelta(minutes=5)
_BUCKET_US = 60_000_000  # ids are kept per minute of occurred_at: a minute is dropped whole
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class WindowMissed(Exception):
    """DuckDB found a batch's new events other than the window said (its result is stored):
    the balances sent from the window's answer are to be derived again from the store."""


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(microseconds=1)


class RecentIds:
    """Every stored event_id whose occurred_at is at or after `floor`, by minute."""

    def __init__(self, floor: datetime, span: timedelta = SPAN) -> None:
        self.span = span
        self._floor = _micros(floor)
        self._minutes: dict[int, set[str]] = {}

    @classmethod
    def load(cls, con: duckdb.DuckDBPyConnection, now: datetime,
             span: timedelta = SPAN) -> RecentIds:
        """The ledger's ids of the last `span` before `now` (zone maps skip older rows)."""
        recent = cls(now - span, span)
        rows = con.sql("SELECT event_id, occurred_at FROM ledger WHERE occurred_at >= $1",
                       params=[now - span]).to_arrow_table()
        recent.remember(rows, now)
        return recent

    @property
    def floor(self) -> datetime:
        return _EPOCH + timedelta(microseconds=self._floor)

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._minutes.values())

    def new_of(self, events: pa.Table, now: datetime) -> pa.Table | None:
        """The rows of `events` (distinct event_ids, in the ledger's columns) whose event_id
        was never counted, now remembered; None if an event is older than the floor (this
        window cannot say: ask DuckDB)."""
        self._advance(now)
        if not events.num_rows:
            return events
        times = pc.cast(events.column("occurred_at"), pa.int64())
        if pc.min(times).as_py() < self._floor:
            return None
        minutes = self._minutes.values()
        known = [any(event_id in ids for ids in minutes)
                 for event_id in events.column("event_id").to_pylist()]
        new = events.filter(pc.invert(pa.array(known, pa.bool_()))) if any(known) else events
        self._add(new.column("event_id").to_pylist(),
                  pc.cast(new.column("occurred_at"), pa.int64()).to_pylist())
        return new

    def remember(self, rows: pa.Table, now: datetime) -> None:
        """Rows counted (event_id, occurred_at): those at or after the floor are kept."""
        self._advance(now)
        times = pc.cast(rows.column("occurred_at"), pa.int64()).to_pylist()
        self._add(rows.column("event_id").to_pylist(), times)

    def _add(self, event_ids: Iterable[str], times: Iterable[int]) -> None:
        for event_id, at in zip(event_ids, times, strict=True):
            if at >= self._floor:
                minute = at // _BUCKET_US
                ids = self._minutes.get(minute)
                if ids is None:
                    ids = self._minutes[minute] = set()
                ids.add(event_id)

    def _advance(self, now: datetime) -> None:
        """Forget the minutes wholly before `now - span`; the floor rises to the first minute
        kept (never falls: a clock set back leaves the window as complete as it was)."""
        cutoff = _micros(now - self.span) // _BUCKET_US
        if cutoff * _BUCKET_US <= self._floor:
            return
        for minute in [m for m in self._minutes if m < cutoff]:
            del self._minutes[minute]
        self._floor = cutoff * _BUCKET_US
