"""Who a usage event belongs to, and who may report it. Pure: no I/O.

A raw event carries the caller's identity in `user_id`: a users.yaml id ("alice"), or a
gateway identity such as "telegram:123456" or "openai-user:alice" that a user claims in
users.yaml `identities`. The ingest replaces it with the users.yaml id (matching rules in
tally.identity). An identity no user claims is recorded under that identity itself, so
its usage is still counted with the default limits until someone claims it.

Labels (`role`, `department`, `project`) decide which shared budgets an event draws on, so
they are not the caller's to choose: a users.yaml user's labels are users.yaml's (an event's
own are replaced, an empty one cleared); an unclaimed identity keeps the event's labels
only when a gateway sent it (a `gateway: true` account, or usage.raw, which only gateways
may write), and has none otherwise.

Who may report: a user only their own usage; a `gateway: true` service account may report
for every user its events name (that is what a shared gateway does); unauthenticated
callers (when auth.yaml allows them) are taken at their word.
"""

from __future__ import annotations

from tally.config.models import User
from tally.core.usage import LABELS
from tally.identity import Directory, Principal
from tally.wire import MAX_TEXT, UsageRecorded

__all__ = ["enrich", "identify", "may_report"]


def enrich(event: UsageRecorded, directory: Directory, from_gateway: bool) -> UsageRecorded:
    """The event under its resolved user, with the labels the rule above gives it."""
    user_id = directory.resolve(event.user_id)
    user = directory.user(user_id)
    update: dict[str, str | None] = {}
    if user_id != event.user_id:
        update["user_id"] = user_id
    if user is not None:
        update.update(_labels_of(user))
    elif not from_gateway:
        update.update(dict.fromkeys(LABELS))
    update = {k: v for k, v in update.items() if getattr(event, k) != v}
    # model_copy skips validation: the values come from an already-validated Config.
    return event.model_copy(update=update) if update else event


def identify(event: UsageRecorded, directory: Directory, from_gateway: bool,
             ) -> UsageRecorded | str:
    """`enrich`, or why the resolved id breaks the wire's text rule (lower-casing an
    "openai-user:" name can lengthen it)."""
    enriched = enrich(event, directory, from_gateway)
    if len(enriched.user_id) > MAX_TEXT:
        return f"user_id: resolves to {len(enriched.user_id)} characters, over {MAX_TEXT}"
    return enriched


def _labels_of(user: User) -> dict[str, str | None]:
    return {"role": user.role, "department": user.department, "project": user.project}


def may_report(principal: Principal | None, user_id: str) -> bool:
    """Whether `principal` may report usage for the resolved `user_id`."""
    if principal is None:  # auth is off or optional: the event's identity is believed
        return True
    return principal.gateway or principal.user_id == user_id
