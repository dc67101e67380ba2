"""An audit over every projector instance: one query asked of each, the answers
concatenated, each row led by the instance that gave it. `tally audit --instances` and
POST /audit {"instances": true} both come here.

The instances are those of the instances topic (tally.instances). Each answers for the
usage.events partitions it owns, and an event is in one instance's file only, so a
per-user query is exact (a user lives on one partition: their rows come from one
instance), and a global aggregate comes as one partial row per instance, to be added up
(a sum or a count adds; an average or a distinct count does not).

Never a silently partial answer: an instance that must be asked and does not answer,
answers while restoring a partition (its answer says so), or cannot be asked is an error
naming it. Left out is only
an instance silent for a while whose partitions the instances heard lately all own (it
was killed, and its share has moved).

Only URLs of the instances topic are asked, never one a caller names, and only on this
host (`LOCAL_HOSTS`, over http): a projector's /audit answers local callers only, so a
remote URL could never answer, and a forged heartbeat pointing elsewhere must not get the
admin credential that is forwarded.

A standby (`tally projector --standby`) holds every partition in its file, those it follows
as well as those it owns: asked beside the others it would count their events twice. It is
not asked while it owns nothing; once it owns partitions (it took a lost instance's over)
it is asked alone, for its file then holds every event (up to its lag) and answers every
query exactly, averages included (`answering`).
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime

from aiokafka.errors import KafkaError

from tally.instances import SILENT_AFTER, InstanceSeen, read_instances
from tally.services.projector.query import AuditError, QueryResult, led_by
from tally.topics import Topics

__all__ = ["LOCAL_HOSTS", "answering", "ask_instances", "combine", "to_ask"]

LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
NOT_ANSWERING = 502  # the HTTP answer when an instance's share is missing
LISTING_TIMEOUT_S = 30.0  # to read the instances topic (a broker away must not hang a request)


async def ask_instances(bootstrap: str, topics: Topics,
                        ask: Callable[[str], Awaitable[QueryResult | None]]) -> QueryResult:
    """Every running projector instance's answer (`ask` of its URL: the query, or None when
    nobody listens there), asked at once, rows prefixed by the instance id."""
    try:
        listed = await asyncio.wait_for(read_instances(bootstrap, topics), LISTING_TIMEOUT_S)
    except (KafkaError, RuntimeError, TimeoutError) as e:  # the broker away, no such topic
        raise AuditError(f"cannot read the instances topic {topics.instances} to find the "
                         f"projector instances: {e!r}", 503) from e
    asked = to_ask(listed, datetime.now(UTC))
    asking = [asyncio.ensure_future(_answer(s, ask)) for s in asked]
    try:
        answers = await asyncio.gather(*asking)
    except BaseException:  # one failed (or the caller went): the others are not waited for
        for task in asking:
            task.cancel()
        raise
    return combine(zip(asked, answers, strict=True))


def answering(seen: Iterable[InstanceSeen]) -> list[InstanceSeen]:
    """The projector instances whose files hold every event once between them: the active
    ones, or a standby that owns partitions alone (module doc)."""
    projectors = [s for s in seen if s.role == "projector"]
    took_over = [s for s in projectors if s.standby and s.partitions]
    return took_over[:1] or [s for s in projectors if not s.standby]


def to_ask(seen: Iterable[InstanceSeen], now: datetime) -> list[InstanceSeen]:
    """The projector instances whose answers make the whole: all of them but a silent one
    whose partitions the others heard lately own. AuditError (naming the instance) when
    one has a URL that may not be asked. The silent are dropped before the standby rule
    (`answering`), so a standby that died after giving its partitions back is not asked."""
    projectors = [s for s in seen if s.role == "projector"]
    if not projectors:
        raise AuditError("no projector instance is listed in the instances topic "
                         "(`tally status --instances`)", NOT_ANSWERING)
    lately = {s.instance for s in projectors if now - s.at <= SILENT_AFTER}
    covered = {p for s in projectors if s.instance in lately for p in s.partitions}
    asked = answering(s for s in projectors
                      if s.instance in lately or not set(s.partitions) <= covered)
    for s in asked:
        _check_askable(s)
    return asked


def _check_askable(seen: InstanceSeen) -> None:
    url = urllib.parse.urlsplit(seen.url or "")
    if url.scheme != "http" or url.hostname not in LOCAL_HOSTS:
        raise AuditError(f"the projector instance {seen.instance} serves no audit this "
                         f"host may ask ({seen.url or 'no URL'}; only http on "
                         f"{', '.join(sorted(LOCAL_HOSTS))}): its share would be missing",
                         NOT_ANSWERING)


async def _answer(seen: InstanceSeen,
                  ask: Callable[[str], Awaitable[QueryResult | None]]) -> QueryResult:
    assert seen.url is not None  # _check_askable
    try:
        answer = await ask(seen.url)
    except AuditError as e:
        raise AuditError(f"the projector instance {seen.instance}: {e}", e.status) from e
    if answer is None:
        raise AuditError(f"the projector instance {seen.instance} at {seen.url} did not "
                         "answer: its share of the data is missing", NOT_ANSWERING)
    return answer


def combine(answers: Iterable[tuple[InstanceSeen, QueryResult]]) -> QueryResult:
    """The answers one after the other, each row led by its instance; AuditError if one
    came from an instance restoring a partition (the heartbeats say that too, but up to
    a heartbeat late: the answer says it as the query began)."""
    answers = list(answers)
    for instance, answer in answers:
        if answer.restoring:
            raise AuditError(f"the projector instance {instance.instance} is restoring "
                             f"partitions {','.join(map(str, answer.restoring))} of "
                             f"{instance.topic}: its share is incomplete until it catches "
                             "up; ask again shortly", 503)
    # to_ask names one instance at least
    return led_by("instance", ((seen.instance, answer) for seen, answer in answers))
