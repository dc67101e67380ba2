"""What a fault run sends, and what it should come to. Pure: no I/O, no clock.

The events are what a gateway puts on usage.raw: valid usage events (a tenth of them sent
twice with the same event_id, the copy later in the stream) and one in a hundred malformed
messages. The config gives every user a daily limit sized to their own usage, so that some
end ok, some past a warning and some over the limit. The recount is plain arithmetic on
the events (UTC midnight days, first-of-month months), independent of tally.core.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson

__all__ = [
    "AUDITOR_KEY",
    "DEPARTMENT",
    "GUESTS",
    "Event",
    "Workload",
    "budgets_yaml",
    "make_workload",
    "recount",
    "user_totals",
    "users_yaml",
]

USERS = tuple(f"user_{i:02d}" for i in range(40))
AUDITOR_KEY = "ak_faults_auditor_0001"
GUESTS = ("openai-user:guest-a", "openai-user:guest-b")  # claimed by nobody: default limits
DEPARTMENT = "research"  # a shared budget over the first six users
MODELS = (("anthropic/claude-sonnet-4", "anthropic"), ("openai/gpt-4.1", "openai"),
          ("anthropic/claude-3-haiku", "anthropic"))
DAILY_PERCENTS = (40, 80, 95, 150, 300)  # where each user's daily usage ends, cycled
MAX_COPY_DISTANCE = 20_000  # how far behind its original a duplicate may be sent


@dataclass(frozen=True, slots=True)
class Event:
    """One valid usage event, as produced (counted tokens: input + output)."""

    event_id: str
    user_id: str
    occurred_at: datetime
    model: str
    provider: str
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int

    def to_json(self) -> bytes:
        return orjson.dumps({
            "event_id": self.event_id, "occurred_at": self.occurred_at.isoformat(),
            "user_id": self.user_id, "model": self.model, "provider": self.provider,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "cache_read_tokens": self.cache_read_tokens, "source": "bench.faults",
        })

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class Workload:
    """The distinct valid events, the malformed messages, and every message in send order."""

    events: tuple[Event, ...]
    malformed: frozenset[bytes]
    sends: tuple[bytes, ...]

    @property
    def duplicates(self) -> int:
        return len(self.sends) - len(self.events) - len(self.malformed)


def make_workload(count: int, seed: int, start: datetime, end: datetime) -> Workload:
    """`count` distinct messages (1% malformed) with occurred_at in [start, end)."""
    rng = random.Random(seed)
    malformed_count = max(1, count // 100)
    events = tuple(_event(rng, f"{seed}-{i}", start, end)
                   for i in range(count - malformed_count))
    malformed = [_malformed(i, rng) for i in range(malformed_count)]
    originals = [e.to_json() for e in events]
    copies = rng.sample(range(len(originals)), k=count // 10)
    sends = _interleave(rng, originals, copies, malformed)
    return Workload(events, frozenset(malformed), tuple(sends))


def _weights() -> list[float]:
    return [1.0 / (1 + i % 7) for i in range(len(USERS) + len(GUESTS))]


def _event(rng: random.Random, event_id: str, start: datetime, end: datetime) -> Event:
    user = rng.choices((*USERS, *GUESTS), weights=_weights())[0]
    model, provider = rng.choice(MODELS)
    span = max(1, int((end - start).total_seconds() * 1000))
    return Event(event_id, user, start + timedelta(milliseconds=rng.randrange(span)), model,
                 provider, rng.randrange(2000), rng.randrange(1000), rng.randrange(500))


def _malformed(i: int, rng: random.Random) -> bytes:
    """A message ingest must refuse; each is unique (the marker) except the empty one."""
    marker = f"bad-{i}-{rng.randrange(10**9)}"
    kinds: list[Any] = [
        {"event_id": marker, "user_id": "user_00", "model": "m", "input_tokens": 1},
        {"event_id": marker, "occurred_at": "2026-01-01T00:00:00", "user_id": "user_01",
         "model": "m", "input_tokens": 1, "output_tokens": 1},
        {"event_id": marker, "occurred_at": "2026-01-01T00:00:00Z", "user_id": "user_02",
         "model": "m", "input_tokens": -5, "output_tokens": 1},
        {"event_id": marker, "occurred_at": "2026-01-01T00:00:00Z", "user_id": "user_03",
         "model": "m", "input_tokens": "many", "output_tokens": 1, "surprise": True},
        [marker],
    ]
    if i == 0:
        return b""
    if i < 3:
        return orjson.dumps({"event_id": marker, "padding": "x" * 70_000})
    if i % 6 == 5:
        return f'{{"event_id": "{marker}", "occurred_at": '.encode()  # cut short
    return orjson.dumps(kinds[i % 6])


def _interleave(rng: random.Random, originals: list[bytes], copies: list[int],
                malformed: list[bytes]) -> list[bytes]:
    """Originals in order; each copy some way behind its original; malformed anywhere."""
    slots: dict[int, list[bytes]] = {}
    for index in copies:
        later = min(len(originals) - 1, index + rng.randrange(MAX_COPY_DISTANCE))
        slots.setdefault(later, []).append(originals[index])
    for message in malformed:
        slots.setdefault(rng.randrange(len(originals)), []).append(message)
    return list(_merged(originals, slots))


def _merged(originals: list[bytes], slots: dict[int, list[bytes]]) -> Iterator[bytes]:
    for i, message in enumerate(originals):
        yield message
        yield from slots.get(i, ())


# what it should come to ------------------------------------------------------------------

PeriodRow = tuple[str, str, datetime]  # (user_id, "daily" | "monthly", period start in UTC)


def recount(events: Iterable[Event]) -> dict[PeriodRow, int]:
    """Counted tokens per user and period: days start at 00:00 UTC, weeks on Mondays,
    months on the 1st."""
    totals: Counter[PeriodRow] = Counter()
    for e in events:
        day = e.occurred_at.replace(hour=0, minute=0, second=0, microsecond=0)
        totals[(e.user_id, "daily", day)] += e.tokens
        totals[(e.user_id, "weekly", day - timedelta(days=day.weekday()))] += e.tokens
        totals[(e.user_id, "monthly", day.replace(day=1))] += e.tokens
    return dict(totals)


def user_totals(events: Iterable[Event]) -> dict[str, int]:
    totals: Counter[str] = Counter()
    for e in events:
        totals[e.user_id] += e.tokens
    return dict(totals)


def users_yaml() -> dict[str, Any]:
    users = [{"id": u, "role": "developer" if i % 2 else "viewer",
              **({"department": DEPARTMENT} if i < 6 else {})}
             for i, u in enumerate(USERS)]
    # The drain check asks the projector's /audit, which answers admins only.
    auditor = {"id": "auditor", "api_key": AUDITOR_KEY, "role": "admin"}
    return {"user_identification": {"users": [*users, auditor]}}


def budgets_yaml(totals: dict[str, int]) -> dict[str, Any]:
    """Small limits sized to each user's usage: ok, warnings and over-limit all happen."""
    guests = max(1, sum(totals.get(g, 0) for g in GUESTS) // len(GUESTS))
    research = sum(totals.get(u, 0) for u in USERS[:6])
    return {"per_user_budgets": {
        "default_limits": {"daily_tokens": guests * 100 // 85, "monthly_tokens": guests * 30},
        "user_overrides": {u: _override(i, totals.get(u, 0)) for i, u in enumerate(USERS)},
        "role_limits": {"developer": 1_000_000, "viewer": 500_000, "admin": 1_000},
        "reset_schedule": {"daily_reset_time": "00:00", "monthly_reset_day": 1,
                           "timezone": "UTC"},
        "warnings": [{"at_percent": 75, "message": "75% of your {period} budget used"},
                     {"at_percent": 90, "message": "90% of your {period} budget used"}],
        "include_budget_in_response": True,
        "on_limit_exceeded": {"action": "hard_stop"},
        "department_budgets": {DEPARTMENT: {"daily_tokens": research * 100 // 110,
                                            "monthly_tokens": research * 30}},
        "counted_tokens": ["input_tokens", "output_tokens"],
    }}


def _override(i: int, total: int) -> dict[str, int]:
    daily = max(1, total * 100 // DAILY_PERCENTS[i % len(DAILY_PERCENTS)])
    monthly = max(1, total * 100 // 120) if i % 7 == 3 else daily * 30
    return {"daily_tokens": daily, "monthly_tokens": monthly}
