"""`tally`: one entry point; each subcommand lives in the module that owns it.

Every subcommand module exposes `main(argv: list[str]) -> int`, imported only when used so
that `tally config check` does not pay for Kafka or DuckDB imports. Each runs under
`tally.clierrors.guarded`: what a user can cause ends in one line, not a traceback.
"""

from __future__ import annotations

import importlib
import sys

from tally.clierrors import guarded, require_kafka
from tally.settings import Settings

__all__ = ["main"]

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("tally_dev.run", "start Kafka, the three services and a sample history (the demo)"),
    "kafka": ("tally_dev.localkafka", "start|stop|status the local single-node Kafka"),
    "topics": ("tally.topicadmin", "check|apply: compare the Kafka topics with the topic table"),
    "config": ("tally.config.loader", "check DIR: validate auth.yaml, users.yaml, budgets.yaml"),
    "simulate": ("tally.simulate", "fold a JSONL file of events offline, print the budgets"),
    "schemas": ("tally.schemas", "write|check the JSON Schema files in schemas/"),
    "ingest": ("tally.services.ingest.app", "run the ingest service"),
    "projector": ("tally.services.projector.app", "run the projector service"),
    "enforcer": ("tally.services.enforcer.app", "run the enforcer service"),
    "replay": ("tally.services.projector.replay",
               "rebuild a fresh DuckDB from usage.events offset 0"),
    "audit": ("tally.services.projector.audit",
              "run a read-only SQL query on the projector's data"),
    "status": ("tally.status", "print every user's current decision from budget.decisions"),
}
# These read or write topics: without a broker they say so at once (their --help works).
NEEDS_KAFKA = frozenset({"status", "replay", "ingest", "projector", "enforcer"})
HELP = frozenset({"-h", "--help"})


def usage() -> str:
    lines = ["usage: tally COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "`tally COMMAND --help` describes each command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in SUBCOMMANDS:
        print(f"tally: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    return guarded(f"tally {command}", lambda: _run(command, rest))


def _run(command: str, rest: list[str]) -> int:
    if command in NEEDS_KAFKA and not HELP & set(rest):
        require_kafka(Settings.from_env().bootstrap_servers)
    module = importlib.import_module(SUBCOMMANDS[command][0])
    result: int = module.main(rest)
    return result


if __name__ == "__main__":
    sys.exit(main())
