"""The partition count of usage.events a projector's file was written under.

A user's events go to the partition their key (user_id) hashes to, among the partitions
the topic has. Kafka can add partitions to a topic, never take them away, and once it has
more, many users' new events go to another partition than their earlier ones. What the
projector keeps per partition then splits a user in two: each instance's ledger, balances
and offsets, the position a balance carries (readers compare positions within one
partition), and which instance owns a user. Nothing in the file can be repaired in place.

So a projector records the count in its file when it first opens it (a file written
before the count was recorded takes the count it finds), and refuses to start under
another count, or to go on when a rebalance shows one (`PartitionCountChanged`: the CLI
says it in one line and exits with ExitCode.REFUSED). `tally topics check` cannot say it:
the count lives in each projector's file, which only its running projector may open.

The enforcers' ownership is per budget.balances partition, which is keyed by user too, and
they keep no file: an enforcer refuses to start, or stops at a rebalance, when
budget.balances has another count than usage.events (`check_same_count`), both created
with TALLY_PARTITIONS by `tally topics create`.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from tally.errors import ClusterError
from tally.services.projector import store

__all__ = ["PartitionCountChanged", "check_partition_count", "check_same_count",
           "keep_partition_count"]


class PartitionCountChanged(ClusterError):
    """usage.events has another partition count than the projector's file was written
    under, or budget.balances another than usage.events."""


def check_partition_count(topic: str, stored: int | None, found: int, db: Path | str) -> None:
    """PartitionCountChanged unless `found` (the topic's count) is the `stored` one (or
    none is stored yet)."""
    if stored is not None:
        _refuse_unless(topic, found, stored, f"{db} was written when it had {stored}",
                       "this file's per-partition ledger, balances and offsets")


def check_same_count(topic: str, found: int, reference: str, expected: int) -> None:
    """PartitionCountChanged unless `topic` has `expected` partitions, the count of
    `reference`: `tally topics create` gives every topic TALLY_PARTITIONS. The enforcers'
    guard on budget.balances (their ownership is per partition of it, and they keep no
    file to record a count in)."""
    _refuse_unless(topic, found, expected,
                   f"{reference} has {expected}, and `tally topics create` gives both "
                   "TALLY_PARTITIONS", f"the enforcers' ownership (per partition of {topic}: "
                   "two instances would decide for one user)")


def _refuse_unless(topic: str, found: int, wanted: int, against: str, kept_by: str) -> None:
    if found == wanted:
        return
    raise PartitionCountChanged(
        f"{topic} has {found} partitions, but {against}: a user's records go to one "
        "partition by their key, so changing the count moved users between partitions, "
        f"which {kept_by} cannot follow. Create the topics with the count wanted in a new "
        "namespace (TALLY_TOPIC_NAMESPACE, TALLY_PARTITIONS), copy usage.events into it "
        "keyed by user_id, and start the projectors on it with new data dirs (`tally "
        "replay --db` builds a file from it) and the enforcers; or, to go back, restore "
        f"{topic} with its {wanted} partitions")


def keep_partition_count(con: duckdb.DuckDBPyConnection, topic: str, found: int,
                         db: Path | str) -> int:
    """The count stored in the file for `topic`, recorded as `found` if none was;
    PartitionCountChanged if another was."""
    name = f"partitions:{topic}"
    stored = store.setting(con, name)
    check_partition_count(topic, None if stored is None else int(stored), found, db)
    if stored is None:
        store.record_setting(con, name, str(found))
    return found
