"""`tally simulate`: fold a JSONL file of usage events offline and print every budget.

    tally simulate --config DIR --events FILE.jsonl [--at TIMESTAMP]

Runs the same core as the live services (fold, decide, the admin report) and prints ONE
JSON object shaped like GET /api/admin/budgets. Events after --at are ignored; without
--at, the current time is used. Any bad line stops the run with its line number and
reason (exit 1) before anything is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from tally.cli import command_main
from tally.config.loader import load_config
from tally.core.report import budgets_report
from tally.core.usage import MemoryStore
from tally.errors import InputError
from tally.wire import UsageRecorded

__all__ = ["EventFileError", "main", "read_events", "simulate"]


class EventFileError(InputError):
    """A line of the events file is not a valid UsageRecorded."""


def read_events(lines: Iterable[bytes | str], name: str = "<events>") -> Iterator[UsageRecorded]:
    """Each non-blank line as a UsageRecorded; EventFileError names the first bad line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            yield UsageRecorded.model_validate_json(line)
        except ValidationError as error:
            raise EventFileError(f"{name}:{number}: {_reason(error)}") from None


def _reason(error: ValidationError) -> str:
    problems = []
    for item in error.errors(include_url=False):
        where = ".".join(str(part) for part in item["loc"])
        problems.append(f"{where}: {item['msg']}" if where else item["msg"])
    return "; ".join(problems)


def simulate(config_dir: Path, events_file: Path, at: datetime) -> dict[str, object]:
    """The admin report at `at` for the events in the file (ConfigError, EventFileError)."""
    config = load_config(config_dir)
    budgets = config.budgets.per_user_budgets
    with events_file.open("rb") as lines:  # bytes: bad UTF-8 is a bad line, not a crash
        # read the whole file first: a bad last line must fail before any output
        events = list(read_events(lines, str(events_file)))
    store = MemoryStore(budgets)
    store.apply((e for e in events if e.occurred_at <= at), {})
    return dict(budgets_report(store.load_usages(), config, at))


def run(args: argparse.Namespace) -> int:
    at: datetime = args.at or datetime.now(UTC)
    try:  # a bad config or events file is a TallyError: the CLI says it in its words
        report = simulate(args.config, args.events, at)
    except OSError as error:
        print(f"tally simulate: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


main = command_main("simulate")
