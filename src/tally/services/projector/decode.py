"""Kafka records -> Arrow tables in the ledger's columns, computed with the pure core.

usage.events holds what ingest already validated, so a batch is first decoded whole, in
C++: its values joined as JSON lines and read by `pyarrow.json.read_json` (~2 us an event,
and the GIL released), the counted tokens summed column-wise and the period starts taken
from the core's `Calendar` once per window the batch touches (one start column per period
kind). Anything that path does not
accept exactly (a missing or null field, a wrong type, a time without a zone, an empty
id, a value outside the wire contract's ranges) sends the whole batch down the per-record
path: orjson and a few dict lookups (~8 us an event), where a record that still fails to
decode is returned as skipped, with the reason: it must never stop the projector. Both
paths give the same rows for the same records.

The ranges are checked again here although the ingest enforces them, because a producer
may write to usage.events directly: a token count past MAX_TOKENS could overflow a sum, a
time past LATEST_EVENT the period arithmetic.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import duckdb
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

from tally.config.models import PerUserBudgets, TokenField
from tally.core.periods import Calendar, Window, calendar_for
from tally.core.usage import counted_tokens
from tally.kafka import Record, next_offsets
from tally.service import error_text
from tally.services.projector import store
from tally.services.projector.store import LEDGER_ARROW, REJECTED_ARROW, start_column
from tally.topics import Topics
from tally.wire import (
    CONTROL_CHARACTERS,
    EARLIEST_EVENT,
    LATEST_EVENT,
    MAX_TEXT,
    MAX_TOKENS,
    PERIOD_NAMES,
    PeriodName,
    UsageRecorded,
)

__all__ = ["RECORD_FAULTS", "Decoded", "Decoder", "Skipped", "rejected"]

Skipped = list[tuple[Record, str]]  # records that cannot be counted, and why

log = logging.getLogger(__name__)

_OPTIONAL = ("provider", "session_key", "channel", "source", "role", "department", "project")
_TEXTS = (*_OPTIONAL, "request_id")  # request_id is checked, not stored
_REQUIRED = ("event_id", "user_id", "model")
_COUNTS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens")
_FIELDS = frozenset(UsageRecorded.model_fields)
_TS = LEDGER_ARROW.field("occurred_at").type
_JSON_SCHEMA = pa.schema(
    [(name, pa.string()) for name in ("occurred_at", *_REQUIRED, *_TEXTS)]
    + [(name, pa.int64()) for name in _COUNTS])
_PARSE = pj.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore")
# One thread: the projector's other stages (Kafka fetch, DuckDB) use the other core.
_READ = pj.ReadOptions(use_threads=False, block_size=64 * 1024 * 1024)
_MAX_WINDOWS = 64  # more changes of period than this in one batch: the per-record path


@dataclass(frozen=True)
class Decoder:
    """Decodes batches under one budgets config (its reset schedule and counted tokens)."""

    calendar: Calendar
    counted: tuple[TokenField, ...]

    @classmethod
    def of(cls, budgets: PerUserBudgets) -> Decoder:
        return cls(calendar_for(budgets.reset_schedule), budgets.counted_tokens)

    def events(self, records: Iterable[Record]) -> tuple[pa.Table, Skipped]:
        """usage.events records -> a table in LEDGER_ARROW, and the records skipped."""
        batch = list(records)
        table = self.whole([r.value for r in batch], [r.partition for r in batch],
                           [r.offset for r in batch])
        return (table, []) if table is not None else self.one_by_one(batch)

    def whole(self, values: Sequence[bytes | None], partitions: Sequence[int],
              offsets: Sequence[int]) -> pa.Table | None:
        """The batch decoded column-wise, or None if any record needs the per-record path."""
        if not values or not all(values):
            return None
        lines = b"\n".join(cast(Sequence[bytes], values))
        if not _objects_one_per_line(lines, len(values)):
            return None
        try:
            raw = pj.read_json(io.BytesIO(lines), read_options=_READ, parse_options=_PARSE)
            at = pc.cast(raw.column("occurred_at"), _TS)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        if (raw.num_rows != len(values) or not _well_formed(raw, _may_escape(lines))
                or not _in_time_range(at)):
            return None
        starts = self._starts(at)
        if starts is None:
            return None
        return _ledger_table(raw, at, self._tokens(raw), starts,
                             pa.array(partitions, pa.int32()), pa.array(offsets, pa.int64()))

    def _tokens(self, raw: pa.Table) -> pa.ChunkedArray:
        total = pa.chunked_array([pa.repeat(0, raw.num_rows)], pa.int64())
        for name in self.counted:
            total = pc.add_checked(total, raw.column(name))
        return total

    def _starts(self, at: pa.ChunkedArray) -> dict[PeriodName, pa.ChunkedArray] | None:
        """Per period kind, the start of every instant's period, from the windows touched."""
        touched = _windows_touched(self.calendar, at)
        if touched is None:
            return None
        of_kind: dict[PeriodName, dict[datetime, Window]] = {}
        for windows in touched:
            for window in windows:
                of_kind.setdefault(window.kind, {})[window.start] = window
        return {kind: _start_in(at, list(windows.values())) for kind, windows in of_kind.items()}

    def one_by_one(self, records: Iterable[Record]) -> tuple[pa.Table, Skipped]:
        """The per-record path: a record that fails to decode is logged and skipped."""
        rows = []
        skipped: Skipped = []
        for record in records:
            try:
                rows.append(self.event_row(record))
            except Exception as e:  # whatever a record holds, the others are still counted
                reason = f"projector: not a countable usage event: {error_text(e)}"
                log.error("skipping usage event %s: %s", record.source, reason)
                skipped.append((record, reason))
        columns = zip(*rows, strict=True) if rows else ([] for _ in LEDGER_ARROW.names)
        return pa.table(list(map(list, columns)), schema=LEDGER_ARROW), skipped

    def event_row(self, record: Record) -> tuple[Any, ...]:
        """One event as a tuple in LEDGER_ARROW's column order (tuples transpose fast),
        checked by the wire contract itself. Unknown keys are ignored, as the column-wise
        path ignores them, so both paths count the same records."""
        data = orjson.loads(record.value or b"")
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        event = UsageRecorded.model_validate({k: data[k] for k in _FIELDS if k in data})
        at = event.occurred_at.astimezone(UTC)
        starts = {window.kind: window.start for window in self.calendar.windows_at(at)}
        return (
            event.event_id, event.user_id, at, event.model, event.provider,
            event.input_tokens, event.output_tokens, event.cache_read_tokens,
            event.cache_write_tokens, counted_tokens(event, self.counted),
            *(starts[kind] for kind in PERIOD_NAMES),
            *(getattr(event, name) for name in _OPTIONAL[1:]),
            record.partition, record.offset,
        )


def _objects_one_per_line(lines: bytes, count: int) -> bool:
    """Each of `count` records on a line of its own, opening a JSON object: what the
    column-wise reader may be given. A record of `null` crashes pyarrow's JSON reader
    (26.0.1: a segmentation fault, found by the hostile-input suite), and a newline in a
    record would split it in two. Counted in C: 0.01 us an event, where a Python check of
    each record took 0.5."""
    return (lines[:1] == b"{" and lines.count(b"\n") == count - 1
            and lines.count(b"\n{") == count - 1)


def _may_escape(lines: bytes) -> bool:
    """Whether a text may hold a control character: JSON has them only as escapes (a raw one
    is invalid JSON), or as DEL. Without a backslash the regex per column is skipped."""
    return b"\\" in lines or b"\x7f" in lines


def _well_formed(raw: pa.Table, may_escape: bool) -> bool:
    """What the per-record path checks one by one, checked column-wise."""
    columns = [raw.column(name) for name in ("occurred_at", *_REQUIRED, *_COUNTS)]
    if any(column.null_count for column in columns):
        return False
    nonempty = all(pc.min(pc.utf8_length(raw.column(name))).as_py() > 0 for name in _REQUIRED)
    return (nonempty and all(_within(raw.column(name), 0, MAX_TOKENS) for name in _COUNTS)
            and all(_plain(raw.column(name), may_escape) for name in (*_REQUIRED, *_TEXTS)))


def _plain(texts: pa.ChunkedArray, may_escape: bool) -> bool:
    """Within the wire's text rule: at most MAX_TEXT characters, no control characters."""
    if texts.null_count == len(texts):
        return True
    if pc.max(pc.utf8_length(texts)).as_py() > MAX_TEXT:
        return False
    return not may_escape or not pc.any(
        pc.match_substring_regex(texts, CONTROL_CHARACTERS)).as_py()


_ONE_MICROSECOND = timedelta(microseconds=1)


def _in_time_range(at: pa.ChunkedArray) -> bool:
    return _within(at, EARLIEST_EVENT, LATEST_EVENT - _ONE_MICROSECOND)


def _within(column: pa.ChunkedArray, low: Any, high: Any) -> bool:
    bounds = pc.min_max(column)
    return bool(bounds["min"].as_py() >= low and bounds["max"].as_py() <= high)


def _windows_touched(calendar: Calendar, at: pa.ChunkedArray,
                     ) -> list[tuple[Window, ...]] | None:
    """The windows (one per period kind) holding some instant of `at`, in time order; None
    past _MAX_WINDOWS. Walks from the earliest instant to the next end of a window, jumping
    over stretches without events."""
    found: list[tuple[Window, ...]] = []
    earliest = pc.min(at).as_py()
    while earliest is not None:
        if len(found) == _MAX_WINDOWS:
            return None
        windows = calendar.windows_at(earliest)
        found.append(windows)
        later = pc.greater_equal(at, pa.scalar(min(w.end for w in windows), _TS))
        earliest = pc.min(pc.filter(at, later)).as_py()
    return found


def _start_in(at: pa.ChunkedArray, windows: list[Window]) -> pa.ChunkedArray:
    """Per instant, the start of the window (of consecutive `windows`) that holds it."""
    start = pa.scalar(windows[0].start, _TS)
    starts = pa.chunked_array([pa.repeat(start, len(at))], _TS)
    for window in windows[1:]:
        starts = pc.if_else(pc.greater_equal(at, pa.scalar(window.start, _TS)),
                            pa.scalar(window.start, _TS), starts)
    return starts


def _ledger_table(raw: pa.Table, at: pa.ChunkedArray, tokens: pa.ChunkedArray,
                  starts: dict[PeriodName, pa.ChunkedArray], partitions: pa.Array,
                  offsets: pa.Array) -> pa.Table:
    columns = {
        **{name: raw.column(name) for name in raw.column_names},
        "occurred_at": at, "tokens": tokens,
        **{start_column(kind): column for kind, column in starts.items()},
        "topic_partition": partitions, "topic_offset": offsets,
    }
    return pa.table([columns[name] for name in LEDGER_ARROW.names], schema=LEDGER_ARROW)


def rejected(records: Iterable[Record]) -> pa.Table:
    """usage.dlq records -> a table in REJECTED_ARROW; bad records are skipped."""
    rows = []
    for record in records:
        try:
            rows.append(_rejected_row(record))
        except Exception as e:  # a DLQ record is informative: never worth a stop
            log.error("skipping undecodable rejected event %s: %s", record.source,
                      error_text(e))
    return pa.Table.from_pylist(rows, schema=REJECTED_ARROW)


def _rejected_row(record: Record) -> dict[str, Any]:
    data = orjson.loads(record.value or b"")
    at = data.get("rejected_at")
    return {"reason": _text(data["reason"]), "source": _optional(data.get("source")),
            "original": _optional(data.get("original")), "rejected_at": at and _instant(at),
            "partition": record.partition, "offset": record.offset}


def _instant(text: str) -> datetime:
    at = datetime.fromisoformat(text)
    if at.tzinfo is None:
        raise ValueError(f"{text!r} has no time zone")
    return at.astimezone(UTC)


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise TypeError(f"expected a non-empty string, got {value!r}")
    return value


def _optional(value: Any) -> str | None:
    # A wrong type here would fail the Arrow conversion of the whole batch.
    if value is not None and not isinstance(value, str):
        raise TypeError(f"expected a string or null, got {value!r}")
    return value


# a batch, decoded ---------------------------------------------------------------------------

# What a batch's own contents can raise, as opposed to the broker going away: such a batch
# is split until the record at fault is found.
RECORD_FAULTS = (duckdb.Error, pa.ArrowException, ValueError, TypeError, KeyError,
                 ArithmeticError)


@dataclass(frozen=True)
class Decoded:
    """A batch of both topics, decoded, with the offsets to store along with it, and the
    usage.events records that cannot be counted (the live projector dead-letters them)."""

    events: pa.Table
    rejected: pa.Table
    offsets: dict[tuple[str, int], int]
    skipped: Skipped = field(default_factory=list)

    @classmethod
    def of(cls, decoder: Decoder, topics: Topics, records: list[Record]) -> Decoded:
        events, dlq = topics.usage_events, topics.usage_dlq
        table, skipped = decoder.events(r for r in records if r.topic == events)
        return cls(table, rejected(r for r in records if r.topic == dlq),
                   next_offsets(records), skipped)

    def apply(self, into: store.DuckDBStore) -> set[str]:
        """One transaction: the same write path for the live projector and replay."""
        return into.apply(self.events, self.offsets, self.rejected)

    @classmethod
    def joined(cls, batches: list[Decoded]) -> Decoded:
        """Consecutive batches as one (what they skipped is dead-lettered already)."""
        offsets: dict[tuple[str, int], int] = {}
        for batch in batches:  # in order: a later batch's offset is the higher
            offsets |= batch.offsets
        return cls(pa.concat_tables([b.events for b in batches]),
                   pa.concat_tables([b.rejected for b in batches]), offsets)
