"""identify.py and tally.identity: identities -> ids, enrichment, who may report for whom."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.ingest.identify import enrich, may_report
from tally.config.models import User
from tally.identity import Directory, Principal, normalise_identity
from tally.wire import UsageRecorded

USERS = (
    User(id="alice", role="engineer", department="platform", project="atlas",
         identities=("telegram:123456", "openai-user:Alice")),
    User(id="bob", role="intern", identities=("slack:U42",)),
    User(id="gw", gateway=True),
)
DIRECTORY = Directory.from_users(USERS)


def event(user_id: str, **fields: str) -> UsageRecorded:
    return UsageRecorded(event_id="e1", occurred_at=datetime(2025, 3, 1, tzinfo=UTC),
                         user_id=user_id, model="m", input_tokens=1, output_tokens=1,
                         **fields)


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        ("alice", "alice"),
        ("telegram:123456", "alice"),
        ("openai-user:alice", "alice"),
        ("openai-user:ALICE", "alice"),
        ("OpenAI-User:Alice", "alice"),
        ("slack:U42", "bob"),
    ],
)
def test_claimed_identities_resolve_to_the_user(identity: str, expected: str) -> None:
    assert DIRECTORY.resolve(identity) == expected


def test_only_openai_user_names_ignore_case() -> None:
    assert DIRECTORY.resolve("Telegram:123456") == "Telegram:123456"
    assert DIRECTORY.resolve("slack:u42") == "slack:u42"


def test_an_unclaimed_identity_stays_itself_normalised() -> None:
    assert DIRECTORY.resolve("telegram:999") == "telegram:999"
    assert DIRECTORY.resolve("openai-user:Carol") == "openai-user:carol"


def test_a_user_id_wins_over_an_identity() -> None:
    users = (User(id="x", identities=("y",)), User(id="y"))
    assert Directory.from_users(users).resolve("y") == "y"


def test_normalise_identity() -> None:
    assert normalise_identity("openai-user:Bob") == "openai-user:bob"
    assert normalise_identity("telegram:Bob") == "telegram:Bob"


def test_enrich_replaces_the_identity_and_fills_attributes() -> None:
    enriched = enrich(event("openai-user:ALICE"), DIRECTORY)
    assert (enriched.user_id, enriched.role, enriched.department, enriched.project) == (
        "alice", "engineer", "platform", "atlas")


def test_enrich_keeps_what_the_event_says() -> None:
    enriched = enrich(event("telegram:123456", role="lead", project="zeus"), DIRECTORY)
    assert (enriched.role, enriched.department, enriched.project) == (
        "lead", "platform", "zeus")


def test_enrich_leaves_unknown_identities_without_attributes() -> None:
    enriched = enrich(event("discord:7"), DIRECTORY)
    assert (enriched.user_id, enriched.role) == ("discord:7", None)


def test_enrich_returns_the_same_event_when_nothing_changes() -> None:
    original = event("gw")
    assert enrich(original, DIRECTORY) is original


def test_may_report() -> None:
    alice = Principal("alice", "engineer")
    assert may_report(alice, "alice")
    assert not may_report(alice, "bob")
    assert may_report(Principal("gw", gateway=True), "bob")
    assert may_report(None, "bob")  # auth optional and no credentials sent
