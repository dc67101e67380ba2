"""The admin report: every configured or seen user, labels from users.yaml first."""

from __future__ import annotations

import hashlib
from typing import Any

from tally.config.models import Config
from tally.core.policy import decide
from tally.core.report import budget_row, budgets_report, known_usages, with_identities
from tally.core.usage import UserUsage, fold_events
from tally.identity import api_key_digest

from .corekit import event, utc

NOW = utc(2026, 5, 10, 18)


def config(**budget_fields: Any) -> Config:
    return Config.model_validate(
        {
            "users": {
                "user_identification": {
                    "users": [
                        {"id": "ann", "role": "admin", "department": "research"},
                        {"id": "ben"},
                    ]
                }
            },
            "budgets": {
                "per_user_budgets": {
                    "default_limits": {"daily_tokens": 1000, "monthly_tokens": 10000},
                    "role_limits": {"admin": 5000, "viewer": 10},
                    **budget_fields,
                }
            },
        }
    )


def usages(*events: Any) -> dict[str, UserUsage]:
    return fold_events(list(events), config().budgets.per_user_budgets)


def test_configured_users_without_events_are_listed() -> None:
    result = budgets_report({}, config(), NOW)
    assert [row["user_id"] for row in result["users"]] == ["ann", "ben"]
    ann = result["users"][0]
    assert (ann["daily_used"], ann["daily_limit"], ann["status"]) == (0, 5000, "ok")


def test_users_seen_only_in_events_are_listed_in_order() -> None:
    result = budgets_report(usages(event("aaron", NOW, 5), event("zed", NOW, 7)), config(), NOW)
    assert [row["user_id"] for row in result["users"]] == ["aaron", "ann", "ben", "zed"]


def test_row_shape() -> None:
    [row] = [
        r
        for r in budgets_report(usages(event("ben", NOW, 300)), config(), NOW)["users"]
        if r["user_id"] == "ben"
    ]
    assert list(row) == [
        "user_id",
        "daily_used",
        "daily_limit",
        "daily_remaining",
        "monthly_used",
        "monthly_limit",
        "status",
        "decision",
    ]
    assert (row["daily_used"], row["daily_remaining"], row["monthly_used"]) == (300, 700, 300)
    assert row["decision"]["user_id"] == "ben"
    assert row["decision"]["as_of"] == "2026-05-10T18:00:00Z"


def test_users_yaml_labels_win_over_event_labels() -> None:
    found = known_usages(usages(event("ann", NOW, 5, role="viewer", project="atlas")), config())
    # users.yaml leaves ann's project empty: an event cannot charge her to project atlas.
    assert (found["ann"].role, found["ann"].department, found["ann"].project) == (
        "admin",
        "research",
        None,
    )


def test_event_labels_do_not_fill_in_for_a_users_yaml_user() -> None:
    found = known_usages(usages(event("ben", NOW, 5, role="viewer")), config())
    assert found["ben"].role is None


def test_group_budget_counts_members_seen_only_in_events() -> None:
    cfg = config(department_budgets={"research": {"daily_tokens": 100, "monthly_tokens": 10000}})
    result = budgets_report(usages(event("x", NOW, 150, department="research")), cfg, NOW)
    ann = next(row for row in result["users"] if row["user_id"] == "ann")
    assert (ann["status"], ann["decision"]["budget"]) == ("over_limit", "department:research")


def test_budget_row_reads_the_decision() -> None:

    decision = decide(
        usages(event("ben", NOW, 1200))["ben"], config().budgets.per_user_budgets, NOW
    )
    row = budget_row(decision)
    assert (row["status"], row["daily_remaining"]) == ("over_limit", 0)


# The same vector is checked by the plugin's unit tests (integrations/openclaw/test/
# frontdoor.test.js), so both sides compute one digest.
KEY = "ak_alice_0123456789"
KEY_DIGEST = "sha256:" + hashlib.sha256(b"tally.api_key.v1\x00" + KEY.encode()).hexdigest()


def test_a_decision_carries_its_users_key_digest_and_the_report_hides_it() -> None:
    keyed = Config.model_validate({
        "users": {"user_identification": {"users": [
            {"id": "ann", "api_key": KEY, "identities": ["openai-user:Ann"]}, {"id": "ben"}]}},
        "budgets": {"per_user_budgets": {
            "default_limits": {"daily_tokens": 1000, "monthly_tokens": 10000}}}})
    budgets = keyed.budgets.per_user_budgets
    ann = with_identities(decide(UserUsage("ann"), budgets, NOW), keyed)
    ben = with_identities(decide(UserUsage("ben"), budgets, NOW), keyed)
    assert api_key_digest(KEY) == KEY_DIGEST
    assert (ann.identities, ann.key_digests) == (("openai-user:ann",), (KEY_DIGEST,))
    assert ben.key_digests == ()
    assert "key_digests" not in budget_row(ann)["decision"]
    assert KEY not in ann.model_dump_json()
