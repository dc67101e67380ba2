"""The config loader: the example loads, defaults apply, and every mistake is named.

Each mistake test asserts the file, the key path and the reason, because that triple is
what lets someone fix a config without reading the loader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tally.config.errors import ConfigError, ConfigProblem
from tally.config.loader import load_config, main
from tally.config.models import BudgetsFile, Config, UsersFile

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "config"

MINIMAL_BUDGETS: dict[str, Any] = {
    "per_user_budgets": {"default_limits": {"daily_tokens": 50000, "monthly_tokens": 1000000}}
}
TWO_USERS: dict[str, Any] = {
    "user_identification": {
        "users": [
            {"id": "user_alice", "api_key": "ak_alice", "role": "developer"},
            {"id": "user_bob", "api_key": "ak_bob", "role": "viewer"},
        ]
    }
}


def write(directory: Path, **files: dict[str, Any] | str) -> Path:
    """write(tmp_path, budgets={...}, users="raw: yaml") -> the directory."""
    for name, content in files.items():
        text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
        (directory / f"{name}.yaml").write_text(text, encoding="utf-8")
    return directory


def budgets_with(**keys: Any) -> dict[str, Any]:
    return {"per_user_budgets": {**MINIMAL_BUDGETS["per_user_budgets"], **keys}}


def problems_of(directory: Path) -> list[ConfigProblem]:
    with pytest.raises(ConfigError) as caught:
        load_config(directory)
    return caught.value.problems


def assert_problem(directory: Path, file: str, key_path: str, reason: str) -> None:
    """Exactly one problem, in that file at that key path, whose reason mentions `reason`."""
    with pytest.raises(ConfigError) as caught:
        load_config(directory)
    problems = caught.value.problems
    assert [(p.file, p.key_path) for p in problems] == [(file, key_path)], str(caught.value)
    assert reason in problems[0].reason
    prefix = f"{file}: {key_path}: " if key_path else f"{file}: "
    assert str(caught.value) == prefix + problems[0].reason


# what loads --------------------------------------------------------------------------------


def test_the_example_config_loads_with_the_brief_values() -> None:
    config = load_config(EXAMPLE_DIR)
    budgets = config.budgets.per_user_budgets
    assert (budgets.default_limits.daily_tokens, budgets.default_limits.monthly_tokens) == (
        50000,
        1000000,
    )
    assert budgets.user_overrides["user_alice"].daily_tokens == 100000
    assert budgets.user_overrides["user_bob"].monthly_tokens == 500000
    assert budgets.role_limits == {"admin": 200000, "developer": 100000, "viewer": 10000}
    assert [w.at_percent for w in budgets.warnings] == [75, 90]
    assert budgets.on_limit_exceeded.action == "hard_stop"
    assert budgets.on_limit_exceeded.soft_limit.notify_admin is True
    assert budgets.on_limit_exceeded.reduced_priority.force_model == "anthropic/claude-3-haiku"
    assert budgets.department_budgets["research"].monthly_tokens == 5000000
    assert budgets.project_budgets["atlas"].daily_tokens == 200000
    assert budgets.reset_schedule.reset_hour_minute == (0, 0)
    assert budgets.reset_schedule.zone.key == "UTC"
    assert config.auth.authentication.method == "api_key"


def test_the_example_users_can_be_found_by_id_api_key_and_identity() -> None:
    config = load_config(EXAMPLE_DIR)
    alice = config.user_by_id("user_alice")
    assert alice is not None and alice.department == "research" and alice.project == "atlas"
    assert config.user_by_api_key("ak_bob_example_0002") == config.user_by_id("user_bob")
    assert config.user_by_identity("telegram:123456") == alice
    assert config.user_by_api_key("ak_nobody") is None
    assert config.user_by_identity("telegram:0") is None
    gateway = config.user_by_id("gateway_openclaw")
    assert gateway is not None and gateway.gateway


def test_only_default_limits_is_required_and_the_rest_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, budgets=MINIMAL_BUDGETS))
    budgets = config.budgets.per_user_budgets
    assert budgets.user_overrides == {} and budgets.role_limits == {}
    assert budgets.department_budgets == {} and budgets.project_budgets == {}
    schedule = budgets.reset_schedule
    assert (schedule.daily_reset_time, schedule.monthly_reset_day, schedule.timezone) == (
        "00:00",
        1,
        "UTC",
    )
    assert not budgets.rollover.enabled and budgets.warnings == ()
    assert budgets.on_limit_exceeded.action == "soft_limit"
    assert "{" not in budgets.on_limit_exceeded.soft_limit.message.replace("{period}", "")
    assert budgets.on_limit_exceeded.hard_stop.status_code == 429
    # missing auth.yaml and users.yaml: authentication defaults and nobody listed
    assert config.auth.authentication.method == "api_key"
    assert config.users.user_identification.users == ()


def test_a_reset_schedule_gives_hour_minute_and_zone(tmp_path: Path) -> None:
    schedule = {"daily_reset_time": "06:30", "monthly_reset_day": 31, "timezone": "Europe/Berlin"}
    config = load_config(write(tmp_path, budgets=budgets_with(reset_schedule=schedule)))
    loaded = config.budgets.per_user_budgets.reset_schedule
    assert loaded.reset_hour_minute == (6, 30)
    assert loaded.zone.key == "Europe/Berlin"


# each mistake, named -----------------------------------------------------------------------


def test_an_unknown_key(tmp_path: Path) -> None:
    write(tmp_path, budgets=budgets_with(rollover={"enabled": True, "max_tokens": 5}))
    assert_problem(tmp_path, "budgets.yaml", "per_user_budgets.rollover.max_tokens", "unknown key")


def test_an_unknown_top_level_key_in_auth(tmp_path: Path) -> None:
    write(tmp_path, budgets=MINIMAL_BUDGETS, auth={"authentification": {"enabled": True}})
    assert_problem(tmp_path, "auth.yaml", "authentification", "unknown key")


def test_a_wrong_type(tmp_path: Path) -> None:
    limits = {"daily_tokens": "lots", "monthly_tokens": 1000000}
    write(tmp_path, budgets=budgets_with(default_limits=limits))
    assert_problem(
        tmp_path, "budgets.yaml", "per_user_budgets.default_limits.daily_tokens", "wrong type"
    )


def test_a_number_in_quotes_is_a_wrong_type_not_a_number(tmp_path: Path) -> None:
    write(tmp_path, budgets=budgets_with(role_limits={"admin": "200000"}))
    assert_problem(tmp_path, "budgets.yaml", "per_user_budgets.role_limits.admin", "wrong type")


def test_a_negative_limit(tmp_path: Path) -> None:
    write(
        tmp_path,
        users=TWO_USERS,
        budgets=budgets_with(user_overrides={"user_bob": {"monthly_tokens": -1}}),
    )
    assert_problem(
        tmp_path,
        "budgets.yaml",
        "per_user_budgets.user_overrides.user_bob.monthly_tokens",
        "must not be negative, got -1",
    )


def test_an_unknown_time_zone(tmp_path: Path) -> None:
    write(tmp_path, budgets=budgets_with(reset_schedule={"timezone": "Mars/Base"}))
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == (
        "budgets.yaml: per_user_budgets.reset_schedule.timezone: unknown time zone 'Mars/Base'"
    )


@pytest.mark.parametrize("written", ['"24:00"', '"7:30"', '"00:00:00"', '"noon"', "12:30"])
def test_a_reset_time_that_is_not_hh_mm(tmp_path: Path, written: str) -> None:
    text = yaml.safe_dump(MINIMAL_BUDGETS) + f"  reset_schedule:\n    daily_reset_time: {written}\n"
    write(tmp_path, budgets=text)
    assert_problem(
        tmp_path, "budgets.yaml", "per_user_budgets.reset_schedule.daily_reset_time", "HH:MM"
    )


@pytest.mark.parametrize("day", [0, 32, -1])
def test_a_monthly_reset_day_outside_1_to_31(tmp_path: Path, day: int) -> None:
    write(tmp_path, budgets=budgets_with(reset_schedule={"monthly_reset_day": day}))
    assert_problem(
        tmp_path, "budgets.yaml", "per_user_budgets.reset_schedule.monthly_reset_day", "1..31"
    )


def test_a_weekly_reset_day_is_a_weekday_name(tmp_path: Path) -> None:
    write(tmp_path, budgets=budgets_with(reset_schedule={"weekly_reset_day": "Mon"}))
    assert_problem(tmp_path, "budgets.yaml", "per_user_budgets.reset_schedule.weekly_reset_day",
                   "must be 'monday', 'tuesday'")


def test_a_role_limit_as_a_mapping_is_checked_key_by_key(tmp_path: Path) -> None:
    write(tmp_path, budgets=budgets_with(role_limits={"admin": {"weekly_tokens": -5}}))
    assert_problem(tmp_path, "budgets.yaml", "per_user_budgets.role_limits.admin.weekly_tokens",
                   "must not be negative")


def test_an_override_for_a_user_that_does_not_exist(tmp_path: Path) -> None:
    overrides = {"user_alice": {"daily_tokens": 1}, "user_zed": {"daily_tokens": 1}}
    write(tmp_path, users=TWO_USERS, budgets=budgets_with(user_overrides=overrides))
    assert_problem(
        tmp_path,
        "budgets.yaml",
        "per_user_budgets.user_overrides.user_zed",
        "no user 'user_zed' in users.yaml",
    )


def test_a_role_that_has_no_role_limit(tmp_path: Path) -> None:
    write(tmp_path, users=TWO_USERS, budgets=budgets_with(role_limits={"developer": 100000}))
    assert_problem(
        tmp_path,
        "users.yaml",
        "user_identification.users[1].role",
        "role 'viewer' has no entry in budgets.yaml per_user_budgets.role_limits",
    )


def test_roles_are_free_labels_when_there_are_no_role_limits(tmp_path: Path) -> None:
    load_config(write(tmp_path, users=TWO_USERS, budgets=MINIMAL_BUDGETS))


@pytest.mark.parametrize(
    ("keys", "key_path"),
    [
        ({"warnings": [{"at_percent": 75, "message": "{used}%"}]}, "warnings[0].message"),
        (
            {"on_approaching_limit": {"message_template": "{user}"}},
            "on_approaching_limit.message_template",
        ),
        ({"budget_footer": "{tokens_left}"}, "budget_footer"),
        (
            {"on_limit_exceeded": {"soft_limit": {"message": "{x}"}}},
            "on_limit_exceeded.soft_limit.message",
        ),
        (
            {"on_limit_exceeded": {"hard_stop": {"message": "{x}"}}},
            "on_limit_exceeded.hard_stop.message",
        ),
        (
            {"on_limit_exceeded": {"reduced_priority": {"message": "{x}"}}},
            "on_limit_exceeded.reduced_priority.message",
        ),
    ],
)
def test_an_unknown_placeholder_in_a_template(
    tmp_path: Path, keys: dict[str, Any], key_path: str
) -> None:
    write(tmp_path, budgets=budgets_with(**keys))
    assert_problem(tmp_path, "budgets.yaml", f"per_user_budgets.{key_path}", "unknown placeholder")


@pytest.mark.parametrize(
    ("template", "reason"),
    [("{percent_used:.1f}%", "no format spec"), ("{tokens_used!r}", "no format spec")],
)
def test_a_template_must_be_plain_placeholders(tmp_path: Path, template: str, reason: str) -> None:
    write(tmp_path, budgets=budgets_with(budget_footer=template))
    assert_problem(tmp_path, "budgets.yaml", "per_user_budgets.budget_footer", reason)


def test_every_allowed_placeholder_and_other_brace_text_is_accepted(tmp_path: Path) -> None:
    known = "{percent_used} {period} {tokens_used} {tokens_limit} {tokens_remaining} {reset_time}"
    footer = known + " {} }{ {1} { spaced }"  # not placeholders: printed as written
    load_config(write(tmp_path, budgets=budgets_with(budget_footer=footer)))


def test_two_users_with_the_same_api_key(tmp_path: Path) -> None:
    users = {
        "user_identification": {
            "users": [
                {"id": "user_alice", "api_key": "ak_secret_shared"},
                {"id": "user_bob", "api_key": "ak_secret_shared"},
            ]
        }
    }
    write(tmp_path, users=users, budgets=MINIMAL_BUDGETS)
    assert_problem(
        tmp_path,
        "users.yaml",
        "user_identification.users[1].api_key",
        "same api_key as user_identification.users[0] (user_alice)",
    )
    assert "ak_secret_shared" not in str(problems_of(tmp_path)[0])  # a key never reaches a log


def test_two_users_with_the_same_id(tmp_path: Path) -> None:
    users = {"user_identification": {"users": [{"id": "user_alice"}, {"id": "user_alice"}]}}
    write(tmp_path, users=users, budgets=MINIMAL_BUDGETS)
    assert_problem(tmp_path, "users.yaml", "user_identification.users[1].id", "same id")


def test_two_users_with_the_same_identity(tmp_path: Path) -> None:
    users = {
        "user_identification": {
            "users": [
                {"id": "user_alice", "identities": ["telegram:1"]},
                {"id": "user_bob", "identities": ["openai-user:bob", "telegram:1"]},
            ]
        }
    }
    write(tmp_path, users=users, budgets=MINIMAL_BUDGETS)
    assert_problem(
        tmp_path, "users.yaml", "user_identification.users[1].identities[1]", "same identity"
    )


def test_a_department_or_project_without_a_budget_is_fine(tmp_path: Path) -> None:
    users = {"user_identification": {"users": [{"id": "u", "department": "sales", "project": "x"}]}}
    load_config(write(tmp_path, users=users, budgets=MINIMAL_BUDGETS))


def test_force_model_must_be_provider_slash_model(tmp_path: Path) -> None:
    exceeded = {"reduced_priority": {"force_model": "claude-3-haiku"}}
    write(tmp_path, budgets=budgets_with(on_limit_exceeded=exceeded))
    assert_problem(
        tmp_path,
        "budgets.yaml",
        "per_user_budgets.on_limit_exceeded.reduced_priority.force_model",
        "provider/model",
    )


def test_an_unknown_action(tmp_path: Path) -> None:
    write(tmp_path, budgets=budgets_with(on_limit_exceeded={"action": "block"}))
    assert_problem(
        tmp_path, "budgets.yaml", "per_user_budgets.on_limit_exceeded.action", "got 'block'"
    )


# auth.yaml and JWT -------------------------------------------------------------------------


def test_jwt_needs_a_secret_or_a_public_key_file(tmp_path: Path) -> None:
    write(tmp_path, auth={"authentication": {"method": "jwt"}}, budgets=MINIMAL_BUDGETS)
    assert_problem(tmp_path, "auth.yaml", "authentication", "secret or public_key_file")


def test_jwt_public_key_file_must_exist(tmp_path: Path) -> None:
    auth = {"authentication": {"method": "jwt", "public_key_file": "keys/missing.pem"}}
    write(tmp_path, auth=auth, budgets=MINIMAL_BUDGETS)
    assert_problem(tmp_path, "auth.yaml", "authentication.public_key_file", "no such file")


def test_jwt_public_key_file_is_relative_to_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "jwt.pem").write_text("-----BEGIN PUBLIC KEY-----\n")
    auth = {"authentication": {"method": "jwt", "public_key_file": "keys/jwt.pem"}}
    config = load_config(write(tmp_path, auth=auth, budgets=MINIMAL_BUDGETS))
    assert config.auth.authentication.public_key_file == str(tmp_path / "keys" / "jwt.pem")


def test_jwt_with_a_secret_loads(tmp_path: Path) -> None:
    secret = "s3cret-of-thirty-two-bytes-or-so"
    auth = {"authentication": {"method": "jwt", "secret": secret, "algorithms": ["HS256"]}}
    config = load_config(write(tmp_path, auth=auth, budgets=MINIMAL_BUDGETS))
    assert config.auth.authentication.algorithms == ("HS256",)


@pytest.mark.parametrize("secret", ["", "x", "s" * 31])
def test_config_check_refuses_a_short_hs256_secret(tmp_path: Path, secret: str) -> None:
    auth = {"authentication": {"method": "jwt", "secret": secret, "algorithms": ["HS256"]}}
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, auth=auth, budgets=MINIMAL_BUDGETS))
    assert f"at least 32 bytes, got {len(secret)}" in str(caught.value)
    assert "auth.yaml" in str(caught.value)


# files, YAML and many problems -------------------------------------------------------------


def test_a_missing_budgets_file(tmp_path: Path) -> None:
    write(tmp_path, users=TWO_USERS)
    assert_problem(tmp_path, "budgets.yaml", "", "missing")


def test_a_missing_default_limits(tmp_path: Path) -> None:
    write(tmp_path, budgets={"per_user_budgets": {"enabled": True}})
    assert_problem(tmp_path, "budgets.yaml", "per_user_budgets.default_limits", "missing")


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path: Path) -> None:
    text = "per_user_budgets:\n  default_limits:\n    daily_tokens: [1, 2\n"
    write(tmp_path, budgets=text)
    assert_problem(tmp_path, "budgets.yaml", "", "invalid YAML at line 4")


def test_a_repeated_yaml_key_is_an_error_not_a_silent_overwrite(tmp_path: Path) -> None:
    text = yaml.safe_dump(TWO_USERS) + "user_identification: {}\n"
    write(tmp_path, users=text, budgets=MINIMAL_BUDGETS)
    assert_problem(tmp_path, "users.yaml", "", "duplicate key 'user_identification'")


def test_a_file_that_is_not_a_mapping(tmp_path: Path) -> None:
    write(tmp_path, users="- user_alice\n", budgets=MINIMAL_BUDGETS)
    assert_problem(tmp_path, "users.yaml", "", "expected a mapping of keys, got list")


def test_problems_of_all_three_files_are_reported_together(tmp_path: Path) -> None:
    write(
        tmp_path,
        auth="authentication: [\n",
        users={
            "user_identification": {
                "users": [{"id": "a", "api_key": "k"}, {"id": "b", "api_key": "k"}]
            }
        },
        budgets=budgets_with(
            reset_schedule={"timezone": "Mars/Base", "monthly_reset_day": 40},
            user_overrides={"nobody": {"daily_tokens": 5}},
        ),
    )
    found = [(p.file, p.key_path) for p in problems_of(tmp_path)]
    assert found == [
        ("auth.yaml", ""),
        ("users.yaml", "user_identification.users[1].api_key"),
        ("budgets.yaml", "per_user_budgets.reset_schedule.monthly_reset_day"),
        ("budgets.yaml", "per_user_budgets.reset_schedule.timezone"),
    ]  # the override check needs a parsed budgets.yaml, so it waits for the fixes


def test_a_config_built_in_code_is_checked_across_files_too() -> None:
    users = UsersFile.model_validate(TWO_USERS)
    budgets = BudgetsFile.model_validate(budgets_with(user_overrides={"user_zed": {}}))
    with pytest.raises(ValidationError, match="no user 'user_zed'"):
        Config(users=users, budgets=budgets)


def test_the_models_are_frozen() -> None:
    config = load_config(EXAMPLE_DIR)
    with pytest.raises(ValidationError):
        config.budgets.per_user_budgets.reset_schedule.timezone = "Europe/Paris"  # type: ignore[misc]


# tally config check DIR --------------------------------------------------------------------


def test_check_prints_ok_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLE_DIR)]) == 0
    assert capsys.readouterr().out == "ok\n"


def test_check_prints_the_problems_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write(tmp_path, budgets=budgets_with(reset_schedule={"timezone": "Mars/Base"}))
    assert main(["check", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "budgets.yaml: per_user_budgets.reset_schedule.timezone: unknown time zone 'Mars/Base'\n"
    )


def test_check_of_a_directory_that_does_not_exist_exits_1(tmp_path: Path) -> None:
    assert main(["check", str(tmp_path / "nowhere")]) == 1


@pytest.mark.parametrize("argv", [[], ["check"], ["validate", "config"], ["check", "a", "b"]])
def test_check_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    assert "usage: tally config check DIR" in capsys.readouterr().err
