"""Frozen models of the three config files, with exactly the brief's keys.

auth.yaml -> AuthFile, users.yaml -> UsersFile, budgets.yaml -> BudgetsFile; together a Config.
Keys marked "added" in the foundation issue are ours, named in the brief's style.

Each model checks what it can see on its own (types, ranges, time zone, HH:MM, template
placeholders); `user_problems` and `reference_problems` check what spans users and files
(unique API keys, overrides and roles that name something real). `Config` runs both, so a
Config built in code is as consistent as one read by `tally.config.loader.load_config`.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Annotated, Literal, get_args
from zoneinfo import ZoneInfo

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from tally.config.errors import ConfigProblem
from tally.wire import MAX_TEXT, PRINTABLE, PeriodName

__all__ = [
    "AUTH_FILE",
    "BUDGETS_FILE",
    "PLACEHOLDERS",
    "UNION_TAGS",
    "USERS_FILE",
    "Action",
    "AlertWebhook",
    "AuthFile",
    "Authentication",
    "BudgetsFile",
    "Config",
    "EventTimeWindow",
    "HardStop",
    "Limits",
    "OnApproachingLimit",
    "OnLimitExceeded",
    "PartialLimits",
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
    "Weekday",
    "reference_problems",
    "user_problems",
]

AUTH_FILE = "auth.yaml"
USERS_FILE = "users.yaml"
BUDGETS_FILE = "budgets.yaml"

# The only names a message template may use (tally.core.templates fills them).
PLACEHOLDERS = frozenset(
    {"percent_used", "period", "tokens_used", "tokens_limit", "tokens_remaining", "reset_time"}
)
_BRACED = frozenset(f"{{{name}}}" for name in PLACEHOLDERS)


class Strict(BaseModel):
    """Every config model: immutable, an unknown key is an error, and no type coercion.

    strict=True so that `daily_tokens: "5000"` or `enabled: "no"` is a wrong type rather
    than silently converted; tuple fields opt back out (strict=False) because YAML gives lists.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


# field checks ------------------------------------------------------------------------------


# Same grammar as the renderer (tally.core.templates): a {name} is a placeholder, any other
# brace text is printed as written. So `{percent_used:.1f}` would reach users unfilled.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_WITH_SPEC = re.compile(r"\{[A-Za-z_][A-Za-z0-9_]*[:!][^{}]*\}")


def _template(template: str) -> str:
    """Allow exactly the PLACEHOLDERS, written plainly as {name}."""
    unknown = sorted({f"{{{n}}}" for n in _PLACEHOLDER.findall(template)} - _BRACED)
    if unknown:
        allowed = ", ".join(sorted(_BRACED))
        raise ValueError(f"unknown placeholder {', '.join(unknown)} (allowed: {allowed})")
    with_spec = _WITH_SPEC.search(template)
    if with_spec:
        raise ValueError(f"{with_spec.group(0)}: placeholders take no format spec, write {{name}}")
    return template


def _not_a_number(value: object) -> object:
    # YAML 1.1 reads an unquoted 12:30 as the sexagesimal number 750: explain, don't say "int".
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError('must be a quoted "HH:MM" string (YAML reads unquoted 12:30 as a number)')
    return value


_HH_MM = re.compile(r"([01]\d|2[0-3]):[0-5]\d")


def _hh_mm(value: str) -> str:
    if not _HH_MM.fullmatch(value):
        raise ValueError(f"must be a time of day HH:MM from 00:00 to 23:59, got {value!r}")
    return value


def _time_zone(name: str) -> str:
    try:
        ZoneInfo(name)
    except (KeyError, ValueError, OSError):  # not found, malformed, or a directory like "Europe"
        raise ValueError(f"unknown time zone {name!r}") from None
    return name


def _day_of_month(day: int) -> int:
    if not 1 <= day <= 31:
        raise ValueError(f"must be a day of the month 1..31, got {day}")
    return day


_PROVIDER_MODEL = re.compile(r"[^/\s]+/\S+")


def _provider_model(value: str) -> str:
    if not _PROVIDER_MODEL.fullmatch(value):
        raise ValueError(f"must be 'provider/model' (e.g. anthropic/claude-3-haiku), got {value!r}")
    return value


Template = Annotated[str, AfterValidator(_template)]
TimeOfDay = Annotated[str, BeforeValidator(_not_a_number), AfterValidator(_hh_mm)]
TimeZoneName = Annotated[str, AfterValidator(_time_zone)]
DayOfMonth = Annotated[int, AfterValidator(_day_of_month)]
ModelRef = Annotated[str, AfterValidator(_provider_model)]


def _http_url(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+\S*", value):
        raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]
MAX_LIMIT_TOKENS = 10**15  # far above any budget; keeps every sum of limits in 64 bits
Tokens = Annotated[int, Field(ge=0, le=MAX_LIMIT_TOKENS)]


# auth.yaml ---------------------------------------------------------------------------------


MIN_HMAC_SECRET_BYTES = 32


class Authentication(Strict):
    enabled: bool = True
    method: Literal["jwt", "api_key", "oauth"] = "api_key"
    require_auth: bool = True
    user_id_claim: str = "sub"
    # added: what verifying a JWT needs
    algorithms: tuple[str, ...] = Field(default=("HS256",), strict=False)
    secret: str | None = None
    public_key_file: str | None = None  # relative to the config dir; the loader makes it absolute
    audience: str | None = None
    issuer: str | None = None
    role_claim: str = "role"

    @model_validator(mode="after")
    def _jwt_has_one_key(self) -> Authentication:
        # Both set would leave it ambiguous which one verifies a token.
        if (
            self.enabled
            and self.method == "jwt"
            and (self.secret is None) == (self.public_key_file is None)
        ):
            raise ValueError("method jwt needs exactly one of secret or public_key_file")
        if self.secret is not None and len(self.secret.encode()) < MIN_HMAC_SECRET_BYTES:
            # RFC 7518 3.2: an HMAC key at least as long as the hash; shorter ones are guessable.
            raise ValueError(f"secret: an HMAC (HS256) secret needs at least "
                             f"{MIN_HMAC_SECRET_BYTES} bytes, got {len(self.secret.encode())}")
        return self


class AuthFile(Strict):
    authentication: Authentication = Authentication()


# users.yaml --------------------------------------------------------------------------------


class User(Strict):
    id: str = Field(min_length=1, max_length=MAX_TEXT, pattern=PRINTABLE)
    api_key: str | None = Field(default=None, min_length=1)
    role: str | None = None  # added
    department: str | None = None  # added
    project: str | None = None  # added
    # added: how a gateway knows them ("telegram:123456")
    identities: tuple[str, ...] = Field(default=(), strict=False)
    gateway: bool = False  # added: a service account that may report usage for others


class UserIdentification(Strict):
    method: Literal["api_key", "jwt", "oauth"] = "api_key"
    users: tuple[User, ...] = Field(default=(), strict=False)


class UsersFile(Strict):
    user_identification: UserIdentification = UserIdentification()


# budgets.yaml ------------------------------------------------------------------------------

TokenField = Literal["input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"]
Action = Literal["soft_limit", "hard_stop", "reduced_priority"]


class PartialLimits(Strict):
    """Tokens per period kind, `<kind>_tokens`; any may be left out (None). An override or
    a role sets only some; where nothing sets a weekly limit, there is none."""

    daily_tokens: Tokens | None = None
    weekly_tokens: Tokens | None = None  # added
    monthly_tokens: Tokens | None = None

    def tokens(self, kind: PeriodName) -> int | None:
        """The limit of one period kind, or None."""
        found: int | None = getattr(self, f"{kind}_tokens")
        return found


class Limits(PartialLimits):
    """A complete set: daily and monthly always, weekly where configured."""

    daily_tokens: Tokens
    monthly_tokens: Tokens

    def by_period(self) -> dict[PeriodName, int]:
        """{kind: tokens} for every kind with a limit, in PERIODS order."""
        return {kind: tokens for kind in get_args(PeriodName)
                if (tokens := self.tokens(kind)) is not None}


def _role_form(value: object) -> str:
    return "<mapping>" if isinstance(value, dict | PartialLimits) else "<number>"


# The brief's role limit is a number of daily tokens; (added) a mapping of <kind>_tokens,
# as in an override, sets other periods too. The tags name the two forms; error paths
# leave them out (UNION_TAGS).
RoleLimit = Annotated[
    Annotated[Tokens, Tag("<number>")] | Annotated[PartialLimits, Tag("<mapping>")],
    Discriminator(_role_form),
]
UNION_TAGS = frozenset({"<number>", "<mapping>"})


Weekday = Literal["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"]


class ResetSchedule(Strict):
    daily_reset_time: TimeOfDay = "00:00"  # HH:MM, local wall-clock time in `timezone`
    weekly_reset_day: Weekday = "monday"  # added: weeks start at the daily reset time
    monthly_reset_day: DayOfMonth = 1  # short months reset on their last day
    timezone: TimeZoneName = "UTC"

    @property
    def reset_hour_minute(self) -> tuple[int, int]:
        """daily_reset_time as (hour, minute)."""
        hour, minute = self.daily_reset_time.split(":")
        return int(hour), int(minute)

    @property
    def zone(self) -> ZoneInfo:
        """The IANA time zone; ZoneInfo caches instances, so this is cheap to call."""
        return ZoneInfo(self.timezone)


class Rollover(Strict):
    enabled: bool = False
    max_rollover_tokens: Tokens = 0


class Warning(Strict):
    at_percent: int = Field(ge=1, le=100)
    message: Template


class OnApproachingLimit(Strict):
    action: Literal["warn"] = "warn"
    message_template: Template = (
        "You've used {percent_used}% of your {period} token budget. "
        "Remaining: {tokens_remaining} tokens. Resets: {reset_time}"
    )


class SoftLimit(Strict):
    message: Template = (
        "You've exceeded your {period} token budget. Continued usage will be flagged for review."
    )
    notify_admin: bool = False


class HardStop(Strict):
    message: Template = (
        "You've reached your {period} token limit. Your budget resets at {reset_time}."
    )
    status_code: int = Field(default=429, ge=400, le=599)
    notify_admin: bool = False  # added


class ReducedPriority(Strict):
    force_model: ModelRef = "anthropic/claude-3-haiku"
    message: Template = "Over budget. Routing to a cheaper model."
    notify_admin: bool = False  # added


class OnLimitExceeded(Strict):
    action: Action = "soft_limit"
    soft_limit: SoftLimit = SoftLimit()
    hard_stop: HardStop = HardStop()
    reduced_priority: ReducedPriority = ReducedPriority()


class AlertWebhook(Strict):
    """added: where alerts with notify_admin go (a Slack-compatible incoming webhook)."""

    url: HttpUrl
    timeout_seconds: float = Field(default=5.0, gt=0, le=60)
    max_attempts: int = Field(default=5, ge=1, le=20)
    backoff_seconds: float = Field(default=1.0, ge=0, le=60)  # first retry; doubles, max 60 s


class EventTimeWindow(Strict):
    """added: how far an event's occurred_at may lie from the ingest's clock. Further ahead
    would count against a period nobody is in yet; further back would rewrite history."""

    future_tolerance_minutes: int = Field(default=60, ge=0, le=24 * 60)
    max_age_days: int = Field(default=730, ge=1, le=3650)

    @property
    def future_tolerance(self) -> timedelta:
        return timedelta(minutes=self.future_tolerance_minutes)

    @property
    def max_age(self) -> timedelta:
        return timedelta(days=self.max_age_days)


class PerUserBudgets(Strict):
    enabled: bool = True
    default_limits: Limits
    user_overrides: dict[str, PartialLimits] = Field(default_factory=dict)
    role_limits: dict[str, RoleLimit] = Field(default_factory=dict)
    reset_schedule: ResetSchedule = ResetSchedule()
    rollover: Rollover = Rollover()
    warnings: tuple[Warning, ...] = Field(default=(), strict=False)
    on_approaching_limit: OnApproachingLimit = OnApproachingLimit()
    include_budget_in_response: bool = False
    budget_footer: Template = (
        "Your usage: {tokens_used}/{tokens_limit} tokens ({percent_used}%). Resets: {reset_time}"
    )
    on_limit_exceeded: OnLimitExceeded = OnLimitExceeded()
    # added: shared by everyone in the department / project
    department_budgets: dict[str, Limits] = Field(default_factory=dict)
    project_budgets: dict[str, Limits] = Field(default_factory=dict)
    counted_tokens: tuple[TokenField, ...] = Field(  # added: which token kinds count
        default=("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens"),
        strict=False,
    )
    alert_webhook: AlertWebhook | None = None  # added: deliver notify_admin alerts here
    event_time_window: EventTimeWindow = EventTimeWindow()  # added: what the ingest accepts


class BudgetsFile(Strict):
    per_user_budgets: PerUserBudgets


# checks across users and files -------------------------------------------------------------

_USERS_PATH = "user_identification.users"


def _first_seen_clashes(
    users: tuple[User, ...], values: Callable[[User], list[tuple[str, str]]]
) -> Iterator[tuple[int, str, int]]:
    """(index, key suffix, index of the earlier user) for each value already taken."""
    owner: dict[str, int] = {}
    for index, user in enumerate(users):
        for suffix, value in values(user):
            if value in owner:
                yield index, suffix, owner[value]
            owner.setdefault(value, index)


def _clash_problems(
    users: tuple[User, ...], what: str, values: Callable[[User], list[tuple[str, str]]]
) -> list[ConfigProblem]:
    # The reason names the earlier user, never the value: an API key must not reach a log.
    return [
        ConfigProblem(
            USERS_FILE,
            f"{_USERS_PATH}[{index}]{suffix}",
            f"same {what} as {_USERS_PATH}[{earlier}] ({users[earlier].id})",
        )
        for index, suffix, earlier in _first_seen_clashes(users, values)
    ]


def _ids(user: User) -> list[tuple[str, str]]:
    return [(".id", user.id)]


def _api_keys(user: User) -> list[tuple[str, str]]:
    return [(".api_key", user.api_key)] if user.api_key is not None else []


def _identities(user: User) -> list[tuple[str, str]]:
    return [(f".identities[{i}]", identity) for i, identity in enumerate(user.identities)]


def user_problems(users_file: UsersFile) -> list[ConfigProblem]:
    """Ids, API keys and identities each name exactly one user."""
    users = users_file.user_identification.users
    return (
        _clash_problems(users, "id", _ids)
        + _clash_problems(users, "api_key", _api_keys)
        + _clash_problems(users, "identity", _identities)
    )


def reference_problems(users_file: UsersFile, budgets_file: BudgetsFile) -> list[ConfigProblem]:
    """Every override names a user in users.yaml; every role has a limit, if roles are used."""
    users = users_file.user_identification.users
    budgets = budgets_file.per_user_budgets
    known = {user.id for user in users}
    problems = [
        ConfigProblem(
            BUDGETS_FILE,
            f"per_user_budgets.user_overrides.{user_id}",
            f"no user {user_id!r} in {USERS_FILE}",
        )
        for user_id in budgets.user_overrides
        if user_id not in known
    ]
    if budgets.role_limits:  # without role limits, a role is only a label
        roles = ", ".join(sorted(budgets.role_limits))
        problems += [
            ConfigProblem(
                USERS_FILE,
                f"{_USERS_PATH}[{index}].role",
                f"role {user.role!r} has no entry in {BUDGETS_FILE} "
                f"per_user_budgets.role_limits ({roles})",
            )
            for index, user in enumerate(users)
            if user.role is not None and user.role not in budgets.role_limits
        ]
    return problems


class Config(Strict):
    """The three files together, validated across files (references, unique keys)."""

    auth: AuthFile = AuthFile()
    users: UsersFile = UsersFile()
    budgets: BudgetsFile

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        problems = user_problems(self.users) + reference_problems(self.users, self.budgets)
        if problems:
            raise ValueError("; ".join(str(problem) for problem in problems))
        return self

    # Lookups scan the users: teams are small, and an index cached on a frozen model would go
    # stale under model_copy(update=...).

    def user_by_id(self, user_id: str) -> User | None:
        return next((u for u in self._all_users() if u.id == user_id), None)

    def user_by_api_key(self, api_key: str) -> User | None:
        """Compares every key in constant time, so timing does not leak a key's prefix."""
        wanted = api_key.encode()
        found = None
        for user in self._all_users():
            if user.api_key is not None and hmac.compare_digest(user.api_key.encode(), wanted):
                found = user
        return found

    def user_by_identity(self, identity: str) -> User | None:
        return next((u for u in self._all_users() if identity in u.identities), None)

    def _all_users(self) -> tuple[User, ...]:
        return self.users.user_identification.users
