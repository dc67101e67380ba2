"""identify.py and tally.identity: identities -> ids, enrichment, who may report for whom."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tally.config.models import User
from tally.identity import Directory, Principal, normalise_identity
from tally.services.ingest.identify import enrich, may_report
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


def labels(e: UsageRecorded) -> tuple[str | None, ...]:
    return e.role, e.department, e.project


@pytest.mark.parametrize("from_gateway", [True, False])
def test_enrich_replaces_the_identity_and_fills_attributes(from_gateway: bool) -> None:
    enriched = enrich(event("openai-user:ALICE"), DIRECTORY, from_gateway)
    assert (enriched.user_id, *labels(enriched)) == ("alice", "engineer", "platform", "atlas")


@pytest.mark.parametrize("from_gateway", [True, False])
def test_a_known_users_labels_are_users_yamls_whatever_the_event_says(from_gateway: bool) -> None:
    enriched = enrich(event("telegram:123456", role="lead", project="zeus"), DIRECTORY,
                      from_gateway)
    assert labels(enriched) == ("engineer", "platform", "atlas")
    # A label users.yaml leaves empty is empty: an event cannot put bob in project atlas.
    assert labels(enrich(event("bob", project="atlas"), DIRECTORY, from_gateway)) == (
        "intern", None, None)


def test_an_unclaimed_identity_keeps_labels_only_from_a_gateway() -> None:
    sent = event("discord:7", role="lead", project="zeus")
    assert labels(enrich(sent, DIRECTORY, from_gateway=True)) == ("lead", None, "zeus")
    stripped = enrich(sent, DIRECTORY, from_gateway=False)
    assert (stripped.user_id, *labels(stripped)) == ("discord:7", None, None, None)


def test_enrich_returns_the_same_event_when_nothing_changes() -> None:
    original = event("gw")
    assert enrich(original, DIRECTORY, from_gateway=True) is original


def test_may_report() -> None:
    alice = Principal("alice", "engineer")
    assert may_report(alice, "alice")
    assert not may_report(alice, "bob")
    assert may_report(Principal("gw", gateway=True), "bob")
    assert may_report(None, "bob")  # auth optional and no credentials sent
