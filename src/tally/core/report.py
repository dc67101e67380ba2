"""The admin view of every user's budget: the body of GET /api/admin/budgets.

Every user in users.yaml is listed, and so is any user seen only in events (with the
default limits). users.yaml is authoritative for role, department and project; the events'
own labels fill in what it leaves out.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from tally.config.models import Config
from tally.core.limits import group_usage
from tally.core.policy import decide
from tally.core.usage import UserUsage, with_labels
from tally.identity import api_key_digest, normalise_identity
from tally.wire import BudgetDecided, PeriodName

__all__ = ["FIGURES", "ROW_FIGURES", "budget_row", "budgets_report", "known_usages",
           "shown_decision", "with_identities"]


def known_usages(usages: Mapping[str, UserUsage], config: Config) -> dict[str, UserUsage]:
    """Usage of every configured or seen user, labelled from users.yaml where it says."""
    result = dict(usages)
    for user in config.users.user_identification.users:
        usage = result.get(user.id) or UserUsage(user.id)
        labels = {"role": user.role, "department": user.department, "project": user.project}
        result[user.id] = with_labels(usage, **labels)
    return result


def budgets_report(
    usages: Mapping[str, UserUsage], config: Config, now: datetime
) -> dict[str, list[dict[str, Any]]]:
    """{"users": [...]} sorted by user_id, each row with its full decision."""
    everyone = known_usages(usages, config)
    groups = group_usage(everyone.values())
    budgets = config.budgets.per_user_budgets
    rows = [budget_row(with_identities(decide(everyone[uid], budgets, now, groups), config))
            for uid in sorted(everyone)]
    return {"users": rows}


def with_identities(decision: BudgetDecided, config: Config) -> BudgetDecided:
    """The decision, naming the gateway identities its user claims in users.yaml, so a
    gateway that knows a person only as "openai-user:alice" finds user_alice's decision,
    and the digest of their API key, so a gateway's front door recognises that key."""
    user = config.user_by_id(decision.user_id)
    if user is None or not (user.identities or user.api_key):
        return decision
    claimed = tuple(normalise_identity(i) for i in user.identities)
    digests = (api_key_digest(user.api_key),) if user.api_key else ()
    return decision.model_copy(update={"identities": claimed, "key_digests": digests})


def shown_decision(decision: BudgetDecided) -> dict[str, Any]:
    """A decision as reports show it: without the key digests, which only gateways need."""
    return decision.model_dump(mode="json", exclude={"key_digests"})


# The figures a row shows per period kind, named <kind>_<figure>: used, limit and remaining,
# but the brief's row has no monthly_remaining.
FIGURES = ("used", "limit", "remaining")
ROW_FIGURES: Mapping[PeriodName, tuple[str, ...]] = {"monthly": ("used", "limit")}


def budget_row(decision: BudgetDecided) -> dict[str, Any]:
    """One user's line, in the brief's shape, with the decision appended: the figures of
    every period kind the user has a limit of."""
    figures = {f"{kind}_{name}": getattr(status, f"tokens_{name}")
               for kind, status in decision.periods.items()
               for name in ROW_FIGURES.get(kind, FIGURES)}
    return {"user_id": decision.user_id, **figures, "status": decision.status,
            "decision": shown_decision(decision)}
