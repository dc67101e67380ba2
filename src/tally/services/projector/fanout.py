"""`tally audit --instances`: one query asked of every projector instance, the answers
concatenated, each row led by the instance that gave it.

The instances are those of the instances topic (tally.instances) with an HTTP URL. Each
answers for the usage.events partitions it owns, and an event is in one instance's file
only, so a per-user query is exact (a user lives on one partition: their rows come from
one instance), and a global aggregate comes as one partial row per instance, to be added
up (a sum or a count adds; an average or a distinct count does not).

A standby (`tally projector --standby`) holds every partition in its file, those it follows
as well as those it owns: asked beside the others it would count their events twice. It is
not asked while it owns nothing; once it owns partitions (it took a lost instance's over)
it is asked alone, for its file then holds every event (up to its lag) and answers every
query exactly, averages included.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tally.instances import InstanceSeen, read_instances
from tally.services.projector.query import AuditError, QueryResult
from tally.topics import Topics

__all__ = ["answering", "ask_instances"]


def answering(seen: list[InstanceSeen]) -> list[InstanceSeen]:
    """The projector instances whose files hold every event once between them: the active
    ones, or a standby that owns partitions alone (module doc)."""
    projectors = [s for s in seen if s.role == "projector" and s.url]
    took_over = [s for s in projectors if s.standby and s.partitions]
    return took_over[:1] or [s for s in projectors if not s.standby]


def ask_instances(bootstrap: str, topics: Topics,
                  ask: Callable[[str], QueryResult | None]) -> QueryResult:
    """Every running projector instance's answer (`ask` of its URL: the query, or None when
    nobody listens), rows prefixed by the instance id."""
    seen = answering(asyncio.run(read_instances(bootstrap, topics)))
    if not seen:
        raise AuditError("no projector instance is listed in the instances topic "
                         "(`tally status --instances`)")
    columns: list[str] | None = None
    rows: list[tuple[object, ...]] = []
    truncated = False
    for instance in seen:
        assert instance.url is not None
        answer = ask(instance.url)
        if answer is None:
            raise AuditError(f"the projector instance {instance.instance} at {instance.url} "
                             "did not answer: its share of the data is missing")
        columns = columns or ["instance", *answer.columns]
        rows += [(instance.instance, *row) for row in answer.rows]
        truncated = truncated or answer.truncated
    assert columns is not None
    return QueryResult(columns, rows, truncated)
