"""Frozen models of the three config files, with exactly the brief's keys.

auth.yaml -> AuthFile, users.yaml -> UsersFile, budgets.yaml -> BudgetsFile; together a Config.
Keys marked "added" in the foundation issue are ours, named in the brief's style.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Action",
    "AuthFile",
    "Authentication",
    "BudgetsFile",
    "Config",
    "HardStop",
    "Limits",
    "OnApproachingLimit",
    "OnLimitExceeded",
    "PerUserBudgets",
    "ReducedPriority",
    "ResetSchedule",
    "Rollover",
    "SoftLimit",
    "TokenField",
    "User",
    "UserIdentification",
    "UsersFile",
    "Warning",
]


class Strict(BaseModel):
    """Every config model: immutable, and an unknown key is an error."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=False)


# auth.yaml ---------------------------------------------------------------------------------


class Authentication(Strict):
    enabled: bool = True
    method: Literal["jwt", "api_key", "oauth"] = "api_key"
    require_auth: bool = True
    user_id_claim: str = "sub"
    # added: what verifying a JWT needs
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str | None = None
    public_key_file: str | None = None
    audience: str | None = None
    issuer: str | None = None
    role_claim: str = "role"


class AuthFile(Strict):
    authentication: Authentication = Authentication()


# users.yaml --------------------------------------------------------------------------------


class User(Strict):
    id: str = Field(min_length=1)
    api_key: str | None = None
    role: str | None = None  # added
    department: str | None = None  # added
    project: str | None = None  # added
    identities: tuple[str, ...] = ()  # added: how a gateway knows them ("telegram:123456")
    gateway: bool = False  # added: a service account that may report usage for others


class UserIdentification(Strict):
    method: Literal["api_key", "jwt", "oauth"] = "api_key"
    users: tuple[User, ...] = ()


class UsersFile(Strict):
    user_identification: UserIdentification = UserIdentification()


# budgets.yaml ------------------------------------------------------------------------------

TokenField = Literal["input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"]
Action = Literal["soft_limit", "hard_stop", "reduced_priority"]


class Limits(Strict):
    daily_tokens: int = Field(ge=0)
    monthly_tokens: int = Field(ge=0)


class PartialLimits(Strict):
    """A user override may set only one of the two limits."""

    daily_tokens: int | None = Field(default=None, ge=0)
    monthly_tokens: int | None = Field(default=None, ge=0)


class ResetSchedule(Strict):
    daily_reset_time: str = "00:00"  # HH:MM, local wall-clock time in `timezone`
    monthly_reset_day: int = Field(default=1, ge=1, le=31)
    timezone: str = "UTC"


class Rollover(Strict):
    enabled: bool = False
    max_rollover_tokens: int = Field(default=0, ge=0)


class Warning(Strict):
    at_percent: int = Field(ge=1, le=100)
    message: str


class OnApproachingLimit(Strict):
    action: Literal["warn"] = "warn"
    message_template: str = (
        "You've used {percent_used}% of your {period} token budget. "
        "Remaining: {tokens_remaining} tokens. Resets: {reset_time}"
    )


class SoftLimit(Strict):
    message: str = "You've exceeded your {period} token budget. Continued usage will be flagged for review."
    notify_admin: bool = False


class HardStop(Strict):
    message: str = "You've reached your {period} token limit. Your budget resets at {reset_time}."
    status_code: int = Field(default=429, ge=400, le=599)
    notify_admin: bool = False  # added


class ReducedPriority(Strict):
    force_model: str = "anthropic/claude-3-haiku"
    message: str = "Over budget. Routing to a cheaper model."
    notify_admin: bool = False  # added


class OnLimitExceeded(Strict):
    action: Action = "soft_limit"
    soft_limit: SoftLimit = SoftLimit()
    hard_stop: HardStop = HardStop()
    reduced_priority: ReducedPriority = ReducedPriority()


class PerUserBudgets(Strict):
    enabled: bool = True
    default_limits: Limits
    user_overrides: dict[str, PartialLimits] = Field(default_factory=dict)
    role_limits: dict[str, int] = Field(default_factory=dict)  # daily tokens per role
    reset_schedule: ResetSchedule = ResetSchedule()
    rollover: Rollover = Rollover()
    warnings: tuple[Warning, ...] = ()
    on_approaching_limit: OnApproachingLimit = OnApproachingLimit()
    include_budget_in_response: bool = False
    budget_footer: str = (
        "Your usage: {tokens_used}/{tokens_limit} tokens ({percent_used}%). Resets: {reset_time}"
    )
    on_limit_exceeded: OnLimitExceeded = OnLimitExceeded()
    department_budgets: dict[str, Limits] = Field(default_factory=dict)  # added
    project_budgets: dict[str, Limits] = Field(default_factory=dict)  # added
    counted_tokens: tuple[TokenField, ...] = (  # added: which token kinds count
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
    )


class BudgetsFile(Strict):
    per_user_budgets: PerUserBudgets


class Config(Strict):
    """The three files together, validated across files (references, unique keys)."""

    auth: AuthFile = AuthFile()
    users: UsersFile = UsersFile()
    budgets: BudgetsFile
