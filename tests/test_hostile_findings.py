"""One regression test per finding of the attack on Tally with one user's key (issue 9),
named after it. Each runs the code that was harmed, at the smallest scale that shows it:
the ingest's real HTTP app, the projector's decoder and store on a real DuckDB file, the
enforcer's API, the logging of every service. The same inputs go through the real
services on the real broker in test_hostile_input.py.
"""

from __future__ import annotations

import io
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tally.kafka import Record
from tally.kafka_bulk import Columns
from tally.ops import Metrics
from tally.service import EscapingFormatter
from tally.services.enforcer.api import ApiError, limit_of
from tally.services.enforcer.app import decode_all
from tally.services.ingest.app import Intake, triage_records
from tally.services.ingest.http import create_app
from tally.services.projector import store
from tally.services.projector.decode import Decoder
from tally.services.projector.replay import decode as replay_decode
from tally.topics import Topics
from tally.wire import MAX_ORIGINAL_BYTES, BalanceUpdated, BudgetDecided, rejection
from tests.ingest.helpers import make_config, usage
from tests.ingest.test_http import ALICE, GATEWAY, MemoryPublisher, post

NOW = datetime.now(UTC)
RECENT = (NOW - timedelta(minutes=5)).isoformat()

POISON_PILLS: dict[str, dict[str, Any]] = {
    "year 9999": {"occurred_at": "9999-12-31T23:59:59Z"},
    "year 1 at +14:00": {"occurred_at": "0001-01-01T05:00:00+14:00"},
    "2^63 tokens": {"input_tokens": 2**63},
    "9e18 + 9e18 tokens": {"input_tokens": 9 * 10**18, "output_tokens": 9 * 10**18},
    "5e18 tokens": {"input_tokens": 5 * 10**18},
    "a string as a count": {"input_tokens": "100"},
    "a boolean as a count": {"output_tokens": True},
    "a float as a count": {"output_tokens": 1.5},
    "an hour and more ahead": {"occurred_at": (NOW + timedelta(hours=2)).isoformat()},
    "older than the window": {"occurred_at": (NOW - timedelta(days=3651)).isoformat()},
}


def pill(name: str, event_id: str = "pill") -> dict[str, Any]:
    return usage(event_id, **{"occurred_at": RECENT, **POISON_PILLS[name]})


# 1. a poison pill halts counting for everyone -------------------------------------------------


@pytest.mark.parametrize("name", POISON_PILLS)
async def test_poison_pill_is_refused_at_the_door_naming_the_field(name: str) -> None:
    publisher = MemoryPublisher()
    response = await post(make_config(), publisher, pill(name), ALICE)
    assert response.status_code == 400, response.text
    [detail] = response.json()["details"]
    fields = set(POISON_PILLS[name])
    assert any(detail["reason"].startswith(f"{field}:") for field in fields), detail
    assert publisher.events == [] and len(publisher.rejected) == 1


@pytest.mark.parametrize("name", POISON_PILLS)
def test_poison_pill_on_usage_raw_goes_to_the_dlq(name: str) -> None:
    record = Record("t.usage.raw", 0, 7, None, orjson.dumps(pill(name)), 0)
    accepted, rejected = triage_records([record], Intake.of(make_config()), NOW)
    assert accepted == []
    assert [r.source for r in rejected] == ["kafka:t.usage.raw[0]@7"]


def test_poison_pills_written_straight_to_usage_events_do_not_stop_counting(
        tmp_path: Path) -> None:
    """A broken producer may bypass the ingest: the projector refuses the same pills,
    column-wise or one by one, and counts the good events of the same batch."""
    decoder = Decoder.of(make_config().budgets.per_user_budgets)
    values = [orjson.dumps(pill(name, f"p{i}")) for i, name in enumerate(POISON_PILLS)
              if name not in ("an hour and more ahead", "older than the window")]
    values += [orjson.dumps(usage("good-1", occurred_at=RECENT)),
               orjson.dumps(usage("good-2", occurred_at=RECENT, input_tokens=10**9))]
    records = [Record("t.usage.events", 0, i, b"alice", v, 0) for i, v in enumerate(values)]
    table, skipped = decoder.events(records)
    assert table.column("event_id").to_pylist() == ["good-1", "good-2"]
    assert len(skipped) == len(values) - 2
    assert all(reason.startswith("projector: not a countable usage event") for _, reason in
               skipped)
    with store.connect(tmp_path / "p.duckdb") as con:
        store.apply_batch(con, table, {("t.usage.events", 0): len(values)})
        assert sum(store.load_usages(con)["alice"].periods["monthly"].values()) == 120 + 10**9 + 20


def test_two_events_of_5e18_tokens_cannot_overflow_a_balance() -> None:
    decoder = Decoder.of(make_config().budgets.per_user_budgets)
    records = [Record("t.usage.events", 0, i, None, orjson.dumps(pill("5e18 tokens", f"e{i}")),
                      0) for i in range(2)]
    table, skipped = decoder.events(records)
    assert table.num_rows == 0 and len(skipped) == 2


def test_replay_skips_what_the_live_projector_dead_letters() -> None:
    decoder = Decoder.of(make_config().budgets.per_user_budgets)
    topics = Topics("t")
    fetched = Columns(topics.usage_events, [orjson.dumps(pill("year 9999")),
                                            orjson.dumps(usage("ok", occurred_at=RECENT))],
                      [0, 0], [0, 1], next_offsets={(topics.usage_events, 0): 2})
    decoded = replay_decode(decoder, fetched)
    assert decoded.events.column("event_id").to_pylist() == ["ok"]
    assert [r.offset for r, _ in decoded.skipped] == [0]
    assert decoded.offsets == {(topics.usage_events, 0): 2}


# 2. an oversized record stops the ingest --------------------------------------------------


def test_an_oversized_record_keeps_a_bounded_prefix_its_size_and_hash() -> None:
    original = "é".encode() * 500_000 + b"\xff" * 100  # ~1 MB, non-ASCII and not UTF-8
    dead = rejection(original, "event too large", "kafka:t.usage.raw[0]@1", NOW)
    assert dead.original_size == len(original) and dead.original_truncated
    assert dead.original_sha256 is not None and len(dead.original_sha256) == 64
    assert len(dead.original.encode()) <= MAX_ORIGINAL_BYTES
    assert len(dead.model_dump_json()) < 2 * MAX_ORIGINAL_BYTES  # far below the topic's 1 MB


def test_an_oversized_record_on_usage_raw_is_dead_lettered_not_fatal() -> None:
    huge = Record("t.usage.raw", 2, 9, None, "€".encode() * 340_000, 0)
    accepted, [dead] = triage_records([huge], Intake.of(make_config()), NOW)
    assert accepted == [] and dead.reason.startswith("event too large")
    assert len(dead.model_dump_json().encode()) < 64 * 1024


# 5. anyone can charge a shared budget --------------------------------------------------------


async def test_a_user_cannot_charge_a_project_budget_by_labelling_an_event() -> None:
    publisher = MemoryPublisher()
    body = usage(occurred_at=RECENT, project="atlas", department="sales", role="admin")
    assert (await post(make_config(), publisher, body, ALICE)).status_code == 202
    [event] = publisher.events
    assert (event.role, event.department, event.project) == ("engineer", "research", None)


async def test_only_a_gateway_labels_an_identity_nobody_claims() -> None:
    publisher = MemoryPublisher()
    body = usage(occurred_at=RECENT, user_id="discord:77", project="atlas")
    assert (await post(make_config(), publisher, body, GATEWAY)).status_code == 202
    assert publisher.events[0].project == "atlas"


# 6. the smaller ones -------------------------------------------------------------------------


@pytest.mark.parametrize("limit", ["²", "٣", "-1", "1e3", "", "0", "100001"])
def test_alerts_limit_that_is_not_a_number_is_400_not_500(limit: str) -> None:
    class Request:
        def __init__(self) -> None:
            self.query_params = {"limit": limit}

    with pytest.raises(ApiError) as caught:
        limit_of(Request())  # type: ignore[arg-type]
    assert caught.value.status == 400


def test_a_newline_in_a_user_id_cannot_forge_a_log_line() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("tally.test.forge")
    logger.addHandler(handler)
    try:
        logger.warning("alert for %s", "bob\nINFO granted admin to mallory")
    finally:
        logger.removeHandler(handler)
    assert out.getvalue() == "WARNING alert for bob\\x0aINFO granted admin to mallory\n"


def test_a_user_id_with_control_characters_is_refused_at_the_door() -> None:
    record = Record("t.usage.raw", 0, 1, None,
                    orjson.dumps(usage(occurred_at=RECENT, user_id="bob\nINFO x")), 0)
    accepted, [dead] = triage_records([record], Intake.of(make_config()), NOW)
    assert accepted == [] and dead.reason == "user_id: must not contain control characters"


async def test_a_body_that_is_not_utf8_is_400_and_counted_as_rejected() -> None:
    publisher, metrics = MemoryPublisher(), Metrics()
    app = create_app(make_config(), publisher, metrics=metrics)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://ingest") as client:
        response = await client.post("/v1/usage", content=b"\xff" * 1_000_000, headers=ALICE)
    assert response.status_code == 400
    assert response.json()["details"] == ["not UTF-8: byte 0xff at offset 0"]
    [dead] = publisher.rejected
    assert dead.original_size == 1_000_000 and dead.original_truncated
    assert metrics.events_rejected.labels("not_utf8")._value.get() == 1


def test_garbage_on_the_snapshot_topics_is_skipped_not_fatal() -> None:
    """What a broken producer writes to budget.decisions or budget.balances: skipped."""
    garbage = [b"", b"{", b"[]", b'{"user_id": "x"}', "é".encode() * 10,
               orjson.dumps({"user_id": "x", "daily": {"9999-99": 1}, "monthly": {},
                             "last_event_at": RECENT, "as_of": RECENT}),
               orjson.dumps({"user_id": "x", "daily": {RECENT: 2**63}, "monthly": {},
                             "last_event_at": RECENT, "as_of": RECENT})]
    records = [Record("t.budget.x", 0, i, b"x", v, 0) for i, v in enumerate(garbage)]
    assert decode_all(BalanceUpdated, records) == []
    assert decode_all(BudgetDecided, records) == []
