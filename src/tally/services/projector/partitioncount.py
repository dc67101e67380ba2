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
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from tally.errors import ClusterError
from tally.services.projector import store

__all__ = ["PartitionCountChanged", "check_partition_count", "keep_partition_count"]


class PartitionCountChanged(ClusterError):
    """usage.events has another partition count than the projector's file was written under."""


def check_partition_count(topic: str, stored: int | None, found: int, db: Path | str) -> None:
    """PartitionCountChanged unless `found` (the topic's count) is the `stored` one (or
    none is stored yet)."""
    if stored is None or stored == found:
        return
    raise PartitionCountChanged(
        f"{topic} has {found} partitions, but {db} was written when it had {stored}: a "
        "user's events go to one partition by their key, so changing the count moved users "
        "between partitions, which this file's per-partition ledger, balances and offsets "
        "cannot follow. Create the topics with the count wanted in a new namespace "
        "(TALLY_TOPIC_NAMESPACE, TALLY_PARTITIONS), copy usage.events into it keyed by "
        "user_id, and start the projectors on it with new data dirs (`tally replay --db` "
        "builds a file from it); or, to go back, restore the topic with its "
        f"{stored} partitions")


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
