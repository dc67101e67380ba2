"""`tally topics check|apply`: the cluster's topics against the topic table (tally.topics).

`check` prints every difference (refusing ones first) and exits 1 when a service would
refuse to start; `apply` creates the missing topics, makes the safe changes and prints
what is left for a hand to fix, with the command for each; `table` prints the table as
the README shows it.
"""

from __future__ import annotations

import argparse
import asyncio

from tally.cli import command_main
from tally.kafka import apply_topics, check_topics
from tally.settings import Settings
from tally.topiccheck import Difference, describe_ms
from tally.topics import TABLE, TopicSpec

__all__ = ["main", "markdown_table", "run"]


def markdown_table() -> str:
    """The topic table as README.md shows it (a test keeps the two equal)."""
    lines = ["| topic | key | cleanup.policy | retention.ms | vital | holds |",
             "|---|---|---|---|---|---|"]
    lines += [f"| `{s.base}` | {_cell(s.key)} | {s.cleanup_policy} | {_retention(s)} | "
              f"{'yes' if s.vital else 'no'} | {s.purpose} |" for s in TABLE]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")  # a bare | would end the Markdown cell


def _retention(spec: TopicSpec) -> str:
    return describe_ms(str(spec.retention_ms)) if spec.deletes else "(compacted)"


def report(differences: list[Difference], settings: Settings) -> int:
    """Print the differences; 1 when one of them stops the services."""
    where = f"{settings.bootstrap_servers}, namespace {settings.topic_namespace or '(none)'}"
    if not differences:
        print(f"topics agree with the table ({where})")
        return 0
    print(f"topics differ from the table ({where}):")
    for difference in sorted(differences, key=lambda d: not d.refuses):
        print(difference.describe())
    return 1 if any(d.refuses for d in differences) else 0


def run(args: argparse.Namespace) -> int:
    if args.action == "table":
        print(markdown_table())
        return 0
    settings = Settings.from_env()
    act = check_topics if args.action == "check" else apply_topics
    differences = asyncio.run(act(settings.bootstrap_servers, settings.topics,
                                  settings.partitions))
    if args.action == "apply":
        print(f"applied the safe changes; {len(differences)} left")
    return report(differences, settings)


main = command_main("topics")
