import assert from "node:assert/strict";
import { constants, createHmac, generateKeyPairSync, sign } from "node:crypto";
import { test } from "node:test";
import { BudgetBook } from "../src/budget.js";
import { resolveConfig } from "../src/config.js";
import { createFrontDoor } from "../src/door.js";
import { callerOf, keyDigest } from "../src/frontdoor.js";
import { JwtError, SECRET_ENV, loadKey, subjectOf, verifyJwt } from "../src/jwt.js";
import { createTally } from "../src/plugin.js";

const NOW = Date.parse("2026-05-10T12:00:00Z");
const SECONDS = NOW / 1000;
const SECRET = "tally-test-secret-of-32-bytes-min";
const SETTINGS = Object.freeze({ algorithms: ["RS256"], userIdClaim: "sub" });

const rsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
const otherRsa = generateKeyPairSync("rsa", { modulusLength: 2048 });
const p256 = generateKeyPairSync("ec", { namedCurve: "P-256" });
const p384 = generateKeyPairSync("ec", { namedCurve: "P-384" });
const ed = generateKeyPairSync("ed25519");

const part = (/** @type {any} */ v) => Buffer.from(JSON.stringify(v)).toString("base64url");

/** A token as an issuer makes one. */
function token(alg, claims, privateKey, header = {}) {
  const input = `${part({ alg, typ: "JWT", ...header })}.${part(claims)}`;
  const hash = `sha${alg.slice(2)}`;
  let signature;
  if (alg.startsWith("HS")) signature = createHmac(hash, privateKey).update(input).digest();
  else if (alg === "EdDSA") signature = sign(null, Buffer.from(input), privateKey);
  else if (alg.startsWith("ES")) {
    signature = sign(hash, Buffer.from(input), { key: privateKey, dsaEncoding: "ieee-p1363" });
  } else if (alg.startsWith("PS")) {
    signature = sign(hash, Buffer.from(input), { key: privateKey,
      padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: constants.RSA_PSS_SALTLEN_DIGEST });
  } else signature = sign(hash, Buffer.from(input), privateKey);
  return `${input}.${signature.toString("base64url")}`;
}

const valid = (extra = {}) => ({ sub: "alice", exp: SECONDS + 60, ...extra });

function refused(t, settings, key, pattern) {
  assert.throws(() => verifyJwt(t, settings, key, NOW), (e) => e instanceof JwtError
    && pattern.test(e.message));
}

test("RS256, PS256, ES256, EdDSA and HS256 tokens verify with their key", () => {
  const cases = [
    ["RS256", rsa.privateKey, rsa.publicKey], ["PS256", rsa.privateKey, rsa.publicKey],
    ["ES256", p256.privateKey, p256.publicKey], ["ES384", p384.privateKey, p384.publicKey],
    ["EdDSA", ed.privateKey, ed.publicKey],
    ["HS256", Buffer.from(SECRET), loadKey({ ...SETTINGS }, { [SECRET_ENV]: SECRET })],
  ];
  for (const [alg, privateKey, key] of cases) {
    const claims = verifyJwt(token(alg, valid(), privateKey), { ...SETTINGS, algorithms: [alg] },
                             key, NOW);
    assert.equal(subjectOf(claims, "sub"), "alice", alg);
  }
});

test("a token PyJWT made (Tally's own verifier) verifies here", () => {
  // jwt.encode({"sub": "alice", "exp": 4102444800, "iat": 1700000000,
  //             "aud": ["openclaw", "other"], "iss": "https://auth.test"}, SECRET, "HS256")
  const made = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6NDEwMjQ0NDgwMCwiaWF0IjoxNzAwMDAwMDAwLCJhdWQiOlsib3BlbmNsYXciLCJvdGhlciJdLCJpc3MiOiJodHRwczovL2F1dGgudGVzdCJ9.YoBJs0nRsUV6xYws5lEEtmm_1AhZNJY4xvsmyeZy2Xw";
  const settings = { algorithms: ["HS256"], userIdClaim: "sub", audience: "openclaw",
                     issuer: "https://auth.test" };
  const key = loadKey(settings, { [SECRET_ENV]: SECRET });
  assert.equal(verifyJwt(made, settings, key, NOW).sub, "alice");
  refused(made, settings, loadKey(settings, { [SECRET_ENV]: `${SECRET}!` }), /signature/);
});

test("a wrong signature, a changed payload or a wrong key is refused", () => {
  const good = token("RS256", valid(), rsa.privateKey);
  refused(token("RS256", valid(), otherRsa.privateKey), SETTINGS, rsa.publicKey, /signature/);
  const [h, , s] = good.split(".");
  refused(`${h}.${part(valid({ sub: "mallory" }))}.${s}`, SETTINGS, rsa.publicKey, /signature/);
  refused(`${h}.${good.split(".")[1]}.`, SETTINGS, rsa.publicKey, /signature/);
  refused("a.b", SETTINGS, rsa.publicKey, /not a JWT/);
});

test("only configured algorithms that fit the key; never none, never HMAC with a public key", () => {
  refused(token("RS512", valid(), rsa.privateKey), SETTINGS, rsa.publicKey, /algorithm/);
  const none = `${part({ alg: "none" })}.${part(valid())}.`;
  refused(none, { ...SETTINGS, algorithms: ["none", "RS256"] }, rsa.publicKey, /algorithm/);
  // The classic confusion: an HMAC keyed with the public key's PEM.
  const pem = rsa.publicKey.export({ type: "spki", format: "pem" });
  refused(token("HS256", valid(), pem), { ...SETTINGS, algorithms: ["RS256", "HS256"] },
          rsa.publicKey, /algorithm/);
  refused(token("ES256", valid(), p384.privateKey), { ...SETTINGS, algorithms: ["ES256"] },
          p384.publicKey, /algorithm/); // the curve must be the algorithm's
  refused(token("RS256", valid(), rsa.privateKey, { kid: 7 }), SETTINGS, rsa.publicKey, /kid/);
});

test("exp is required and not passed; nbf and iat not in the future; no leeway", () => {
  const check = (claims) => verifyJwt(token("RS256", claims, rsa.privateKey), SETTINGS,
                                      rsa.publicKey, NOW);
  assert.throws(() => check({ sub: "alice" }), /no exp/);
  assert.throws(() => check(valid({ exp: SECONDS })), /expired/);
  assert.throws(() => check(valid({ exp: SECONDS - 1 })), /expired/);
  assert.throws(() => check(valid({ exp: "soon" })), /integer/);
  assert.equal(check(valid({ exp: String(SECONDS + 5) })).sub, "alice"); // as PyJWT's int()
  assert.throws(() => check(valid({ nbf: SECONDS + 1 })), /not yet valid \(nbf\)/);
  assert.equal(check(valid({ nbf: SECONDS })).sub, "alice");
  assert.throws(() => check(valid({ iat: SECONDS + 1 })), /not yet valid \(iat\)/);
  assert.throws(() => check(valid({ sub: 42 })), /sub claim must be a string/);
});

test("iss and aud are checked when configured, aud ignored when not", () => {
  const settings = { ...SETTINGS, audience: "openclaw", issuer: "https://auth.test" };
  const check = (claims) => verifyJwt(token("RS256", claims, rsa.privateKey), settings,
                                      rsa.publicKey, NOW);
  const right = { aud: "openclaw", iss: "https://auth.test" };
  assert.equal(check(valid(right)).sub, "alice");
  assert.equal(check(valid({ ...right, aud: ["x", "openclaw"] })).sub, "alice");
  assert.throws(() => check(valid({ ...right, aud: "elsewhere" })), /audience/);
  assert.throws(() => check(valid({ iss: right.iss })), /audience/);
  assert.throws(() => check(valid({ ...right, iss: "https://evil.test" })), /issuer/);
  assert.throws(() => check(valid({ aud: right.aud })), /issuer/);
  assert.equal(verifyJwt(token("RS256", valid({ aud: "any" }), rsa.privateKey), SETTINGS,
                         rsa.publicKey, NOW).sub, "alice");
});

test("the key: a public key file, or the environment's secret; one of them, long enough", () => {
  const pem = rsa.publicKey.export({ type: "spki", format: "pem" });
  const read = () => pem;
  assert.equal(loadKey({ ...SETTINGS, publicKeyFile: "/k.pem" }, {}, read).asymmetricKeyType,
               "rsa");
  assert.equal(loadKey(SETTINGS, { [SECRET_ENV]: SECRET }).type, "secret");
  assert.throws(() => loadKey({ ...SETTINGS, publicKeyFile: "/k.pem" }, { [SECRET_ENV]: SECRET },
                              read), /both/);
  assert.throws(() => loadKey(SETTINGS, {}), /needs publicKeyFile/);
  assert.throws(() => loadKey(SETTINGS, { [SECRET_ENV]: "short" }), /32 bytes/);
});

test("frontDoor.jwt takes auth.yaml's defaults and never 'none'", () => {
  assert.equal(resolveConfig({}, {}).frontDoor.jwt, null);
  assert.deepEqual(resolveConfig({ frontDoor: { jwt: {} } }, {}).frontDoor.jwt,
                   { algorithms: ["HS256"], publicKeyFile: undefined, audience: undefined,
                     issuer: undefined, userIdClaim: "sub" });
  const jwt = resolveConfig({ frontDoor: { jwt: { algorithms: ["None", "ES256"],
                                                 userIdClaim: "email" } } }, {}).frontDoor.jwt;
  assert.deepEqual([jwt.algorithms, jwt.userIdClaim], [["ES256"], "email"]);
});

test("the door's caller: an API key, or a JWT's claim resolved as the ingest resolves it", () => {
  const book = new BudgetBook({ failOpen: true, localLimitAction: "hard_stop",
                                localLimitMessage: "", unavailableMessage: "",
                                pendingTtlMs: 600_000 });
  const decision = (user, extra) => ({ user_id: user, action: "allow", period: "daily",
                                       tokens_used: 0, tokens_limit: 1000, reset_time: "",
                                       ...extra });
  book.applyDecision("alice", decision("alice", { key_digests: [keyDigest("ak_alice_key")] }));
  book.applyDecision("grace", decision("grace", { identities: ["sso:grace@example.com"] }));
  const settings = { algorithms: ["ES256"], userIdClaim: "email" };
  const jwt = { settings, key: p256.publicKey };
  const bearer = (t) => ({ authorization: `Bearer ${t}` });
  const signed = (claims) => token("ES256", { exp: SECONDS + 60, ...claims }, p256.privateKey);

  assert.deepEqual(callerOf({ "x-api-key": "ak_alice_key" }, book, jwt, NOW), { user: "alice" });
  assert.deepEqual(callerOf(bearer("ak_alice_key"), book, jwt, NOW), { user: "alice" });
  assert.deepEqual(callerOf(bearer(signed({ email: "sso:grace@example.com" })), book, jwt, NOW),
                   { user: "grace" }); // a claimed identity names its user
  assert.deepEqual(callerOf(bearer(signed({ email: "Openai-User:Zed" })), book, jwt, NOW),
                   { user: "openai-user:zed" }); // nobody claims it: counted under itself
  assert.deepEqual(callerOf(bearer(signed({ sub: "alice" })), book, jwt, NOW),
                   { code: "invalid_token", message: 'Invalid token: the token has no "email" claim.' });
  assert.equal(callerOf(bearer(signed({ email: "grace", exp: SECONDS })), book, jwt, NOW).code,
               "invalid_token");
  assert.equal(callerOf(bearer(signed({ email: "grace" })), book, { settings, key: null }, NOW)
    .code, "invalid_token"); // configured, but its key did not load
  // Without frontDoor.jwt a token is only ever an unknown API key.
  assert.equal(callerOf(bearer(signed({ email: "grace" })), book, null, NOW).code,
               "invalid_api_key");
  assert.equal(callerOf({}, book, jwt, NOW).code, "invalid_api_key");
  assert.equal(callerOf({ "x-api-key": signed({ email: "grace" }) }, book, jwt, NOW).code,
               "invalid_api_key"); // X-API-Key holds API keys only
});

test("a JWT key that cannot be loaded is logged; the door serves API keys and refuses tokens", async () => {
  const config = resolveConfig({ frontDoor: { jwt: { algorithms: ["HS256"] } } }, {});
  const quiet = { info() {}, warn() {} };
  const tally = createTally({ config, transport: { send() {} }, logger: quiet, clock: () => NOW });
  tally.book.applyDecision("alice", { user_id: "alice", action: "allow", period: "daily",
                                      tokens_used: 0, tokens_limit: 1000, reset_time: "",
                                      key_digests: [keyDigest("ak_alice_key")] });
  const warnings = [];
  const door = createFrontDoor({ tally, config, clock: () => NOW, env: { [SECRET_ENV]: "short" },
                                 gateway: () => ({ host: "127.0.0.1", port: 1, token: "t" }),
                                 logger: { ...quiet, warn: (m) => warnings.push(m) } });
  assert.equal(warnings.length, 1);
  assert.match(warnings[0], /JWTs are refused at the front door: .*32 bytes/);
  const ask = async (authorization) => {
    const res = { status: 0, body: "", headersSent: false,
                  writeHead(status) { this.status = status; this.headersSent = true; },
                  end(body) { this.body = body; } };
    await door["/tally/v1/budget"]({ method: "GET", url: "/tally/v1/budget",
                                     headers: { authorization } }, res);
    return res;
  };
  const byKey = await ask("Bearer ak_alice_key");
  assert.deepEqual([byKey.status, JSON.parse(byKey.body).user_id], [200, "alice"]);
  const byToken = await ask(`Bearer ${token("HS256", valid(), Buffer.from("short"))}`);
  assert.deepEqual([byToken.status, JSON.parse(byToken.body).error.code], [401, "invalid_token"]);
});
