"""The wire contract: every message that crosses Kafka, as frozen pydantic models.

Each carries a `schema_version`; `tally schemas write` renders them into schemas/*.json.
Events are named in the past tense (what happened), as in eventsourcing.

Every value a sender chooses has its range named here, once: token counts are integers
(never strings or booleans) from 0 to MAX_TOKENS, so that no sum over any history can
overflow a 64-bit balance (2^63 / (4 x 10^9) is two billion events of the largest size for
one user); `occurred_at` lies within EARLIEST_EVENT..LATEST_EVENT, a static window that
every period computation handles (the ingest narrows it further around its own clock);
texts have a maximum length. Consumers re-check them (`in_range`), because a producer may
write to a topic directly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, NamedTuple, get_args

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

__all__ = [
    "CONTROL_CHARACTERS",
    "EARLIEST_EVENT",
    "LATEST_EVENT",
    "MAX_AMOUNT",
    "MAX_ORIGINAL_BYTES",
    "MAX_REASON_CHARS",
    "MAX_TEXT",
    "MAX_TOKENS",
    "PERIOD_NAMES",
    "PRINTABLE",
    "WIRE_MODELS",
    "ActionName",
    "AlertKind",
    "BalanceUpdated",
    "BudgetAlerted",
    "BudgetDecided",
    "PeriodName",
    "PeriodStatus",
    "RejectedEvent",
    "SourcePosition",
    "StatusName",
    "UsageRecorded",
    "bounded_text",
    "event_time_problem",
    "rejection",
]

PeriodName = Literal["daily", "weekly", "monthly"]  # the period table's kinds, shortest first
PERIOD_NAMES: tuple[PeriodName, ...] = get_args(PeriodName)
StatusName = Literal["ok", "warning", "over_limit"]
ActionName = Literal["allow", "warn", "soft_limit", "hard_stop", "reduced_priority"]
AlertKind = Literal["warning", "limit", "reset"]


MAX_TOKENS = 1_000_000_000  # per field of one event: far above any real model call
MAX_TEXT = 200  # characters of an id, a model name or a label
EARLIEST_EVENT = datetime(2000, 1, 1, tzinfo=UTC)
LATEST_EVENT = datetime(2200, 1, 1, tzinfo=UTC)
MAX_AMOUNT = 2**62  # any balance, limit or percentage: 64-bit arithmetic never overflows
MAX_REASON_CHARS = 2_000
MAX_ORIGINAL_BYTES = 16 * 1024  # the DLQ keeps this much of an original, plus size and hash


def event_time_problem(at: datetime) -> str | None:
    """Why an event time is outside the static window, or None."""
    if at.tzinfo is None:
        return "must have a time zone"
    if not EARLIEST_EVENT <= at < LATEST_EVENT:
        return (f"must be from {EARLIEST_EVENT:%Y-%m-%d} to before {LATEST_EVENT:%Y-%m-%d} "
                f"(UTC), got {at.isoformat()}")
    return None


def _event_time(at: datetime) -> datetime:
    problem = event_time_problem(at)
    if problem:
        raise ValueError(problem)
    return at


# No control characters in texts: ids end up in logs, headers and terminals.
CONTROL_CHARACTERS = r"[\x00-\x1f\x7f]"  # the same syntax in Python's re and Arrow's RE2
PRINTABLE = f"^[^{CONTROL_CHARACTERS[1:-1]}]*$"

TokenCount = Annotated[int, Field(ge=0, le=MAX_TOKENS, strict=True)]
Amount = Annotated[int, Field(ge=0, le=MAX_AMOUNT)]
Text = Annotated[str, Field(min_length=1, max_length=MAX_TEXT, pattern=PRINTABLE)]
OptionalText = Annotated[str | None, Field(max_length=MAX_TEXT, pattern=PRINTABLE)]
EventTime = Annotated[AwareDatetime, AfterValidator(_event_time), Field(
    description=f"from {EARLIEST_EVENT:%Y-%m-%d} to before {LATEST_EVENT:%Y-%m-%d} (UTC); "
                "the ingest also refuses times too far from its clock")]


class Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UsageRecorded(Wire):
    """One model call's token usage, as a gateway reports it (usage.raw, usage.events)."""

    schema_version: Literal[1] = 1
    event_id: Text
    occurred_at: EventTime
    user_id: Text
    model: Text
    provider: OptionalText = None
    input_tokens: TokenCount
    output_tokens: TokenCount
    cache_read_tokens: TokenCount = 0
    cache_write_tokens: TokenCount = 0
    session_key: OptionalText = None
    channel: OptionalText = None
    request_id: OptionalText = None
    source: OptionalText = None
    role: OptionalText = None
    department: OptionalText = None
    project: OptionalText = None


class RejectedEvent(Wire):
    """What usage.dlq holds: why a record was refused, from where, and the record itself:
    whole when it is small, else its first MAX_ORIGINAL_BYTES, so that a DLQ record never
    outgrows what the topic accepts; `original_size` and `original_sha256` describe all of it."""

    schema_version: Literal[1] = 1
    reason: str = Field(max_length=MAX_REASON_CHARS)
    source: str  # "kafka:usage.raw[0]@42", "http:POST /v1/usage"
    original: str  # the original bytes (a prefix if truncated), decoded with replacement
    original_size: int | None = Field(default=None, ge=0)  # bytes of the whole original
    original_sha256: str | None = None  # hex digest of the whole original
    original_truncated: bool = False
    rejected_at: AwareDatetime


# A period holding an event may start up to a month (and a time zone) before the event.
_EARLIEST_PERIOD = EARLIEST_EVENT - timedelta(days=62)


def _period_starts(periods: dict[str, int]) -> dict[str, int]:
    for key in periods:
        try:
            at = datetime.fromisoformat(key)
        except ValueError:
            raise ValueError(f"period start {key[:40]!r}: not an ISO 8601 time") from None
        if at.tzinfo is None or not _EARLIEST_PERIOD <= at < LATEST_EVENT:
            raise ValueError(f"period start {key[:40]!r}: outside "
                             f"{_EARLIEST_PERIOD:%Y-%m-%d}..{LATEST_EVENT:%Y-%m-%d} (UTC)")
    return periods


PeriodTotals = Annotated[dict[str, Amount], AfterValidator(_period_starts)]


class SourcePosition(NamedTuple):
    """Where a balance came from: its usage.events partition and offset (None: unknown).
    A reader keeps this alone per user, not the whole balance, to order the next one."""

    partition: int | None
    offset: int | None

    def superseded_by(self, other: SourcePosition) -> bool:
        """See BalanceUpdated.superseded_by."""
        if (self.partition is None or other.partition is None
                or self.partition != other.partition
                or self.offset is None or other.offset is None):
            return True
        return other.offset >= self.offset


class BalanceUpdated(Wire):
    """A user's absolute usage per period (budget.balances, compacted by user_id).

    Each period kind (`daily`, `monthly`, ...) is a key of its own, mapping each period's
    start (ISO 8601, UTC) to the tokens used in it; every period with usage is listed, so
    rollover can be derived without other state. A kind a record does not name has no
    usage (records written before the kind existed stay readable).
    """

    schema_version: Literal[1] = 1
    user_id: Text
    role: OptionalText = None
    department: OptionalText = None
    project: OptionalText = None
    # On the wire, each kind is a top-level key (see _gather_periods / _spread_periods).
    periods: dict[PeriodName, PeriodTotals] = Field(default_factory=dict)
    last_event_at: AwareDatetime
    as_of: AwareDatetime
    # Where the projector stood when it sent this: the usage.events partition that holds
    # the user's events and the offset just past the last record it had folded. With more
    # than one projector, an instance that lost the partition (a zombie finishing a batch)
    # may still send; readers keep the balance of the highest offset (see `superseded_by`).
    # None in records written before instances existed.
    source_partition: int | None = Field(default=None, ge=0, le=1_000_000)
    source_offset: int | None = Field(default=None, ge=0)

    @property
    def source(self) -> SourcePosition:
        return SourcePosition(self.source_partition, self.source_offset)

    def superseded_by(self, other: BalanceUpdated) -> bool:
        """Whether `other`, a later record for the same user, replaces this one: anything
        but an older position in the same partition (equal is a resend or a recut)."""
        return self.source.superseded_by(other.source)

    @model_validator(mode="before")
    @classmethod
    def _gather_periods(cls, data: Any) -> Any:
        if isinstance(data, dict) and "periods" not in data:
            periods = {kind: data[kind] for kind in PERIOD_NAMES if kind in data}
            data = {key: value for key, value in data.items() if key not in periods}
            data["periods"] = periods
        return data

    @model_serializer(mode="wrap")
    def _spread_periods(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return _spread(handler(self), lambda periods: {
            kind: periods.get(kind, {}) for kind in PERIOD_NAMES})

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler.resolve_ref_schema(handler(core_schema))
        schema["properties"] = _spread(schema["properties"], lambda periods: {
            kind: {**periods["additionalProperties"], "title": kind.capitalize(),
                   "default": {}} for kind in PERIOD_NAMES})
        return schema


def _spread(data: dict[str, Any], kinds: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
    """`data` with its "periods" entry replaced, in place, by one entry per period kind."""
    spread: dict[str, Any] = {}
    for key, value in data.items():
        spread.update(kinds(value) if key == "periods" else {key: value})
    return spread


class PeriodStatus(Wire):
    """One period's standing against its limit."""

    period: PeriodName
    period_start: datetime
    tokens_used: Amount
    tokens_limit: Amount
    tokens_remaining: Amount
    percent_used: Amount
    status: StatusName
    reset_time: str  # ISO 8601 in the configured time zone


class BudgetDecided(Wire):
    """What the gateway should do for a user now (budget.decisions, compacted by user_id)."""

    schema_version: Literal[1] = 1
    user_id: Text
    status: StatusName
    action: ActionName
    period: PeriodName
    budget: str = "user"  # which budget drove it: "user", "department:<name>", "project:<name>"
    percent_used: Amount
    tokens_used: Amount
    tokens_limit: Amount
    tokens_remaining: Amount
    reset_time: str
    message: str | None = None
    footer: str | None = None
    force_model: str | None = None
    status_code: int | None = Field(default=None, ge=100, le=599)
    # The user's own budget, one field per period kind (the brief's keys); weekly only
    # where a weekly limit is configured. Code reads them through `periods`.
    daily: PeriodStatus
    monthly: PeriodStatus
    weekly: PeriodStatus | None = None
    as_of: AwareDatetime
    # The gateway identities the user claims in users.yaml (normalised), so a gateway that
    # knows a person only as "openai-user:alice" finds the decision of user_alice.
    identities: tuple[str, ...] = ()
    # api_key_digest() of the user's users.yaml api_key, so a gateway's front door can
    # recognise the key its caller presents without holding the key itself.
    key_digests: tuple[str, ...] = ()

    @property
    def periods(self) -> dict[PeriodName, PeriodStatus]:
        """The user's own standing per period kind, shortest first, kinds without a limit
        left out."""
        found = (getattr(self, kind, None) for kind in get_args(PeriodName))
        return {status.period: status for status in found if status is not None}


class BudgetAlerted(Wire):
    """A threshold crossing, sent once per user, period and threshold (budget.alerts)."""

    schema_version: Literal[1] = 1
    alert_id: str  # user_id|period|period_start|kind|threshold: the dedupe key
    user_id: Text
    kind: AlertKind
    period: PeriodName
    period_start: datetime
    threshold: int = Field(ge=0, le=100)  # the at_percent crossed; 100: the limit; 0: a reset
    percent_used: Amount
    tokens_used: Amount
    tokens_limit: Amount
    budget: str = "user"
    message: str
    notify_admin: bool = False
    as_of: AwareDatetime


def bounded_text(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, saying so."""
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} chars)"


def rejection(original: bytes | None, reason: str, source: str, now: datetime) -> RejectedEvent:
    """The DLQ record: why, from where, and the bytes as they came (undecodable ones
    replaced): whole up to MAX_ORIGINAL_BYTES, else that much of a prefix, with the size and
    hash of the whole, so the record always fits the topic."""
    raw = original or b""
    text = raw[:MAX_ORIGINAL_BYTES].decode("utf-8", errors="replace")
    # Each undecodable byte became 3 bytes (U+FFFD): cut again, at a character boundary.
    text = text.encode()[:MAX_ORIGINAL_BYTES].decode("utf-8", errors="ignore")
    return RejectedEvent(
        reason=bounded_text(reason, MAX_REASON_CHARS), source=source, original=text,
        original_size=len(raw), original_sha256=hashlib.sha256(raw).hexdigest(),
        original_truncated=len(raw) > MAX_ORIGINAL_BYTES, rejected_at=now)


WIRE_MODELS: dict[str, type[Wire]] = {
    "usage_recorded": UsageRecorded,
    "rejected_event": RejectedEvent,
    "balance_updated": BalanceUpdated,
    "budget_decided": BudgetDecided,
    "budget_alerted": BudgetAlerted,
}
