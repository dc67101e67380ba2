"""`tally`: one argparse tree of every command and option; each command runs in the module
that owns it.

The tree is built here, from light modules only, so that `tally --help` and `tally config
check` do not pay for Kafka or DuckDB imports: a command's module is imported when it runs,
and its `run(args)` gets the parsed options. Options that several commands share come from
parent parsers (the config directory, the projector's file and namespace, the HTTP port
and host). Every command runs under `tally.clierrors.guarded`: what a user can cause ends
in one line, not a traceback (exit codes: tally.errors.ExitCode).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from tally.clierrors import guarded, require_kafka
from tally.services.projector.limits import add_limit_options
from tally.settings import Settings

__all__ = ["SUBCOMMANDS", "build_parser", "main", "timestamp"]

# name: (the module whose run(args) runs it, what it does)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("tally_dev.run", "start Kafka, the three services and a sample history (the demo)"),
    "kafka": ("tally_dev.localkafka", "start|stop|status the local single-node Kafka"),
    "topics": ("tally.topicadmin", "check|apply: compare the Kafka topics with the topic table"),
    "config": ("tally.config.loader", "check DIR: validate auth.yaml, users.yaml, budgets.yaml"),
    "simulate": ("tally.simulate", "fold a JSONL file of events offline, print the budgets"),
    "schemas": ("tally.schemas", "write|check the JSON Schemas and asyncapi.json in schemas/"),
    "ingest": ("tally.services.ingest.app", "run the ingest service"),
    "projector": ("tally.services.projector.app", "run the projector service"),
    "enforcer": ("tally.services.enforcer.app", "run the enforcer service"),
    "replay": ("tally.services.projector.replay",
               "rebuild a fresh DuckDB from usage.events offset 0"),
    "audit": ("tally.services.projector.audit",
              "run a read-only SQL query on the projector's data"),
    "status": ("tally.status", "print every user's current decision from budget.decisions"),
}
AUDIT_DESCRIPTION = """Run one read-only query (SELECT, or EXPLAIN of one) on the projector's data.
The running projector answers it (POST /audit, as an admin: TALLY_API_KEY or TALLY_TOKEN);
when none answers, the DuckDB file is opened read-only. Tables: ledger, balances, rejected,
offsets; views: users, this_month, usage_by_day_model, usage_by_model, rejected_by_reason."""
# These read or write topics: without a broker they say so at once (their --help works).
NEEDS_KAFKA = frozenset({"status", "replay", "ingest", "projector", "enforcer"})


def timestamp(text: str) -> datetime:
    """An ISO 8601 time with a UTC offset (an argparse type)."""
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 timestamp: {text!r}") from None
    if at.tzinfo is None:
        raise argparse.ArgumentTypeError(f"needs a UTC offset (e.g. Z or +02:00): {text!r}")
    return at


class _CommandsFormatter(argparse.HelpFormatter):
    """Leaves room for the longest command name: argparse measures the commands without
    the two spaces it indents them by, and so wraps `projector` onto a line of its own."""

    def add_argument(self, action: argparse.Action) -> None:
        super().add_argument(action)
        if action.nargs == argparse.PARSER:
            self._action_max_length += 2


def _parent(add: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    add(parser)
    return parser


def _parents(settings: Settings) -> dict[str, argparse.ArgumentParser]:
    def config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, default=settings.config_dir,
                       help="directory of auth.yaml, users.yaml, budgets.yaml "
                            "(default: TALLY_CONFIG_DIR, else ./config)")

    def store(p: argparse.ArgumentParser) -> None:
        p.add_argument("--db", type=Path, default=settings.data_dir / "projector.duckdb",
                       help="the projector's DuckDB file (default: %(default)s)")
        p.add_argument("--namespace", default=settings.topic_namespace,
                       help="topic name prefix (default: TALLY_TOPIC_NAMESPACE)")

    def http(p: argparse.ArgumentParser) -> None:
        p.add_argument("--port", type=int, help="HTTP port (default: %(default)s); 0: none")
        p.add_argument("--host", default="127.0.0.1", help="HTTP bind address")

    return {"config": _parent(config), "store": _parent(store), "http": _parent(http)}


def build_parser(settings: Settings | None = None) -> argparse.ArgumentParser:
    settings = settings or Settings.from_env()
    parser = argparse.ArgumentParser(
        prog="tally", description="Per-user token budgets for a shared OpenClaw gateway.",
        epilog="`tally COMMAND --help` describes each command's options.",
        formatter_class=_CommandsFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, *parents: str, **options: Any) -> argparse.ArgumentParser:
        module, text = SUBCOMMANDS[name]
        # Parents of its own: argparse shares a parent's actions, and so their defaults.
        shared = _parents(settings)
        options.setdefault("description", text)
        sub = commands.add_parser(name, help=text, prog=f"tally {name}",
                                  parents=[shared[p] for p in parents], **options)
        sub.set_defaults(module=module, parser=sub)
        return sub

    sub = command("run")
    sub.add_argument("--once", action="store_true",
                     help="print the decisions once, then stop everything")

    sub = command("kafka")
    sub.add_argument("action", choices=["start", "stop", "status"],
                     help="start (returns once it answers), stop, or status")
    sub.add_argument("--port", type=int, default=9092,
                     help="the broker's port on 127.0.0.1 (default: 9092)")
    sub.add_argument("--controller-port", type=int, default=9093,
                     help="the KRaft controller's port (default: 9093)")
    sub.add_argument("--data-dir", type=Path, default=None,
                     help="where its logs and data live (default: ./.local/kafka)")
    sub.add_argument("--sasl", action="store_true",
                     help="a SASL_PLAINTEXT SCRAM listener; the user is KAFKA_SASL_USERNAME "
                          "and KAFKA_SASL_PASSWORD (default tally / tally-secret)")
    sub.add_argument("--tls", action="store_true",
                     help="encrypt the listener (SSL, or SASL_SSL with --sasl) with a "
                          "certificate from a CA made in the data dir (config/tls/ca.pem)")
    sub.add_argument("--brokers", type=int, default=1,
                     help="nodes (broker+controller each); ports step by 2 from --port")

    sub = command("topics")
    sub.add_argument("action", choices=["check", "apply", "table"],
                     help="check: compare the cluster's topics with the table (exit 1 where "
                          "a service would refuse to start); apply: create missing topics "
                          "and make the safe changes; table: print the table")

    sub = command("config", usage="tally config check DIR")
    sub.add_argument("action", choices=("check",), help="check: print ok, or every problem")
    sub.add_argument("dir", type=Path, help="the config directory, e.g. config")

    sub = command("simulate")
    sub.add_argument("--config", required=True, type=Path, help="config directory")
    sub.add_argument("--events", required=True, type=Path, help="JSONL file of usage events")
    sub.add_argument("--at", type=timestamp, help="ISO 8601 time with an offset (default: now)")

    sub = command("schemas")
    sub.add_argument("action", choices=("write", "check"),
                     help="write: regenerate the files; check: exit 1 naming stale files")
    sub.add_argument("--dir", type=Path, default=Path("schemas"),
                     help="the schema directory (default: ./schemas)")

    sub = command("ingest", "config", "http")
    sub.set_defaults(port=settings.ingest_port)
    sub.add_argument("--no-http", action="store_true", help="consume usage.raw only")

    sub = command("projector", "config", "store", "http")
    sub.set_defaults(port=settings.projector_port)
    sub.add_argument("--publish-after-commit", action="store_true",
                     help="send balances only once their batch has committed "
                          "(slower; the default sends them just before the commit)")
    sub.add_argument("--session-timeout", type=float, default=10.0,
                     help="seconds a silent instance keeps its partitions before the other "
                          "instances take them over (default: %(default)s; the broker's "
                          "group.min.session.timeout.ms, 6 s by default, is the floor)")
    sub.add_argument("--standby", action="store_true",
                     help="keep a warm copy of every partition this instance does not own "
                          "(nothing sent for them), to take a lost instance's over without "
                          "replaying them from the start")
    sub.add_argument("--bulk-from", type=int, default=5_000, metavar="N",
                     help="restore a partition gained N records or more behind through "
                          "replay's bulk path, a nearer one through the live fold (default: "
                          "%(default)s)")
    add_limit_options(sub)

    sub = command("enforcer", "config", "http")
    sub.set_defaults(port=settings.enforcer_port)
    sub.add_argument("--session-timeout", type=float, default=10.0,
                     help="seconds a silent instance keeps its partitions before the other "
                          "instances take them over (default: %(default)s; the broker's "
                          "group.min.session.timeout.ms, 6 s by default, is the floor)")

    sub = command("replay", "config", "store")
    sub.add_argument("--force", action="store_true", help="replace an existing file")

    sub = command("audit", description=AUDIT_DESCRIPTION,
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub.add_argument("sql", help='one read-only query, e.g. "FROM usage_by_model"')
    sub.add_argument("--db", type=Path, action="append",
                     help="query this DuckDB file (e.g. one `tally replay --db` built) instead "
                          "of the projector; without it, the running projector answers, else "
                          f"its file is opened ({settings.data_dir / 'projector.duckdb'}). "
                          "Given again (the files of stopped projector instances), each file "
                          "answers, its rows led by a db column; refused if two files hold "
                          "the same partition")
    sub.add_argument("--url", default=f"http://127.0.0.1:{settings.projector_port}",
                     help="the running projector to ask first (default: %(default)s)")
    sub.add_argument("--instances", action="store_true",
                     help="ask every projector instance of `tally status --instances` and "
                          "print their rows one after the other, led by the instance")
    sub.add_argument("--format", choices=("table", "json", "csv"), default="table",
                     help="how to print the rows (default: table)")
    sub.add_argument("--api-key", default=settings.api_key,
                     help="an admin's API key from users.yaml (default: TALLY_API_KEY)")
    sub.add_argument("--token", default=settings.token,
                     help="a JWT with the admin role (default: TALLY_TOKEN)")

    sub = command("status")
    sub.add_argument("--instances", action="store_true",
                     help="list the running projector and enforcer instances, their "
                          "partitions and lag")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """The parsed command line (SystemExit for --help, 0, and for a usage error, 2)."""
    args, extra = build_parser().parse_known_args(argv)
    if extra:  # said with the command's own usage line, not the top level's
        args.parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def command_main(name: str) -> Callable[[list[str]], int]:
    """`main(argv)` of one command, argv without its name: `tally NAME ARGV...`."""
    return lambda argv: main([name, *argv])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        build_parser().print_help()
        return 0
    args = parse(argv)
    return guarded(f"tally {args.command}", lambda: run(args))


def run(args: argparse.Namespace) -> int:
    """Run the parsed command in its module."""
    if args.command in NEEDS_KAFKA:
        require_kafka(Settings.from_env().bootstrap_servers)
    module = importlib.import_module(args.module)
    result: int = module.run(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
