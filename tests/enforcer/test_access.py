"""Who may call what: every endpoint against every kind of caller, each refusal with a
JSON body that says why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tally.services.enforcer.responses import ErrorBody

from .kit import KEYS, asgi_client, bearer, config, filled_board, token

ADMIN_PATHS = ["/api/admin/budgets", "/api/admin/alerts", "/api/admin/stream"]
ALL_PATHS = [*ADMIN_PATHS, "/api/budgets/me"]

REFUSED_EVERYWHERE = {  # caller -> (status, words the error must contain)
    "no credentials": ({}, "missing credentials"),
    "unknown API key": ({"x-api-key": "ak_nobody_0000000000"}, "unknown API key"),
    "unknown bearer key": (bearer("ak_nobody_0000000000"), "unknown API key"),
    "expired JWT": (bearer(token(expires_in=-5)), "Signature has expired"),
    "badly signed JWT": (bearer(token(key="another-secret-that-is-long-enough-too")),
                         "Signature verification failed"),
    "Basic auth": ({"authorization": "Basic Y2Fyb2w6eA=="}, "Bearer"),
}
NOT_ADMINS = {
    "developer key": {"x-api-key": KEYS["alice"]},
    "viewer key as bearer": bearer(KEYS["bob"]),
    "JWT of a developer": bearer(token(sub="alice")),
    "JWT whose role claim is not admin": bearer(token(sub="carol", role="viewer")),
}
ADMINS = {
    "admin key": {"x-api-key": KEYS["carol"]},
    "admin key as bearer": bearer(KEYS["carol"]),
    "JWT of an admin in users.yaml": bearer(token(sub="carol")),
    "JWT with the admin role claim": bearer(token(sub="alice", role="admin")),
}


async def status_and_body(path: str, headers: dict[str, str],
                          **auth: Any) -> tuple[int, dict[str, Any], str]:
    """(status, JSON body, WWW-Authenticate). A granted stream never ends: only its
    refusals are asked for here (test_stream.py reads it over a socket)."""
    async with asgi_client(filled_board(config(**auth))) as client:
        response = await client.get(path, headers=headers)
    body = response.json() if response.headers.get("content-type") == "application/json" else {}
    return response.status_code, body, response.headers.get("www-authenticate", "")


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("caller", sorted(REFUSED_EVERYWHERE))
async def test_no_or_bad_credentials_are_a_401_that_says_why(path: str, caller: str) -> None:
    headers, words = REFUSED_EVERYWHERE[caller]
    status, body, challenge = await status_and_body(path, headers)
    assert (status, challenge) == (401, "Bearer")
    assert words in ErrorBody.model_validate(body).error


@pytest.mark.parametrize("path", ADMIN_PATHS)
@pytest.mark.parametrize("caller", sorted(NOT_ADMINS))
async def test_admin_endpoints_refuse_everyone_else_with_a_403(path: str, caller: str) -> None:
    status, body, _ = await status_and_body(path, NOT_ADMINS[caller])
    assert status == 403
    assert ErrorBody.model_validate(body).error.startswith("admin role required: ")


@pytest.mark.parametrize("path", ADMIN_PATHS[:2])
@pytest.mark.parametrize("caller", sorted(ADMINS))
async def test_admins_are_let_in_by_key_or_jwt(path: str, caller: str) -> None:
    status, _, _ = await status_and_body(path, ADMINS[caller])
    assert status == 200


@pytest.mark.parametrize("caller", sorted({**NOT_ADMINS, **ADMINS}))
async def test_every_authenticated_user_reads_their_own_budget(caller: str) -> None:
    headers = {**NOT_ADMINS, **ADMINS}[caller]
    status, body, _ = await status_and_body("/api/budgets/me", headers)
    assert status == 200
    assert body["user_id"] in {"alice", "bob", "carol"}


async def test_me_answers_for_the_caller_only_whatever_the_query_says() -> None:
    status, body, _ = await status_and_body("/api/budgets/me?user_id=dave",
                                            {"x-api-key": KEYS["alice"]})
    assert (status, body["user_id"]) == (200, "alice")


async def test_a_jwt_signed_with_the_configured_public_key(tmp_path: Path) -> None:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.public_key().public_bytes(serialization.Encoding.PEM,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "jwt.pem").write_bytes(pem)
    signed = token(sub="carol", key=private, algorithm="RS256")
    forged = token(sub="carol")  # HS256 with a secret: not the configured algorithm
    auth = {"algorithms": ["RS256"], "public_key_file": str(tmp_path / "jwt.pem")}
    assert (await status_and_body("/api/admin/budgets", bearer(signed), **auth))[0] == 200
    assert (await status_and_body("/api/admin/budgets", bearer(forged), **auth))[0] == 401


async def test_require_auth_false_still_needs_credentials_for_budgets() -> None:
    for path in ["/api/admin/budgets", "/api/budgets/me"]:
        status, body, _ = await status_and_body(path, {}, require_auth=False)
        assert (status, body["error"]) == (401, "missing credentials: send X-API-Key or "
                                                "Authorization")


async def test_with_authentication_disabled_the_admin_api_is_open_and_me_has_nobody() -> None:
    status, _, _ = await status_and_body("/api/admin/budgets", {}, method="api_key",
                                         enabled=False)
    assert status == 200
    status, body, _ = await status_and_body("/api/budgets/me", {}, method="api_key",
                                            enabled=False)
    assert status == 401 and "authentication is disabled" in str(body["error"])


@pytest.mark.parametrize("path", ["/admin", "/openapi.json", "/healthz", "/readyz", "/metrics"])
async def test_pages_without_user_data_need_no_credentials(path: str) -> None:
    status, _, _ = await status_and_body(path, {})
    assert status == 200
