"""Who a name in users.yaml or on a gateway is. Pure: no I/O.

A caller or a usage event names a user by a users.yaml id ("alice") or by a gateway
identity such as "telegram:123456" or "openai-user:alice" that a user claims in users.yaml
`identities`. The ingest (events) and the authenticator (JWT subjects) resolve both the
same way, so this lives outside either service.

Matching rules:
- an exact users.yaml id wins over an identity;
- identities are matched exactly, except that the name after "openai-user:" is compared
  in lower case (OpenAI-compatible clients send it in whatever case the user typed);
- an identity no user claims resolves to itself (normalised as above): its usage is still
  counted under that name, with the default limits, until someone claims it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from tally.config.models import Config, User

__all__ = ["OPENAI_USER", "Directory", "Principal", "api_key_digest", "normalise_identity"]

OPENAI_USER = "openai-user:"


# The label hashed before every key, so a digest published here matches no other system's
# plain SHA-256 of the same string. The plugin (integrations/openclaw/src/frontdoor.js)
# computes the same digest of the key a caller presents.
API_KEY_DIGEST_LABEL = b"tally.api_key.v1\x00"


def api_key_digest(api_key: str) -> str:
    """What a gateway may know of an API key: enough to recognise it, not to present it.

    Published in every decision (BudgetDecided.key_digests). A plain hash is enough only
    because keys are long random strings (README: how to make one); a short or guessable
    key would be found from its digest by trying candidates.
    """
    return "sha256:" + hashlib.sha256(API_KEY_DIGEST_LABEL + api_key.encode()).hexdigest()


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
    """users.yaml indexed for the lookups made on every event and every request."""

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
