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

from tally.wire import RejectedEvent, UsageRecorded

__all__ = [
    "MAX_EVENT_BYTES",
    "describe",
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
        return describe(error)


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
        return f"invalid JSON: {error}"
    if isinstance(document, dict):
        return [document]
    if not isinstance(document, list):
        return "body: Input should be a JSON object or an array of objects"
    if not document:
        return "body: the array is empty"
    return document


def describe(error: ValidationError) -> str:
    """Every problem as "field: message", joined; JSON syntax errors named as such."""
    problems = error.errors(include_url=False)
    if problems and problems[0]["type"] == "json_invalid":
        return f"invalid JSON: {problems[0]['msg'].removeprefix('Invalid JSON: ')}"
    return "; ".join(_describe_one(p) for p in problems)


def _describe_one(problem: ErrorDetails) -> str:
    field = ".".join(str(part) for part in problem["loc"]) or _TOP_LEVEL
    return f"{field}: {problem['msg']}"


# A reason names fields a sender made up; metrics get these few kinds instead.
_KINDS = (("empty message", "empty"), ("event too large", "too_large"),
          ("invalid JSON", "invalid_json"), ("body:", "not_an_object"),
          (f"{_TOP_LEVEL}:", "not_an_object"))


def reason_kind(reason: str) -> str:
    """The kind of a rejection reason, as the events-rejected metric labels it."""
    return next((kind for prefix, kind in _KINDS if reason.startswith(prefix)), "invalid_fields")


def rejection(original: bytes | None, reason: str, source: str, now: datetime) -> RejectedEvent:
    """The DLQ record: the bytes as they came (undecodable ones replaced), why, from where."""
    text = (original or b"").decode("utf-8", errors="replace")
    return RejectedEvent(reason=reason, source=source, original=text, rejected_at=now)
