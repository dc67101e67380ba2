"""Who may call which admin or personal endpoint, as auth.yaml and users.yaml say.

One rule for every port that gives more than a caller's own usage: the enforcer's admin
API and budgets API, and the projector's POST /audit.

- Credentials are checked by `tally.auth.Authenticator` (the ingest's rules): an API key
  from users.yaml, or a JWT whose signature, `exp` and `nbf` (and `aud`/`iss` when
  configured) hold. Missing, unknown, expired or badly signed: 401.
- Admin endpoints (and the audit) need the role `admin`: the JWT's role claim, else
  users.yaml's role. Anyone else: 403.
- A user reads only their own budget (GET /api/budgets/me has no user parameter at all).
- auth.yaml `require_auth: false` lets unauthenticated usage reports into the ingest, but
  a budget is personal: these endpoints still need credentials.
- auth.yaml `enabled: false` turns authentication off everywhere: the admin endpoints are
  open (bind the enforcer and projector to 127.0.0.1, their default) and /me has nobody
  to answer for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from starlette.requests import Request

from tally.auth import Authenticator, AuthError
from tally.config.loader import LiveConfig
from tally.config.models import Config
from tally.identity import Principal

__all__ = ["ADMIN_ROLE", "ANONYMOUS_ADMIN", "Access"]

ADMIN_ROLE = "admin"
# Who the caller is when auth.yaml turns authentication off.
ANONYMOUS_ADMIN = Principal("anonymous", ADMIN_ROLE)


@dataclass(frozen=True)
class Access:
    """Checks a request's credentials; raises AuthError (401 or 403) with the reason."""

    authenticators: Callable[[], Authenticator]  # the current one: users.yaml may change

    @classmethod
    def build(cls, config: Config, config_dir: Path | None = None) -> Access:
        """Under one config, for good."""
        authenticator = Authenticator.build(config, config_dir)
        return cls(lambda: authenticator)

    @classmethod
    def following(cls, live: LiveConfig, config_dir: Path | None = None) -> Access:
        """Under the config as it is reloaded."""
        return cls(live.derived(lambda config: Authenticator.build(config, config_dir)))

    @property
    def authenticator(self) -> Authenticator:
        return self.authenticators()

    def caller(self, request: Request) -> Principal:
        """The authenticated caller of a personal endpoint."""
        if not self.authenticator.settings.enabled:
            raise AuthError(401, "authentication is disabled in auth.yaml: "
                                 "there is no caller whose budget to show")
        principal = self.authenticator.authenticate(request.headers)
        if principal is None:  # require_auth: false, and nothing sent
            raise AuthError(401, "missing credentials: send X-API-Key or Authorization")
        return principal

    def admin(self, request: Request) -> Principal:
        """The caller of an admin endpoint, who must have the admin role."""
        if not self.authenticator.settings.enabled:
            return ANONYMOUS_ADMIN
        principal = self.caller(request)
        if principal.role != ADMIN_ROLE:
            role = "no role" if principal.role is None else f"role {principal.role!r}"
            raise AuthError(403, f"admin role required: {principal.user_id} has {role}")
        return principal
