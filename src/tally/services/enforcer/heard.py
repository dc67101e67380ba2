"""What the enforcer instances have said, read back and followed: budget.decisions and
budget.alert_memory whole (compacted: about one record per key), and budget.alerts from
its tail (the last MAX_ALERTS of each partition, so its retention and length do not
matter).

At start this is the restore: what earlier runs said, so a restart repeats no decision and
no alert. Afterwards it is how an instance learns what the others decide (the API and the
dashboard answer for every user, so any instance can sit behind a load balancer), and what
it knows of their alerts when it takes their users over: `caught_up` waits until every
record published before the call is heard, and the loop calls it before judging the users
of partitions it gains. The partitions' last owner published its last batch before giving
them up (group.py), so that batch is heard too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable
from typing import TypeVar

from pydantic import BaseModel

from tally.kafka import CatchUp, Record, fetch, make_consumer, partitions_of
from tally.services.enforcer.board import MAX_ALERTS, Board
from tally.services.enforcer.memory import AlertsSent
from tally.topics import Topics
from tally.wire import BudgetAlerted, BudgetDecided, bounded_text

__all__ = ["Heard", "Said", "decode_all"]

W = TypeVar("W", bound=BaseModel)

log = logging.getLogger(__name__)

SAID_AT_MOST = 64  # decisions of one user on the way back, past which the oldest is decoded


def decode_all(model: type[W], records: Iterable[Record]) -> list[W]:
    """Every record that is a valid `model`; the others are logged and skipped (a
    tombstone, value None, is skipped quietly)."""
    found = []
    for record in records:
        if record.value is None:
            continue
        try:
            found.append(model.model_validate_json(record.value))
        except ValueError as error:
            log.warning("skipping an undecodable %s at %s: %s", model.__name__, record.source,
                        bounded_text(str(error), 500))
    return found


class Said:
    """The JSON of each decision this instance sent and has not heard back yet, with the
    decision: most decisions read back are its own, and one whose bytes are those sent is
    that decision, without decoding it again (`model_validate_json` was the largest cost
    of hearing them: ~20 us a decision). Per user in the order sent, as they come back
    (one partition a user); when behind, a user has several on the way."""

    def __init__(self) -> None:
        self._sent: dict[str, deque[tuple[bytes, BudgetDecided]]] = {}

    def encode(self, decision: BudgetDecided) -> bytes:
        """The decision's JSON, to send: remembered until it is heard back."""
        data = decision.model_dump_json().encode()
        on_the_way = self._sent.setdefault(decision.user_id, deque(maxlen=SAID_AT_MOST))
        on_the_way.append((data, decision))
        return data

    def _heard(self, user: str, value: bytes | None) -> BudgetDecided | None:
        """The decision sent as `value`, forgetting it and any sent before it (overtaken:
        never to be heard); None if none was."""
        on_the_way = self._sent.get(user)
        if on_the_way is None:
            return None
        for i, (data, decision) in enumerate(on_the_way):
            if data == value:
                for _ in range(i + 1):
                    on_the_way.popleft()
                if not on_the_way:
                    del self._sent[user]
                return decision
        return None

    def decode(self, records: Iterable[Record]) -> list[BudgetDecided]:
        """`decode_all` of budget.decisions records, taking the decisions sent as they are."""
        found: list[BudgetDecided] = []
        for record in records:
            # A key that is not UTF-8 is no user's (any bytes can be written to the topic).
            sent = self._heard((record.key or b"").decode("utf-8", "replace"), record.value)
            if sent is not None:
                found.append(sent)
            else:
                found.extend(decode_all(BudgetDecided, [record]))
        return found


class Heard:
    """One consumer on the three topics, every partition assigned; `follow` runs beside
    the loop and hands what it reads to the enforcer's state and the board."""

    def __init__(self, bootstrap: str, topics: Topics, board: Board) -> None:
        self.topics, self.board = topics, board
        self.said = Said()  # what the loop sends (app.py)
        self.consumer = make_consumer(bootstrap, fetch_max_wait_ms=100)
        self._advanced = asyncio.Event()

    async def start(self) -> None:
        await self.consumer.start()
        topics = self.topics
        parts = [tp for topic in (topics.budget_decisions, topics.budget_alert_memory,
                                  topics.budget_alerts)
                 for tp in await partitions_of(self.consumer, topic)]
        self.consumer.assign(parts)
        await self.consumer.seek_to_beginning(*parts)
        alerts = [tp for tp in parts if tp.topic == topics.budget_alerts]
        for tp, end in (await self.consumer.end_offsets(alerts)).items():
            self.consumer.seek(tp, max(await self.consumer.position(tp), end - MAX_ALERTS))

    async def stop(self) -> None:
        await self.consumer.stop()

    async def follow(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.hear(await fetch(self.consumer, 10_000, 100))
            self._advanced.set()

    async def caught_up(self, stop: asyncio.Event) -> bool:
        """Return once everything published before this call is heard (True), or
        `stop` is set (False)."""
        target = await CatchUp.taken(self.consumer, self.consumer.assignment())
        while not await target.reached(self.consumer):
            if stop.is_set():
                return False
            self._advanced.clear()
            with contextlib.suppress(TimeoutError):  # to look at `stop` again
                await asyncio.wait_for(self._advanced.wait(), 1.0)
        return True

    def hear(self, records: list[Record]) -> None:
        topics = self.topics
        taken = self.board.enforcer.hear(
            self.said.decode(_of(records, topics.budget_decisions)),
            decode_all(AlertsSent, _of(records, topics.budget_alert_memory)),
            alerts := decode_all(BudgetAlerted, _of(records, topics.budget_alerts)))
        self.board.hear(taken, alerts)


def _of(records: list[Record], topic: str) -> list[Record]:
    return [r for r in records if r.topic == topic]
