"""`tally simulate`: the brief's example response, every user listed, bad lines refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tally.cli import main as tally
from tally.simulate import main, read_events
from tally.wire import BudgetDecided
from tests.paths import project_root

CONFIG = project_root() / "config"
BRIEF_EVENTS = project_root() / "tests" / "data" / "brief_example_events.jsonl"
AT = "2026-05-20T15:00:00Z"
ROW_KEYS = [
    "user_id",
    "daily_used",
    "daily_limit",
    "daily_remaining",
    "monthly_used",
    "monthly_limit",
    "status",
]


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


def report(capsys: pytest.CaptureFixture[str], config: Path, events: Path, at: str = AT) -> Any:
    code, out, err = run(capsys, "--config", config, "--events", events, "--at", at)
    assert (code, err) == (0, "")
    return json.loads(out)


def rows(result: Any) -> dict[str, dict[str, Any]]:
    return {row["user_id"]: {k: row[k] for k in ROW_KEYS} for row in result["users"]}


def write_events(path: Path, *events: dict[str, Any]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return path


def usage(event_id: str, user: str, at: str, tokens: int, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": event_id,
        "occurred_at": at,
        "user_id": user,
        "model": "m/x",
        "input_tokens": tokens,
        "output_tokens": 0,
        **fields,
    }


# the brief's example ----------------------------------------------------------------------


def test_brief_example_response(capsys: pytest.CaptureFixture[str]) -> None:
    found = rows(report(capsys, CONFIG, BRIEF_EVENTS))
    assert found["user_alice"] == {
        "user_id": "user_alice",
        "daily_used": 45000,
        "daily_limit": 100000,
        "daily_remaining": 55000,
        "monthly_used": 890000,
        "monthly_limit": 2000000,
        "status": "ok",
    }
    assert found["user_bob"] == {
        "user_id": "user_bob",
        "daily_used": 25000,
        "daily_limit": 25000,
        "daily_remaining": 0,
        "monthly_used": 520000,
        "monthly_limit": 500000,
        "status": "over_limit",
    }


def test_every_configured_user_listed_sorted(capsys: pytest.CaptureFixture[str]) -> None:
    result = report(capsys, CONFIG, BRIEF_EVENTS)
    ids = [row["user_id"] for row in result["users"]]
    assert ids == sorted(ids)
    assert {"user_alice", "user_bob", "user_carol", "user_dave", "gateway_openclaw"} <= set(ids)
    assert list(result) == ["users"]


def test_each_row_carries_its_decision(capsys: pytest.CaptureFixture[str]) -> None:
    result = report(capsys, CONFIG, BRIEF_EVENTS)
    bob = next(row for row in result["users"] if row["user_id"] == "user_bob")
    decision = BudgetDecided.model_validate(bob["decision"])
    assert (decision.status, decision.action, decision.status_code) == (
        "over_limit",
        "hard_stop",
        429,
    )
    assert decision.as_of.isoformat() == "2026-05-20T15:00:00+00:00"
    # both periods over: monthly (104%) beats daily (100%), so it resets with the month
    assert (decision.period, decision.percent_used) == ("monthly", 104)
    assert "resets at 2026-06-01T00:00:00+00:00." in (decision.message or "")


def test_events_after_at_are_ignored(capsys: pytest.CaptureFixture[str]) -> None:
    later = rows(report(capsys, CONFIG, BRIEF_EVENTS, "2026-05-20T23:00:00Z"))
    assert later["user_alice"]["daily_used"] == 55000
    earlier = rows(report(capsys, CONFIG, BRIEF_EVENTS, "2026-05-20T09:00:00Z"))
    assert earlier["user_alice"]["daily_used"] == 25000


def test_through_the_tally_command(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["simulate", "--config", str(CONFIG), "--events", str(BRIEF_EVENTS), "--at", AT]
    assert tally(argv) == 0
    assert json.loads(capsys.readouterr().out)["users"]


# who is listed, with which limits ---------------------------------------------------------


def test_user_only_in_events_gets_default_limits(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    events = write_events(tmp_path / "e.jsonl", usage("1", "stranger", "2026-05-20T10:00:00Z", 7))
    found = rows(report(capsys, CONFIG, events))["stranger"]
    assert (found["daily_used"], found["daily_limit"], found["monthly_limit"]) == (
        7,
        50000,
        1000000,
    )


def test_role_from_event_when_user_not_configured(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    event = usage("1", "stranger", "2026-05-20T10:00:00Z", 7, role="viewer")
    found = rows(report(capsys, CONFIG, write_events(tmp_path / "e.jsonl", event)))
    assert found["stranger"]["daily_limit"] == 10000


def test_users_yaml_role_beats_event_role(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    event = usage("1", "user_carol", "2026-05-20T10:00:00Z", 7, role="viewer")
    found = rows(report(capsys, CONFIG, write_events(tmp_path / "e.jsonl", event)))
    assert found["user_carol"]["daily_limit"] == 200000  # admin, per users.yaml


def test_department_budget_shared_across_members(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # research: 300000 a day, shared by user_alice and user_dave (100000 each on their own)
    events = write_events(
        tmp_path / "e.jsonl",
        usage("1", "user_alice", "2026-05-20T10:00:00Z", 99000),
        usage("2", "user_dave", "2026-05-20T10:00:00Z", 99000),
        usage("3", "stranger", "2026-05-20T10:00:00Z", 200000, department="research"),
    )
    result = report(capsys, CONFIG, events)
    dave = next(row for row in result["users"] if row["user_id"] == "user_dave")
    assert dave["status"] == "over_limit"
    assert dave["decision"]["budget"] == "department:research"
    assert dave["daily_used"] == 99000  # the row keeps dave's own figures


def test_empty_events_file_lists_configured_users(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "e.jsonl").write_text("\n\n")
    found = rows(report(capsys, CONFIG, tmp_path / "e.jsonl"))
    assert found["user_alice"]["daily_used"] == 0
    assert found["user_alice"]["status"] == "ok"


# refusals ---------------------------------------------------------------------------------


def test_bad_line_names_line_and_reason_and_prints_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "e.jsonl"
    good = json.dumps(usage("1", "user_alice", "2026-05-20T10:00:00Z", 5))
    bad = json.dumps(usage("2", "user_alice", "2026-05-20T10:00:00Z", -5))
    path.write_text(f"{good}\n\n{bad}\n{good}\n")
    code, out, err = run(capsys, "--config", CONFIG, "--events", path, "--at", AT)
    assert (code, out) == (1, "")
    assert f"{path}:3: input_tokens:" in err
    assert "greater than or equal to 0" in err


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"{not json", "Invalid JSON"),
        (b'{"event_id": "x"}', "occurred_at: Field required"),
        (b"\xff\xfe garbage", "Invalid JSON"),
        (
            json.dumps(usage("1", "u", "2026-05-20T10:00:00", 5)).encode(),
            "occurred_at: Input should have timezone info",
        ),
        (json.dumps({**usage("1", "u", AT, 5), "extra": 1}).encode(), "extra: Extra inputs"),
    ],
)
def test_bad_line_reasons(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, line: bytes, reason: str
) -> None:
    path = tmp_path / "e.jsonl"
    path.write_bytes(line + b"\n")
    code, out, err = run(capsys, "--config", CONFIG, "--events", path, "--at", AT)
    assert (code, out) == (1, "")
    assert f"{path}:1: " in err and reason in err


def test_missing_events_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "--config", CONFIG, "--events", tmp_path / "no.jsonl", "--at", AT)
    assert (code, out) == (1, "")
    assert "no.jsonl" in err


def test_bad_config_dir(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run(capsys, "--config", tmp_path, "--events", BRIEF_EVENTS, "--at", AT)
    assert (code, out) == (1, "")
    assert "budgets.yaml" in err


def test_at_needs_an_offset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(CONFIG), "--events", str(BRIEF_EVENTS), "--at", "2026-05-20T15:00"])
    assert exit_.value.code == 2
    assert "offset" in capsys.readouterr().err


def test_read_events_skips_blank_lines() -> None:
    line = json.dumps(usage("1", "u", AT, 5))
    assert [e.event_id for e in read_events(["", line, "  "])] == ["1"]


def test_a_weekly_limit_shows_in_the_rows_and_stops_the_week(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "config"
    shutil.copytree(CONFIG, config)
    budgets = yaml.safe_load((config / "budgets.yaml").read_text())
    budgets["per_user_budgets"]["user_overrides"]["user_bob"]["weekly_tokens"] = 60000
    budgets["per_user_budgets"]["reset_schedule"]["weekly_reset_day"] = "monday"
    (config / "budgets.yaml").write_text(yaml.safe_dump(budgets))
    # 2026-05-20 is a Wednesday: Sunday's 24,000 was last week, three days of it this week
    events = write_events(
        tmp_path / "e.jsonl",
        *(usage(str(day), "user_bob", f"2026-05-{day}T10:00:00Z", 24000)
          for day in (17, 18, 19, 20)))
    found = {row["user_id"]: row for row in report(capsys, config, events)["users"]}
    bob = found["user_bob"]
    assert (bob["daily_used"], bob["daily_limit"]) == (24000, 25000)
    assert (bob["weekly_used"], bob["weekly_limit"], bob["weekly_remaining"]) == (72000, 60000, 0)
    assert (bob["status"], bob["decision"]["period"]) == ("over_limit", "weekly")
    assert "weekly_used" not in found["user_alice"]  # no weekly limit: the brief's row
