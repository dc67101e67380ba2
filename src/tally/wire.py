"""The wire contract: every message that crosses Kafka, as frozen pydantic models.

Each carries a `schema_version`; `tally schemas write` renders them into schemas/*.json.
Events are named in the past tense (what happened), as in eventsourcing.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

__all__ = [
    "WIRE_MODELS",
    "ActionName",
    "AlertKind",
    "BalanceUpdated",
    "BudgetAlerted",
    "BudgetDecided",
    "PeriodName",
    "PeriodStatus",
    "RejectedEvent",
    "StatusName",
    "UsageRecorded",
]

PeriodName = Literal["daily", "monthly"]
StatusName = Literal["ok", "warning", "over_limit"]
ActionName = Literal["allow", "warn", "soft_limit", "hard_stop", "reduced_priority"]
AlertKind = Literal["warning", "limit", "reset"]


class Wire(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class UsageRecorded(Wire):
    """One model call's token usage, as a gateway reports it (usage.raw, usage.events)."""

    schema_version: Literal[1] = 1
    event_id: str = Field(min_length=1, max_length=200)
    occurred_at: AwareDatetime
    user_id: str = Field(min_length=1, max_length=200)
    model: str = Field(min_length=1, max_length=200)
    provider: str | None = None
    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cache_read_tokens: int = Field(default=0, ge=0)
    cache_write_tokens: int = Field(default=0, ge=0)
    session_key: str | None = None
    channel: str | None = None
    request_id: str | None = None
    source: str | None = None
    role: str | None = None
    department: str | None = None
    project: str | None = None


class RejectedEvent(Wire):
    """What usage.dlq holds: the original bytes, why they were refused, and from where."""

    schema_version: Literal[1] = 1
    reason: str
    source: str  # e.g. "kafka:usage.raw[0]@42" or "http:POST /v1/usage"
    original: str  # the original bytes, decoded as UTF-8 with replacement
    rejected_at: AwareDatetime


class BalanceUpdated(Wire):
    """A user's absolute usage per period (budget.balances, compacted by user_id).

    `daily` and `monthly` map each period's start (ISO 8601, UTC) to the tokens used in it;
    every period with usage is listed, so rollover can be derived without other state.
    """

    schema_version: Literal[1] = 1
    user_id: str
    role: str | None = None
    department: str | None = None
    project: str | None = None
    daily: dict[str, int]
    monthly: dict[str, int]
    last_event_at: AwareDatetime
    as_of: AwareDatetime


class PeriodStatus(Wire):
    """One period's standing against its limit."""

    period: PeriodName
    period_start: datetime
    tokens_used: int
    tokens_limit: int
    tokens_remaining: int
    percent_used: int
    status: StatusName
    reset_time: str  # ISO 8601 in the configured time zone


class BudgetDecided(Wire):
    """What the gateway should do for a user now (budget.decisions, compacted by user_id)."""

    schema_version: Literal[1] = 1
    user_id: str
    status: StatusName
    action: ActionName
    period: PeriodName
    budget: str = "user"  # which budget drove it: "user", "department:<name>", "project:<name>"
    percent_used: int
    tokens_used: int
    tokens_limit: int
    tokens_remaining: int
    reset_time: str
    message: str | None = None
    footer: str | None = None
    force_model: str | None = None
    status_code: int | None = None
    daily: PeriodStatus
    monthly: PeriodStatus
    as_of: AwareDatetime
    # The gateway identities the user claims in users.yaml (normalised), so a gateway that
    # knows a person only as "openai-user:alice" finds the decision of user_alice.
    identities: tuple[str, ...] = ()


class BudgetAlerted(Wire):
    """A threshold crossing, sent once per user, period and threshold (budget.alerts)."""

    schema_version: Literal[1] = 1
    alert_id: str  # user_id|period|period_start|kind|threshold: the dedupe key
    user_id: str
    kind: AlertKind
    period: PeriodName
    period_start: datetime
    threshold: int  # the at_percent crossed; 100 for the limit; 0 for a reset
    percent_used: int
    tokens_used: int
    tokens_limit: int
    budget: str = "user"
    message: str
    notify_admin: bool = False
    as_of: AwareDatetime


WIRE_MODELS: dict[str, type[Wire]] = {
    "usage_recorded": UsageRecorded,
    "rejected_event": RejectedEvent,
    "balance_updated": BalanceUpdated,
    "budget_decided": BudgetDecided,
    "budget_alerted": BudgetAlerted,
}
