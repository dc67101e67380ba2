"""Authenticate an HTTP caller as auth.yaml says. No network; reads a key file at most once.

Credentials, in the order they are looked for:
- `X-API-Key: <key>`: an API key from users.yaml;
- `Authorization: Bearer <token>`: a JWT when `method` is jwt or oauth and the token has
  the three dot-separated parts of one; otherwise an API key (e.g. `Bearer ak_...`).
API keys are accepted whatever `method` says: users.yaml is the admin's own list, and a
gateway service account usually holds a key rather than a token.

A JWT must carry `exp`; its signature, `exp`, `nbf` and, when configured, `aud` and `iss`
are verified with no leeway, using only the configured algorithms ("none" never).

Shared by every HTTP surface (the ingest's POST /v1/usage, the enforcer's budgets API).

Errors:
    AuthError            the request cannot go ahead; `status` says why:
        401                  no, malformed or rejected credentials (raised here);
        403                  authenticated, but not allowed this request (raised by the HTTP
                             layer that knows what is asked: someone else's usage, an
                             admin endpoint without the admin role).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import jwt

from tally.config.models import Authentication, Config
from tally.errors import RequestRefused
from tally.identity import Directory, Principal

__all__ = ["AuthError", "Authenticator", "Principal"]

JWT_METHODS = frozenset({"jwt", "oauth"})


class AuthError(RequestRefused):
    """The request cannot go ahead as this caller; `status` is the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Authenticator:
    """Turns request headers into a Principal, None (auth optional) or an AuthError."""

    config: Config
    directory: Directory
    jwt_key: str | bytes | None = None

    @classmethod
    def build(cls, config: Config, base_dir: Path | None = None) -> Authenticator:
        """`base_dir` resolves a relative `public_key_file` the loader left relative."""
        key = _jwt_key(config.auth.authentication, base_dir)
        return cls(config, Directory.from_config(config), key)

    @property
    def settings(self) -> Authentication:
        return self.config.auth.authentication

    @property
    def required(self) -> bool:
        return self.settings.enabled and self.settings.require_auth

    def authenticate(self, headers: Mapping[str, str]) -> Principal | None:
        """`headers` with lower-case names (Starlette's Headers are case-insensitive)."""
        if not self.settings.enabled:
            return None
        credential = _credential(headers)
        if credential is None:
            if self.required:
                raise AuthError(401, "missing credentials: send X-API-Key or Authorization")
            return None
        kind, value = credential
        if kind == "bearer" and self._looks_like_jwt(value):
            return self._from_jwt(value)
        return self._from_api_key(value)

    def _looks_like_jwt(self, token: str) -> bool:
        return self.settings.method in JWT_METHODS and token.count(".") == 2

    def _from_api_key(self, key: str) -> Principal:
        # Config compares every key in constant time: timing leaks nothing of a key.
        user = self.config.user_by_api_key(key)
        if user is None:
            raise AuthError(401, "unknown API key")
        return Principal(user.id, user.role, user.gateway)

    def _from_jwt(self, token: str) -> Principal:
        claims = verify_jwt(token, self.settings, self.jwt_key)
        subject = claims.get(self.settings.user_id_claim)
        if not isinstance(subject, str) or not subject:
            raise AuthError(401, f"token has no {self.settings.user_id_claim!r} claim")
        user = self.directory.user(self.directory.resolve(subject))
        role = claims.get(self.settings.role_claim)
        if user is None:
            return Principal(self.directory.resolve(subject), _str_or_none(role), False)
        return Principal(user.id, _str_or_none(role) or user.role, user.gateway)


def _credential(headers: Mapping[str, str]) -> tuple[str, str] | None:
    api_key = headers.get("x-api-key", "").strip()
    if api_key:
        return "api_key", api_key
    authorization = headers.get("authorization", "").strip()
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise AuthError(401, "Authorization must be 'Bearer <token or API key>'")
    return "bearer", value.strip()


def verify_jwt(token: str, settings: Authentication, key: str | bytes | None) -> dict[str, object]:
    if key is None:
        raise AuthError(401, "JWT authentication is not configured (no secret or public key)")
    try:
        claims: dict[str, object] = jwt.decode(
            token,
            key,
            algorithms=[a for a in settings.algorithms if a.lower() != "none"],
            audience=settings.audience,
            issuer=settings.issuer,
            leeway=0,
            options={"require": ["exp"], "verify_aud": settings.audience is not None},
        )
    except jwt.PyJWTError as error:  # bad signature, expired, not yet valid, wrong aud/iss...
        raise AuthError(401, f"invalid token: {error}") from error
    return claims


def _jwt_key(settings: Authentication, base_dir: Path | None) -> str | bytes | None:
    if settings.public_key_file:
        path = Path(settings.public_key_file)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return path.read_bytes()
    return settings.secret


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
