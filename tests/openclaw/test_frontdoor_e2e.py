"""Tally's per-user front door on a real OpenClaw gateway: /tally/v1/* on the gateway's port.

The same harness as test_openclaw_e2e.py (a loopback-only network namespace, the fake
upstream, the real broker, the pipeline in this process): every call costs 100 input +
20 output tokens against a daily limit of 1000, and budgets.yaml shows the footer.

- dave calls with his own API key from users.yaml and nothing else: the gateway token is
  never sent. Whatever `user` his body names, his calls count under `dave`. He is answered
  with the footer and the x-ratelimit-* headers, then with the warning appended, then (past
  the limit) with a 429, Retry-After until the reset and an OpenAI-style error body, and no
  call reaches the upstream; on reduced priority he is served the cheaper model.
- eve holds a viewer key: her calls count as hers.
- grace signs in with a JWT (ES256, auth.yaml `method: jwt`; the plugin holds the public key
  only) whose `sub` is an identity she claims in users.yaml: her call counts under `grace`,
  as Tally's own Authenticator resolves the same token. An expired token, one signed by
  another key and one for another audience: 401, at the door as at Tally.
- no key, a wrong key, or the gateway token itself: 401.
- tom writes to the gateway's bot on Telegram (OpenClaw's own Telegram channel, its API
  root a fake Bot API on loopback): users.yaml has him claim "telegram:123456". His replies
  carry the footer, then (after calls through the door with his key: one budget for both)
  the warning, appended by the plugin's `message_sending` hook; past the limit, the reply
  is the hard stop's message and the model is not called.
- frank and carol measure the overshoot of 4 concurrent calls 40 tokens under the limit:
  frank through the front door (a reservation per call), carol through the core endpoint
  (scenario_overshoot of test_openclaw_e2e.py).
- the gateway runs with httpIdentity "refuse-anonymous": a core call without `user` is
  stopped with the unavailable message.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tally.auth import Authenticator, AuthError
from tally.config.loader import load_config
from tally.decision_cache import DecisionCache

from .fake_telegram import BOT_TOKEN, FakeTelegram
from .fake_upstream import FakeUpstream
from .gateway import PORT, TOKEN, gateway_config, install, start_gateway, wait_ready
from .netns import LoopbackNamespace
from .test_openclaw_e2e import (
    AGENTS,
    ARTIFACTS,
    IN,
    LIMIT,
    PER_CALL,
    STOP_MESSAGE,
    UPSTREAM_PORT,
    Chat,
    N,
    Pipeline,
    budgets,
    daily,
    eventually,
    keep_logs,
    ledger,
    report,
    running,
    scenario_overshoot,
    stop_gateway,
)

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(900)]  # 9 minutes seen at load 18

DAVE_KEY = "ak_dave_5b0f8c2e9d7a4e61b3c0f9a8d2e4c6b1"
EVE_KEY = "ak_eve_1c9e7a3f5b2d4e6a8c0b1d3f5e7a9c2b"
FRANK_KEY = "ak_frank_7d2c4e6a8b0f1e3d5c7a9b2e4f6a8c0d"
FOOTER = "Used {tokens_used}/{tokens_limit}"
WARNING = "Half of your daily budget is used"
UNAVAILABLE = "Say who you are: send `user`."
FOLDER = ARTIFACTS.parent / "openclaw-frontdoor"
TOM_KEY = "ak_tom_3e5a7c9b1d2f4a6c8e0b2d4f6a8c0e1f"
TOM_TELEGRAM = 123456
TELEGRAM_PORT = 18801
GRACE_SUB = "sso:grace@example.com"  # the identity provider's name for grace
AUDIENCE, ISSUER = "openclaw", "https://auth.test"


def door_budgets(reset: datetime, action: str) -> dict[str, Any]:
    spec = budgets(reset, action)
    spec["per_user_budgets"].update(include_budget_in_response=True, budget_footer=FOOTER,
                                    role_limits={"viewer": LIMIT})
    return spec


def door_users() -> dict[str, Any]:
    return {"user_identification": {"method": "api_key", "users": [
        {"id": "dave", "api_key": DAVE_KEY},
        {"id": "eve", "api_key": EVE_KEY, "role": "viewer"},
        {"id": "frank", "api_key": FRANK_KEY},
        {"id": "grace", "identities": [GRACE_SUB]},
        {"id": "tom", "api_key": TOM_KEY, "identities": [f"telegram:{TOM_TELEGRAM}"]}]}}


def telegram(api_port: int) -> dict[str, Any]:
    """openclaw.json `channels`: the Telegram bot, its Bot API the fake on `api_port`."""
    return {"telegram": {"enabled": True, "botToken": BOT_TOKEN,
                         "apiRoot": f"http://127.0.0.1:{api_port}",
                         "dmPolicy": "open", "allowFrom": ["*"], "streaming": {"mode": "off"}}}


class Issuer:
    """An identity provider: its ES256 key, the public half published as a PEM file."""

    def __init__(self, folder: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.public_pem = folder / "jwt_public.pem"
        self.public_pem.write_bytes(self.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))

    def token(self, sub: str, *, expires_in: int = 600, audience: str = AUDIENCE,
              key: ec.EllipticCurvePrivateKey | None = None) -> str:
        claims = {"sub": sub, "aud": audience, "iss": ISSUER,
                  "exp": int(time.time()) + expires_in}
        return jwt.encode(claims, key or self.key, algorithm="ES256")

    def auth_yaml(self) -> dict[str, Any]:
        """Tally's auth.yaml for these tokens; the plugin's frontDoor.jwt says the same."""
        return {"authentication": {
            "enabled": True, "method": "jwt", "require_auth": True, "user_id_claim": "sub",
            "algorithms": ["ES256"], "public_key_file": str(self.public_pem),
            "audience": AUDIENCE, "issuer": ISSUER}}

    def plugin(self) -> dict[str, Any]:
        return {"algorithms": ["ES256"], "publicKeyFile": str(self.public_pem),
                "audience": AUDIENCE, "issuer": ISSUER, "userIdClaim": "sub"}


class Door:
    """The front door as a person's OpenAI client calls it: their key, nothing else."""

    def __init__(self, base_url: str) -> None:
        self.client = httpx.AsyncClient(base_url=base_url, timeout=180)

    async def chat(self, key: str | None, text: str, *, stream: bool = False,
                   user: str | None = None) -> httpx.Response:
        body: dict[str, Any] = {"model": "openclaw/main", "stream": stream,
                                "messages": [{"role": "user", "content": text}]}
        if user is not None:
            body["user"] = user
        headers = {"authorization": f"Bearer {key}"} if key is not None else {}
        return await self.client.post("/tally/v1/chat/completions", json=body, headers=headers)

    async def view(self, key: str) -> tuple[str, int] | None:
        """The plugin's own view of the key owner's decision: (action, daily tokens used)."""
        answer = await self.client.get("/tally/v1/budget",
                                       headers={"authorization": f"Bearer {key}"})
        if answer.status_code != 200:
            return None
        return answer.json()["decision"]["action"], answer.json()["daily_used"]

    async def until(self, key: str, wanted: tuple[str, int], timeout: float = 60) -> None:
        """Until the gateway holds the decision `wanted` (not only Tally's own cache)."""
        deadline = time.monotonic() + timeout
        while (seen := await self.view(key)) != wanted:
            assert time.monotonic() < deadline, f"the door still sees {seen}, not {wanted}"
            await asyncio.sleep(0.1)

    async def text(self, key: str, text: str, *, stream: bool = False,
                   user: str | None = None) -> str:
        response = await self.chat(key, text, stream=stream, user=user)
        assert response.status_code == 200, response.text
        return content_of(response, stream)


def content_of(response: httpx.Response, stream: bool) -> str:
    if not stream:
        content: str = response.json()["choices"][0]["message"]["content"]
        return content
    return "".join((json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content")
                   or "" for line in response.text.splitlines() if line.startswith("data: {"))


def footer(used: int, limit: int = LIMIT) -> str:
    """The footer of the period that drives the decision: at 0 used, the monthly one."""
    return FOOTER.format(tokens_used=used, tokens_limit=limit)


async def test_the_front_door_on_a_real_openclaw_gateway(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    paths = install()
    kafka_port = int(kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])
    reset = (datetime.now(UTC) + timedelta(hours=6)).replace(second=0, microsecond=0)
    pipeline = Pipeline.create(tmp_path, kafka_bootstrap, f"fd-{unique_name}",
                               door_budgets(reset, "hard_stop"), door_users(), datetime.now(UTC))
    topics, config_dir, db = pipeline.topics, pipeline.config_dir, pipeline.db
    issuer = Issuer(tmp_path)
    (config_dir / "auth.yaml").write_text(yaml.safe_dump(issuer.auth_yaml()))
    plugin = {"brokers": [f"127.0.0.1:{kafka_port}"], "namespace": topics.namespace,
              "httpIdentity": "refuse-anonymous", "unavailableMessage": UNAVAILABLE,
              "frontDoor": {"defaultMaxTokens": 200, "jwt": issuer.plugin()}}
    home = tmp_path / "openclaw"
    figures: dict[str, Any] = {}

    ingest, projector, enforcer = pipeline

    with LoopbackNamespace() as ns:
        upstream = FakeUpstream(ns.listen_inside(UPSTREAM_PORT), IN, 20).start()
        bot = FakeTelegram(ns.listen_inside(TELEGRAM_PORT)).start()
        await ns.relay_out(kafka_port)
        outside = f"http://127.0.0.1:{await ns.relay_in(PORT)}"
        home.mkdir()
        config = gateway_config(home, UPSTREAM_PORT, plugin, AGENTS)
        config["channels"] = telegram(TELEGRAM_PORT)
        gateway = start_gateway(ns, paths, home, config, channels=True)
        cache = DecisionCache(kafka_bootstrap, topics)
        door = Door(outside)
        try:
            async with (httpx.AsyncClient(base_url=outside,
                                          headers={"authorization": f"Bearer {TOKEN}"}) as core,
                        running(ingest), running(projector), running(enforcer)):
                figures["gateway_start_seconds"] = round(await wait_ready(core, gateway), 1)
                await cache.start()
                await scenario_keys(door)
                await scenario_jwt(door, issuer, Authenticator.build(load_config(config_dir)))
                await scenario_under_the_limit(door, upstream)
                await scenario_telegram(door, bot, upstream)
                figures.update(await scenario_overshoot_side_by_side(door, Chat(core), upstream,
                                                                     cache))
                await scenario_past_the_limit(door, upstream, cache, config_dir, reset)
                await scenario_anonymous_core_call(core, upstream)
        finally:
            await door.client.aclose()
            await cache.stop()
            stop_gateway(gateway)
            upstream.stop()
            bot.stop()
            keep_logs(home, FOLDER)

    by_user: dict[str, int] = {}
    for user, _, _, _, _, tokens in ledger(db):
        by_user[user] = by_user.get(user, 0) + tokens
    assert by_user["dave"] == len(upstream.calls("dave-")) * PER_CALL == 10 * PER_CALL
    assert by_user["frank"] == 9 * PER_CALL
    assert by_user["eve"] == PER_CALL
    assert by_user["grace"] == PER_CALL
    assert by_user["tom"] == 9 * PER_CALL  # 2 on Telegram, 7 through the door
    assert not {"openai-user:mallory", "openai-user:dave", "mallory", GRACE_SUB,
             f"telegram:{TOM_TELEGRAM}"} & by_user.keys()
    figures["frontdoor_overshoot_tokens"] = by_user["frank"] - LIMIT
    figures["core_overshoot_tokens"] = by_user["openai-user:carol"] - LIMIT
    assert figures["frontdoor_overshoot_tokens"] == PER_CALL - 40
    assert figures["core_overshoot_tokens"] == figures["carol_admitted"] * PER_CALL - 40
    figures["total_seconds"] = round(time.monotonic() - started, 1)
    report(figures, FOLDER)


async def scenario_keys(door: Door) -> None:
    """The decisions carry the key digests; without a known key nothing is served."""
    await door.until(DAVE_KEY, ("allow", 0))
    budget = (await door.client.get("/tally/v1/budget",
                                    headers={"authorization": f"Bearer {DAVE_KEY}"})).json()
    assert (budget["user_id"], budget["daily_used"], budget["daily_limit"]) == ("dave", 0, LIMIT)
    assert "key_digests" not in budget["decision"]
    for key in (None, "ak_nobody_at_all_0000000000", TOKEN):
        refused = await door.chat(key, "dave-no-key")
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["code"] == "invalid_api_key"
    assert (await door.client.get("/tally/v1/models")).status_code == 401
    models = await door.client.get("/tally/v1/models", headers={"x-api-key": EVE_KEY})
    assert models.status_code == 200 and "openclaw/main" in models.text


async def scenario_jwt(door: Door, issuer: Issuer, tally: Authenticator) -> None:
    """A JWT names its user at the door exactly as at Tally; a bad one is refused by both."""
    token = issuer.token(GRACE_SUB)
    principal = tally.authenticate({"authorization": f"Bearer {token}"})
    assert principal is not None and principal.user_id == "grace"
    await door.until(token, ("allow", 0))  # her decision, listing GRACE_SUB, has arrived
    answer = await door.chat(token, "grace-0", user="dave")
    assert answer.status_code == 200, answer.text
    assert content_of(answer, False).startswith("Answer from big-model")
    bad = {"expired": issuer.token(GRACE_SUB, expires_in=-1),
           "another key": issuer.token(GRACE_SUB, key=ec.generate_private_key(ec.SECP256R1())),
           "another audience": issuer.token(GRACE_SUB, audience="elsewhere")}
    for why, token in bad.items():
        refused = await door.chat(token, "grace-refused")
        assert refused.status_code == 401, (why, refused.text)
        assert refused.json()["error"]["code"] == "invalid_token", why
        with pytest.raises(AuthError) as at_tally:
            tally.authenticate({"authorization": f"Bearer {token}"})
        assert at_tally.value.status == 401, why


async def scenario_under_the_limit(door: Door, upstream: FakeUpstream) -> None:
    # The first chat of a gateway is slow: one for nobody in particular.
    assert (await door.text(EVE_KEY, "eve-0")).startswith("Answer from big-model")
    answer = await door.chat(DAVE_KEY, "dave-0", user="mallory")  # names someone else
    assert answer.status_code == 200, answer.text
    assert content_of(answer, False) == f"Answer from big-model\n\n{footer(0, 1_000_000)}"
    assert answer.headers["x-ratelimit-limit-tokens"] == str(LIMIT)
    assert int(answer.headers["x-ratelimit-remaining-tokens"]) <= LIMIT
    assert answer.headers["x-ratelimit-reset-tokens"].endswith("s")
    await door.until(DAVE_KEY, ("allow", 120))
    assert await door.text(DAVE_KEY, "dave-1", stream=True) == (
        f"Answer from big-model\n\n{footer(120)}")
    for i in range(2, 5):
        await door.text(DAVE_KEY, f"dave-{i}")
    await door.until(DAVE_KEY, ("warn", 600))
    assert await door.text(DAVE_KEY, "dave-5") == (
        f"Answer from big-model\n\n{WARNING}\n\n{footer(600)}")
    await door.until(DAVE_KEY, ("warn", 720))
    assert await door.text(DAVE_KEY, "dave-6", stream=True) == (
        f"Answer from big-model\n\n{WARNING}\n\n{footer(720)}")
    await door.until(EVE_KEY, ("allow", 120))  # the viewer's call is hers
    assert {r.model for r in upstream.calls("dave-")} == {"big-model"}


async def scenario_telegram(door: Door, bot: FakeTelegram, upstream: FakeUpstream) -> None:
    """A channel reply carries the footer, then the warning (message_sending on a real
    channel); past the limit the reply is the hard stop's message, with no model call."""
    await door.until(TOM_KEY, ("allow", 0))
    bot.send(TOM_TELEGRAM, "tom-0")
    await eventually(lambda: len(bot.replies_to(TOM_TELEGRAM)) == 1, "tom's first reply", 120)
    assert bot.replies_to(TOM_TELEGRAM) == [f"Answer from big-model\n\n{footer(0, 1_000_000)}"]
    for i in range(1, 5):  # his key spends the same budget: 600 of 1000
        await door.text(TOM_KEY, f"tom-{i}")
    await door.until(TOM_KEY, ("warn", 600))
    bot.send(TOM_TELEGRAM, "tom-5")
    await eventually(lambda: len(bot.replies_to(TOM_TELEGRAM)) == 2, "tom's second reply", 120)
    assert bot.replies_to(TOM_TELEGRAM)[1] == (
        f"Answer from big-model\n\n{WARNING}\n\n{footer(600)}")
    for i in range(6, 9):  # from 720, 840 and 960: 1080
        await door.text(TOM_KEY, f"tom-{i}")
    await door.until(TOM_KEY, ("hard_stop", 1080))
    stopped = (await door.client.get("/tally/v1/budget",
                                     headers={"x-api-key": TOM_KEY})).json()["decision"]
    bot.send(TOM_TELEGRAM, "tom-stopped")
    await eventually(lambda: len(bot.replies_to(TOM_TELEGRAM)) == 3, "tom's third reply", 120)
    assert bot.replies_to(TOM_TELEGRAM)[2] == STOP_MESSAGE.format(
        reset_time=stopped["reset_time"])
    assert upstream.calls("tom-stopped") == []


async def scenario_overshoot_side_by_side(door: Door, core: Chat, upstream: FakeUpstream,
                                          cache: DecisionCache) -> dict[str, Any]:
    """4 calls at once, 40 tokens under the limit: the door, then the core endpoint."""
    for i in range(8):
        await door.text(FRANK_KEY, f"frank-{i}")
    await door.until(FRANK_KEY, ("warn", 960))
    upstream.delay = 1.0
    burst = await asyncio.gather(*(door.chat(FRANK_KEY, f"frank-burst-{i}") for i in range(N)))
    upstream.delay = 0.0
    statuses = sorted(r.status_code for r in burst)
    assert statuses == [200] + [429] * (N - 1), [r.text for r in burst]
    await door.until(FRANK_KEY, ("hard_stop", 1080))
    return {"frontdoor_statuses": statuses, **await scenario_overshoot(core, upstream, cache)}


async def scenario_past_the_limit(door: Door, upstream: FakeUpstream, cache: DecisionCache,
                                  config_dir: Path, reset: datetime) -> None:
    """Stopped: 429 before any model call; then served the cheaper model."""
    for i in range(7, 9):  # from 840 and 960: each still under the limit when admitted
        await door.text(DAVE_KEY, f"dave-{i}")
    await door.until(DAVE_KEY, ("hard_stop", 1080))
    await eventually(lambda: daily(cache, "dave") == ("hard_stop", 1080), "dave stopped")
    decided = cache.get("dave")
    assert decided is not None
    before = len(upstream.calls())
    for stream in (False, True):
        refused = await door.chat(DAVE_KEY, "dave-stopped", stream=stream)
        assert refused.status_code == 429, refused.text
        assert refused.json() == {"error": {
            "type": "rate_limit_error", "code": "budget_exceeded",
            "message": STOP_MESSAGE.format(reset_time=decided.reset_time)}}
        expected = (datetime.fromisoformat(decided.reset_time)
                    - parsedate_to_datetime(refused.headers["date"])).total_seconds()
        assert abs(int(refused.headers["retry-after"]) - expected) <= 1
        assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert len(upstream.calls()) == before  # no model call

    (config_dir / "budgets.yaml").write_text(
        yaml.safe_dump(door_budgets(reset, "reduced_priority")))
    await door.until(DAVE_KEY, ("reduced_priority", 1080))
    assert (await door.text(DAVE_KEY, "dave-cheap")).startswith("Answer from cheap-model")
    assert [r.model for r in upstream.calls("dave-cheap")] == ["cheap-model"]


async def scenario_anonymous_core_call(core: httpx.AsyncClient, upstream: FakeUpstream) -> None:
    """httpIdentity "refuse-anonymous": the core endpoint without `user` does not serve."""
    answer = await core.post("/v1/chat/completions", timeout=180, json={
        "model": "openclaw/main", "messages": [{"role": "user", "content": "anon-0"}]})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == UNAVAILABLE
    assert upstream.calls("anon-") == []
