"""The files of stopped projector instances, audited together (`tally audit --db A --db B`):
refused when two hold the same partition.

While the instances run, each partition is in one active instance's file: an instance
drops from its file what the group gives another (ownership.py). At rest that no longer
holds. An instance stopped (cleanly or not) keeps in its file the partitions it owned, and
another instance takes them over meanwhile, replaying them into its own file; of two
stopped a moment apart, the later may have begun restoring the earlier one's partitions
(once its own stop has begun it folds nothing more, so a partition gained then is not
written); and a standby's file holds every partition. The next start puts it right (the
group places each partition where its file holds it furthest, and the others drop it),
but a query over such files at rest would count those partitions' events twice. So the
offline audit checks first, from each file's stored offsets, that no partition is held by
two files, and names the files and the partition when one is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from tally.services.projector.query import AuditError

__all__ = ["HELD_SQL", "check_disjoint", "shared"]

# What a file holds: each partition (of usage.events and usage.dlq) folded into it, and
# the next offset it stores. A partition at offset 0 holds nothing.
HELD_SQL = "SELECT topic, partition, next_offset FROM offsets WHERE next_offset > 0"

Partition = tuple[str, int]


def shared(held: Mapping[str, Iterable[tuple[str, int, int]]]) -> dict[Partition, dict[str, int]]:
    """Each partition two or more files hold, with the offset each holds it to (per file,
    rows as HELD_SQL gives them); in order of topic and partition."""
    holders: dict[Partition, dict[str, int]] = {}
    for db, rows in held.items():
        for topic, partition, offset in rows:
            holders.setdefault((topic, int(partition)), {})[db] = int(offset)
    return {tp: found for tp, found in sorted(holders.items()) if len(found) > 1}


def check_disjoint(held: Mapping[str, Iterable[tuple[str, int, int]]]) -> None:
    """AuditError naming the files and the first partition they share, if any is shared."""
    twice = shared(held)
    if not twice:
        return
    (topic, partition), found = next(iter(twice.items()))
    files = " and ".join(f"{db} (to offset {offset})" for db, offset in found.items())
    more = len(twice) - 1
    others = (f", and {more} more partition{'s are' if more > 1 else ' is'} held twice"
              if more else "")
    raise AuditError(
        f"{files} both hold partition {partition} of {topic}{others}: audited together, "
        "their events would be counted twice. A stopped projector's file keeps the "
        "partitions it owned while another instance takes them over, and a standby's file "
        "holds every partition. Audit one file at a time, or start the projectors (each "
        "drops from its file the partitions the group gives another) and ask "
        "`tally audit --instances`")
