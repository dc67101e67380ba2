"""Raw bytes -> a valid `UsageRecorded`, or a reason that names every bad field.

Pure: no I/O. A reason reads like "input_tokens: Input should be greater than or equal to
0; model: Field required", so a DLQ reader or an HTTP caller sees what to fix. Invalid JSON
is named as such ("invalid JSON: ...") rather than as a field problem.
"""

from __future__ import annotations

from datetime import datetime

import orjson
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from tally.config.models import EventTimeWindow
from tally.wire import MAX_REASON_CHARS, UsageRecorded, bounded_text, rejection

__all__ = [
    "MAX_EVENT_BYTES",
    "admit",
    "describe",
    "not_utf8",
    "parse_batch",
    "parse_event",
    "reason_kind",
    "rejection",
    "validate_object",
]

MAX_EVENT_BYTES = 64 * 1024  # one usage event is ~500 bytes; anything near this is abuse

_TOP_LEVEL = "event"  # how a problem with the whole document (not a field) is named


def parse_event(raw: bytes | None) -> UsageRecorded | str:
    """One Kafka message value: the event, or why it was refused."""
    if not raw:
        return "empty message"
    if len(raw) > MAX_EVENT_BYTES:
        return f"event too large: {len(raw)} bytes > {MAX_EVENT_BYTES}"
    try:
        # pydantic's own JSON parser: one pass, no intermediate dict (~2x faster).
        return UsageRecorded.model_validate_json(raw)
    except ValidationError as error:
        return not_utf8(raw) or describe(error)


def validate_object(obj: object) -> UsageRecorded | str:
    """An already-decoded JSON value (one element of an HTTP batch)."""
    if not isinstance(obj, dict):
        return f"{_TOP_LEVEL}: Input should be a JSON object"
    try:
        return UsageRecorded.model_validate(obj)
    except ValidationError as error:
        return describe(error)


def parse_batch(body: bytes) -> list[object] | str:
    """An HTTP body: one event object or a JSON array of them, as decoded JSON values."""
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:
        return not_utf8(body) or bounded_text(f"invalid JSON: {error}", MAX_REASON_CHARS)
    if isinstance(document, dict):
        return [document]
    if not isinstance(document, list):
        return "body: Input should be a JSON object or an array of objects"
    if not document:
        return "body: the array is empty"
    return document


def admit(event: UsageRecorded, window: EventTimeWindow, now: datetime) -> UsageRecorded | str:
    """The event, or why its time is too far from the ingest's clock `now`: a time in the
    future would count against a period nobody is in yet, a very old one rewrites history."""
    at = event.occurred_at
    if at > now + window.future_tolerance:
        return (f"occurred_at: {at.isoformat()} is more than "
                f"{window.future_tolerance_minutes} minutes ahead of the ingest's clock "
                f"({now.isoformat(timespec='seconds')})")
    if at < now - window.max_age:
        return (f"occurred_at: {at.isoformat()} is more than {window.max_age_days} days "
                f"before the ingest's clock ({now.isoformat(timespec='seconds')})")
    return event


def not_utf8(raw: bytes) -> str | None:
    """Why `raw` is not UTF-8 (JSON must be), or None. Only called once parsing failed."""
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"not UTF-8: byte 0x{raw[error.start]:02x} at offset {error.start}"
    return None


def describe(error: ValidationError) -> str:
    """Every problem as "field: message", joined; JSON syntax errors named as such."""
    problems = error.errors(include_url=False)
    if problems and problems[0]["type"] == "json_invalid":
        return bounded_text(
            f"invalid JSON: {problems[0]['msg'].removeprefix('Invalid JSON: ')}",
            MAX_REASON_CHARS)
    return bounded_text("; ".join(_describe_one(p) for p in problems), MAX_REASON_CHARS)


_MAX_FIELD_NAME = 100  # an unknown key is the sender's text: it may be megabytes long

_MESSAGES = {  # pydantic's wording where it would show our regular expression instead
    "string_pattern_mismatch": "must not contain control characters",
}


def _describe_one(problem: ErrorDetails) -> str:
    field = ".".join(str(part) for part in problem["loc"]) or _TOP_LEVEL
    message = _MESSAGES.get(problem["type"], problem["msg"])
    return f"{bounded_text(field, _MAX_FIELD_NAME)}: {message}"


# A reason names fields a sender made up; metrics get these few kinds instead.
_KINDS = (("empty message", "empty"), ("event too large", "too_large"),
          ("not UTF-8", "not_utf8"),
          ("invalid JSON", "invalid_json"), ("body:", "not_an_object"),
          (f"{_TOP_LEVEL}:", "not_an_object"))


def reason_kind(reason: str) -> str:
    """The kind of a rejection reason, as the events-rejected metric labels it."""
    return next((kind for prefix, kind in _KINDS if reason.startswith(prefix)), "invalid_fields")
