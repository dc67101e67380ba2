"""tally.auth: JWTs and API keys checked as auth.yaml says; every failure is a 401."""

from __future__ import annotations

import hmac
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tally.auth import Authenticator, AuthError, Principal
from tally.config.models import (
    Authentication,
    AuthFile,
    BudgetsFile,
    Config,
    Limits,
    PerUserBudgets,
    User,
    UserIdentification,
    UsersFile,
)

SECRET = "a-test-secret-that-is-long-enough-for-hs256"
USERS = (
    User(id="alice", api_key="ak_alice_0123456789", role="engineer",
         identities=("openai-user:alice",)),
    User(id="gw", api_key="ak_gateway_0123456789", gateway=True),
)


BUDGETS = BudgetsFile(per_user_budgets=PerUserBudgets(
    default_limits=Limits(daily_tokens=1000, monthly_tokens=10000)))


def config(settings: Authentication) -> Config:
    users = UsersFile(user_identification=UserIdentification(users=USERS))
    return Config(auth=AuthFile(authentication=settings), users=users, budgets=BUDGETS)


def authenticator(**settings: Any) -> Authenticator:
    merged: dict[str, Any] = {"method": "jwt", "secret": SECRET, **settings}
    if merged["method"] != "jwt":
        merged.pop("secret")
    return Authenticator.build(config(Authentication(**merged)))


def token(key: Any = SECRET, algorithm: str = "HS256", **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "alice", "exp": now + 60, **claims}, key, algorithm=algorithm)


def bearer(value: str) -> dict[str, str]:
    return {"authorization": f"Bearer {value}"}


def refusal(checker: Authenticator, headers: dict[str, str]) -> AuthError:
    with pytest.raises(AuthError) as caught:
        checker.authenticate(headers)
    assert caught.value.status == 401
    return caught.value


def test_a_valid_jwt_names_the_user_and_their_users_yaml_attributes() -> None:
    principal = authenticator().authenticate(bearer(token()))
    assert principal == Principal("alice", "engineer", False)


def test_the_role_claim_wins_and_the_subject_may_be_an_identity() -> None:
    principal = authenticator().authenticate(bearer(token(sub="openai-user:Alice", role="lead")))
    assert principal == Principal("alice", "lead", False)


def test_a_jwt_for_someone_not_in_users_yaml_is_still_them() -> None:
    assert authenticator().authenticate(bearer(token(sub="zoe"))) == Principal("zoe")


def test_an_expired_jwt_is_refused() -> None:
    error = refusal(authenticator(), bearer(token(exp=int(time.time()) - 1)))
    assert "expired" in error.reason


def test_a_jwt_not_yet_valid_is_refused() -> None:
    error = refusal(authenticator(), bearer(token(nbf=int(time.time()) + 30)))
    assert "not yet valid" in error.reason


def test_a_jwt_without_exp_is_refused() -> None:
    unbounded = jwt.encode({"sub": "alice"}, SECRET, algorithm="HS256")
    assert '"exp"' in refusal(authenticator(), bearer(unbounded)).reason


def test_a_bad_signature_is_refused() -> None:
    forged = token(key="another-secret-that-is-long-enough-for-hs256")
    assert "Signature verification failed" in refusal(authenticator(), bearer(forged)).reason


def test_an_algorithm_not_configured_is_refused() -> None:
    long_secret = SECRET * 2  # HS512 wants 64 bytes
    other = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, long_secret, "HS512")
    refusal(authenticator(secret=long_secret), bearer(other))


def test_alg_none_is_refused_even_if_configured() -> None:
    unsigned = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, "", "none")
    refusal(authenticator(algorithms=("none", "HS256")), bearer(unsigned))


def test_audience_and_issuer_are_checked_when_configured() -> None:
    checker = authenticator(audience="tally", issuer="https://id.example")
    good = token(aud="tally", iss="https://id.example")
    assert checker.authenticate(bearer(good)) == Principal("alice", "engineer")
    wrong_aud = refusal(checker, bearer(token(aud="x", iss="https://id.example")))
    assert "audience" in wrong_aud.reason.lower()
    assert "issuer" in refusal(checker, bearer(token(aud="tally", iss="evil"))).reason
    assert '"aud"' in refusal(checker, bearer(token(iss="https://id.example"))).reason


def test_an_audience_in_the_token_is_fine_when_none_is_configured() -> None:
    assert authenticator().authenticate(bearer(token(aud="anything"))) is not None


def test_a_jwt_without_the_user_id_claim_is_refused() -> None:
    error = refusal(authenticator(user_id_claim="email"), bearer(token()))
    assert error.reason == "token has no 'email' claim"


def test_rs256_with_a_public_key_file(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "jwt.pub").write_bytes(pem)
    settings = Authentication(method="jwt", algorithms=("RS256",), public_key_file="jwt.pub")
    checker = Authenticator.build(config(settings), base_dir=tmp_path)
    signed = token(key=private, algorithm="RS256")
    assert checker.authenticate(bearer(signed)) == Principal("alice", "engineer")
    refusal(checker, bearer(token()))  # HS256 signed with the secret: wrong algorithm


def test_missing_credentials() -> None:
    error = refusal(authenticator(), {})
    assert error.reason.startswith("missing credentials")


def test_a_non_bearer_authorization_is_refused() -> None:
    refusal(authenticator(), {"authorization": "Basic YWxpY2U6eA=="})


@pytest.mark.parametrize(
    "headers",
    [{"x-api-key": "ak_gateway_0123456789"}, bearer("ak_gateway_0123456789")],
)
def test_api_keys_in_either_header(headers: dict[str, str]) -> None:
    for method in ("api_key", "jwt"):
        principal = authenticator(method=method).authenticate(headers)
        assert principal == Principal("gw", None, True)


def test_an_unknown_api_key_is_refused() -> None:
    checker = authenticator(method="api_key")
    assert refusal(checker, {"x-api-key": "ak_alice_012345678"}).reason == "unknown API key"
    refusal(checker, bearer("ak_nobody"))


def test_in_api_key_mode_a_jwt_shaped_bearer_is_an_api_key() -> None:
    assert refusal(authenticator(method="api_key"), bearer(token())).reason == "unknown API key"


def test_api_keys_are_compared_in_constant_time_against_every_user(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    compared: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(hmac, "compare_digest", spy)
    checker = authenticator(method="api_key")
    assert checker.authenticate({"x-api-key": "ak_alice_0123456789"}) == Principal(
        "alice", "engineer")
    # no early exit at the match: every configured key was compared
    offered = b"ak_alice_0123456789"
    assert all(offered in pair for pair in compared)
    assert {b"ak_alice_0123456789", b"ak_gateway_0123456789"} == {
        a if b == offered else b for a, b in compared}
    assert len(compared) == len(USERS)


def test_optional_auth_lets_anonymous_callers_through_but_checks_credentials() -> None:
    checker = authenticator(require_auth=False)
    assert checker.authenticate({}) is None
    refusal(checker, {"x-api-key": "ak_wrong"})


def test_disabled_auth_ignores_credentials() -> None:
    checker = authenticator(enabled=False)
    assert checker.authenticate({"x-api-key": "ak_wrong"}) is None
    assert not checker.required


def test_oauth_without_a_key_configured_is_refused() -> None:
    checker = Authenticator.build(config(Authentication(method="oauth")))
    assert "not configured" in refusal(checker, bearer(token())).reason
