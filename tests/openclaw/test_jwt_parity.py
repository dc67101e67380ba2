"""The front door's JWT check (integrations/openclaw/src/jwt.js) against Tally's own.

The same tokens, good and bad in every way either check looks at, go through Tally's
`verify_jwt` (PyJWT, as the ingest and the budgets API use it) and through the plugin's
verifier (Node's crypto); each must be accepted by both, naming the same user, or refused
by both.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import shutil
import subprocess
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tally.auth import AuthError, verify_jwt
from tally.config.models import Authentication
from tests.paths import project_root

SCRIPT = project_root() / "tests" / "openclaw" / "jwt_verify.mjs"
SECRET = "tally-parity-secret-of-at-least-32-bytes"
AUDIENCE, ISSUER = "openclaw", "https://auth.test"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: Any, key: bytes) -> str:
    """A token PyJWT would not make: an HMAC over any header and payload."""
    signed = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    return f"{signed}.{b64(hmac.new(key, signed.encode(), hashlib.sha256).digest())}"


def tally_says(token: str, settings: Authentication, key: str | bytes) -> dict[str, str]:
    try:
        claims = verify_jwt(token, settings, key)
    except AuthError as error:
        return {"error": error.reason}
    user = claims.get(settings.user_id_claim)
    return {"user": user} if isinstance(user, str) and user else {"error": "no user id claim"}


def door_says(tokens: list[str], settings: Authentication, public_pem: str | None,
              secret: str | None) -> list[dict[str, str]]:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the OpenClaw plugin's tests need Node 20+")
    given = {"settings": {"algorithms": list(settings.algorithms), "audience": settings.audience,
                          "issuer": settings.issuer, "userIdClaim": settings.user_id_claim},
             "publicKeyPem": public_pem, "secret": secret, "nowMs": time.time() * 1000,
             "tokens": tokens}
    done = subprocess.run([node, str(SCRIPT)], input=json.dumps(given), capture_output=True,
                          text=True, timeout=60, check=True)
    answers: list[dict[str, str]] = json.loads(done.stdout)
    return answers


def asymmetric_cases(key: ec.EllipticCurvePrivateKey, pem: bytes) -> dict[str, str]:
    now = int(time.time())
    good = {"sub": "alice", "aud": AUDIENCE, "iss": ISSUER, "exp": now + 600}
    other = ec.generate_private_key(ec.SECP256R1())

    def es(claims: dict[str, Any], **header: Any) -> str:
        return jwt.encode(claims, key, algorithm="ES256", headers=header or None)

    return {
        "valid": es(good),
        "aud as a list": es({**good, "aud": ["x", AUDIENCE]}),
        "exp a float": es({**good, "exp": now + 600.5}),
        "exp a numeric string": es({**good, "exp": str(now + 600)}),
        "exp a word": es({**good, "exp": "later"}),
        "expired": es({**good, "exp": now - 5}),
        "no exp": es({k: v for k, v in good.items() if k != "exp"}),
        "nbf passed": es({**good, "nbf": now - 5}),
        "nbf ahead": es({**good, "nbf": now + 300}),
        "iat ahead": es({**good, "iat": now + 300}),
        "another audience": es({**good, "aud": "elsewhere"}),
        "no audience": es({k: v for k, v in good.items() if k != "aud"}),
        "another issuer": es({**good, "iss": "https://evil.test"}),
        "no issuer": es({k: v for k, v in good.items() if k != "iss"}),
        "sub a number": es({**good, "sub": 42}),
        "no sub": es({k: v for k, v in good.items() if k != "sub"}),
        "another key": jwt.encode(good, other, algorithm="ES256"),
        "HS256 keyed with the public key": hand_made({"alg": "HS256", "typ": "JWT"}, good, pem),
        "alg none": ".".join((b64(b'{"alg": "none"}'), b64(json.dumps(good).encode()), "")),
    }


def test_the_door_and_tally_agree_on_every_token() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    settings = Authentication(method="jwt", algorithms=("ES256",), public_key_file="k.pem",
                              audience=AUDIENCE, issuer=ISSUER)
    cases = asymmetric_cases(key, pem)
    door = dict(zip(cases, door_says(list(cases.values()), settings, pem.decode(), None),
                    strict=True))
    tally = {name: tally_says(token, settings, pem) for name, token in cases.items()}
    assert {n: "user" in a for n, a in door.items()} == {n: "user" in a for n, a in tally.items()}
    assert {n: a.get("user") for n, a in door.items()} == {
        n: a.get("user") for n, a in tally.items()}
    accepted = sorted(n for n, a in tally.items() if "user" in a)
    assert accepted == sorted(["valid", "aud as a list", "exp a float", "exp a numeric string",
                               "nbf passed"]), tally


def test_an_hs256_secret_from_the_environment_verifies_what_tally_verifies() -> None:
    settings = Authentication(method="jwt", algorithms=("HS256",), secret=SECRET,
                              user_id_claim="email")
    now = int(time.time())
    cases = {"valid": jwt.encode({"email": "bob", "exp": now + 600}, SECRET, algorithm="HS256"),
             "another secret": jwt.encode({"email": "bob", "exp": now + 600}, SECRET + "!",
                                          algorithm="HS256"),
             "no user id claim": jwt.encode({"sub": "bob", "exp": now + 600}, SECRET,
                                            algorithm="HS256"),
             "kid a number": hand_made({"alg": "HS256", "kid": 7},
                                       {"email": "bob", "exp": now + 600}, SECRET.encode())}
    door = door_says(list(cases.values()), settings, None, SECRET)
    tally = [tally_says(token, settings, SECRET) for token in cases.values()]
    users = [a.get("user") for a in tally]
    assert [a.get("user") for a in door] == users == ["bob", None, None, None]
