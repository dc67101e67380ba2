"""validate.py: raw bytes -> UsageRecorded, or a reason that names the bad fields."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from tally.services.ingest.validate import (
    MAX_EVENT_BYTES,
    parse_batch,
    parse_event,
    reason_kind,
    rejection,
    validate_object,
)
from tally.wire import UsageRecorded

GOOD = {
    "event_id": "e-1",
    "occurred_at": "2025-03-01T12:00:00Z",
    "user_id": "alice",
    "model": "anthropic/claude-sonnet-4",
    "input_tokens": 120,
    "output_tokens": 30,
}


def raw(**changes: object) -> bytes:
    return orjson.dumps({**GOOD, **changes})


def test_a_valid_event_parses() -> None:
    event = parse_event(raw())
    assert isinstance(event, UsageRecorded)
    assert (event.user_id, event.input_tokens, event.cache_read_tokens) == ("alice", 120, 0)


def test_negative_tokens_name_the_field() -> None:
    assert parse_event(raw(input_tokens=-5)) == (
        "input_tokens: Input should be greater than or equal to 0"
    )


def test_every_bad_field_is_named() -> None:
    reason = parse_event(orjson.dumps({"event_id": "e", "output_tokens": "many"}))
    assert isinstance(reason, str)
    for field in ("occurred_at", "user_id", "model", "input_tokens", "output_tokens"):
        assert f"{field}: " in reason


def test_unknown_fields_are_refused() -> None:
    assert parse_event(raw(tokens=3)) == "tokens: Extra inputs are not permitted"


def test_naive_timestamps_are_refused() -> None:
    reason = parse_event(raw(occurred_at="2025-03-01T12:00:00"))
    assert reason == "occurred_at: Input should have timezone info"


@pytest.mark.parametrize("value", [b"{", b"not json", b'{"a": 1,}'])
def test_malformed_json_is_named_as_json(value: bytes) -> None:
    reason = parse_event(value)
    assert isinstance(reason, str) and reason.startswith("invalid JSON: ")


@pytest.mark.parametrize(("value", "offset"), [(b"\xff\xfe", 0), (b'{"model": "a\xc3"}', 12)])
def test_bytes_that_are_not_utf8_are_named_as_such(value: bytes, offset: int) -> None:
    reason = parse_event(value)
    assert reason == f"not UTF-8: byte 0x{value[offset]:02x} at offset {offset}"
    assert parse_batch(value) == reason
    assert reason_kind(reason) == "not_utf8"


@pytest.mark.parametrize("value", [b"[1, 2]", b'"alice"', b"42"])
def test_a_document_that_is_not_an_object(value: bytes) -> None:
    assert parse_event(value) == "event: Input should be an object"


def test_empty_and_oversized_messages() -> None:
    assert parse_event(None) == "empty message"
    assert parse_event(b"") == "empty message"
    huge = raw(model="m" * MAX_EVENT_BYTES)
    assert parse_event(huge) == f"event too large: {len(huge)} bytes > {MAX_EVENT_BYTES}"


def test_validate_object_refuses_non_objects() -> None:
    assert validate_object([GOOD]) == "event: Input should be a JSON object"
    assert isinstance(validate_object(dict(GOOD)), UsageRecorded)


def test_parse_batch_accepts_one_object_or_an_array() -> None:
    assert parse_batch(orjson.dumps(GOOD)) == [GOOD]
    assert parse_batch(orjson.dumps([GOOD, GOOD])) == [GOOD, GOOD]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[]", "body: the array is empty"),
        (b"3", "body: Input should be a JSON object or an array of objects"),
    ],
)
def test_parse_batch_refusals(body: bytes, reason: str) -> None:
    assert parse_batch(body) == reason


def test_parse_batch_names_bad_json() -> None:
    reason = parse_batch(b"[{")
    assert isinstance(reason, str) and reason.startswith("invalid JSON: ")


def test_rejection_keeps_the_original_bytes() -> None:
    now = datetime(2025, 3, 1, tzinfo=UTC)
    record = rejection(b"{\xff", "invalid JSON: x", "kafka:usage.raw[0]@7", now)
    assert record.original == "{\ufffd"
    assert (record.reason, record.source, record.rejected_at) == (
        "invalid JSON: x", "kafka:usage.raw[0]@7", now)


@pytest.mark.parametrize(("raw", "kind"), [
    (b"", "empty"), (b"{not json", "invalid_json"), (b"[1]", "not_an_object"),
    (b" " * (MAX_EVENT_BYTES + 1), "too_large"), (orjson.dumps({**GOOD, "mystery": 1}),
                                                   "invalid_fields"),
])
def test_reasons_come_in_a_few_kinds_for_metrics(raw: bytes, kind: str) -> None:
    reason = parse_event(raw)
    assert isinstance(reason, str) and reason_kind(reason) == kind
