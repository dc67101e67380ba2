"""Who a usage event belongs to, and who may report it. Pure: no I/O.

A raw event carries the caller's identity in `user_id`: a users.yaml id ("alice"), or a
gateway identity such as "telegram:123456" or "openai-user:alice" that a user claims in
users.yaml `identities`. The ingest replaces it with the users.yaml id and fills `role`,
`department` and `project` from users.yaml where the event lacks them.

Matching rules:
- an exact users.yaml id wins over an identity;
- identities are matched exactly, except that the name after "openai-user:" is compared
  in lower case (OpenAI-compatible clients send it in whatever case the user typed);
- an identity no user claims is recorded under that identity itself (normalised as
  above), so its usage is still counted: it gets the default limits of budgets.yaml
  until someone claims it in users.yaml.

Who may report: a user only their own usage; a `gateway: true` service account may report
for every user its events name (that is what a shared gateway does); unauthenticated
callers (when auth.yaml allows them) are taken at their word.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tally.config.models import Config, User
from tally.wire import UsageRecorded

__all__ = ["Directory", "Principal", "enrich", "may_report", "normalise_identity"]

OPENAI_USER = "openai-user:"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated HTTP caller."""

    user_id: str
    role: str | None = None
    gateway: bool = False


def normalise_identity(identity: str) -> str:
    """The form identities are compared in: "openai-user:Alice" -> "openai-user:alice"."""
    if identity[: len(OPENAI_USER)].lower() == OPENAI_USER:
        return OPENAI_USER + identity[len(OPENAI_USER) :].lower()
    return identity


@dataclass(frozen=True)
class Directory:
    """users.yaml indexed for the lookups the ingest makes on every event."""

    by_id: dict[str, User] = field(default_factory=dict)
    by_identity: dict[str, User] = field(default_factory=dict)

    @classmethod
    def from_users(cls, users: tuple[User, ...]) -> Directory:
        by_identity = {normalise_identity(i): u for u in users for i in u.identities}
        return cls({u.id: u for u in users}, by_identity)

    @classmethod
    def from_config(cls, config: Config) -> Directory:
        return cls.from_users(config.users.user_identification.users)

    def user(self, user_id: str) -> User | None:
        return self.by_id.get(user_id)

    def resolve(self, identity: str) -> str:
        """The users.yaml id behind `identity`, or the (normalised) identity itself."""
        if identity in self.by_id:
            return identity
        normalised = normalise_identity(identity)
        user = self.by_identity.get(normalised)
        return user.id if user is not None else normalised


def enrich(event: UsageRecorded, directory: Directory) -> UsageRecorded:
    """The event under its resolved user, with users.yaml's role/department/project."""
    user_id = directory.resolve(event.user_id)
    user = directory.user(user_id)
    update: dict[str, str] = {}
    if user_id != event.user_id:
        update["user_id"] = user_id
    if user is not None:
        update.update(_missing_attributes(event, user))
    # model_copy skips validation: the values come from an already-validated Config.
    return event.model_copy(update=update) if update else event


def _missing_attributes(event: UsageRecorded, user: User) -> dict[str, str]:
    found = {"role": user.role, "department": user.department, "project": user.project}
    return {k: v for k, v in found.items() if v is not None and getattr(event, k) is None}


def may_report(principal: Principal | None, user_id: str) -> bool:
    """Whether `principal` may report usage for the resolved `user_id`."""
    if principal is None:  # auth is off or optional: the event's identity is believed
        return True
    return principal.gateway or principal.user_id == user_id
