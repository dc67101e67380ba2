import assert from "node:assert/strict";
import { test } from "node:test";
import { BudgetBook } from "../src/budget.js";
import { resolveConfig } from "../src/config.js";
import { agentOf } from "../src/door.js";
import {
  budgetRow, errorBody, keyDigest, presentedKey, rateHeaders, secondsUntil, streamAppender,
  withAppended, worstCase,
} from "../src/frontdoor.js";
import { anonymousSession, coreSession, doorSession } from "../src/identity.js";
import { createTally } from "../src/plugin.js";

const NOON = Date.parse("2026-05-10T12:00:00Z");
const RESET = "2026-05-11T00:00:00+00:00";
// The same vector as tests/core/test_report.py: Tally's api_key_digest("ak_alice_0123456789").
const ALICE_KEY = "ak_alice_0123456789";

function decision(user, used, action = "allow", extra = {}) {
  const period = (name, limit) => ({ period: name, period_start: "2026-05-10T00:00:00+00:00",
                                     tokens_used: used, tokens_limit: limit,
                                     tokens_remaining: Math.max(0, limit - used),
                                     reset_time: RESET });
  return { user_id: user, action, period: "daily", tokens_used: used, tokens_limit: 1000,
           reset_time: RESET, daily: period("daily", 1000), monthly: period("monthly", 100000),
           message: null, footer: null, force_model: null, ...extra };
}

function book() {
  const b = new BudgetBook({ failOpen: true, localLimitAction: "hard_stop", localLimitMessage: "",
                             unavailableMessage: "", pendingTtlMs: 600_000,
                             reservationTtlMs: 300_000 });
  b.markReady();
  return b;
}

test("the key digest is Tally's api_key_digest", () => {
  assert.equal(keyDigest(ALICE_KEY), "sha256:88c226a54651dc01f1ff3cc474d8bd1ae3133423c33c9f61faa99dc2267448b0");
  assert.match(keyDigest(ALICE_KEY), /^sha256:[0-9a-f]{64}$/);
  assert.notEqual(keyDigest(ALICE_KEY), keyDigest("ak_alice_0123456780"));
});

test("a key is taken from X-API-Key, else a Bearer token; nothing else is a key", () => {
  assert.equal(presentedKey({ "x-api-key": " k1 ", authorization: "Bearer k2" }), "k1");
  assert.equal(presentedKey({ authorization: "Bearer k2" }), "k2");
  assert.equal(presentedKey({ authorization: "Basic abc" }), null);
  assert.equal(presentedKey({}), null);
});

test("decisions name their key's owner; a new decision without it forgets the key", () => {
  const b = book();
  const digest = keyDigest(ALICE_KEY);
  b.applyDecision("alice", decision("alice", 0, "allow", { key_digests: [digest] }));
  assert.equal(b.userOfKey(digest), "alice");
  assert.equal(b.userOfKey(keyDigest("ak_other")), null);
  b.applyDecision("alice", decision("alice", 0));
  assert.equal(b.userOfKey(digest), null);
});

test("reservations hold headroom until released or timed out", () => {
  const b = book();
  b.applyDecision("alice", decision("alice", 900));
  assert.equal(b.headroom("alice", NOON).left, 100);
  const r = b.reserve("alice", 150, NOON);
  assert.equal(b.headroom("alice", NOON).left, -50);
  assert.equal(b.headroom("alice", NOON).period.period, "daily");
  b.release(r);
  assert.equal(b.headroom("alice", NOON).left, 100);
  b.reserve("alice", 150, NOON);
  assert.equal(b.headroom("alice", NOON + 300_001).left, 100);
  assert.equal(b.headroom("nobody", NOON), null);
});

test("a call's worst case: its max_tokens or the default, plus the prompt estimate", () => {
  const messages = [{ role: "user", content: "x".repeat(30) }];
  const prompt = Math.ceil(JSON.stringify(messages).length / 4);
  const sizes = { defaultOutput: 500, overhead: 7 };
  assert.equal(worstCase({ messages, max_tokens: 64 }, sizes), 64 + prompt + 7);
  assert.equal(worstCase({ messages, max_completion_tokens: 32, max_tokens: 64 }, sizes),
               32 + prompt + 7);
  assert.equal(worstCase({ messages, max_tokens: "lots" }, sizes), 500 + prompt + 7);
});

test("rate headers and Retry-After count down to the reset", () => {
  const room = { period: { period: "daily", tokens_limit: 1000, reset_time: RESET }, left: -20 };
  assert.equal(secondsUntil(RESET, NOON), 12 * 3600);
  assert.equal(secondsUntil(RESET, NOON + 1), 12 * 3600); // rounded up
  assert.equal(secondsUntil("not a time", NOON), 0);
  assert.deepEqual(rateHeaders(room, NOON), {
    "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "0",
    "x-ratelimit-reset-tokens": "43200s" });
  assert.deepEqual(rateHeaders(null, NOON), {});
  assert.deepEqual(errorBody("rate_limit_error", "budget_exceeded", "m"),
                   { error: { type: "rate_limit_error", code: "budget_exceeded", message: "m" } });
});

test("the notices go after the answer's text, streaming or not", () => {
  const answer = { id: "c1", choices: [{ index: 0, message: { role: "assistant", content: "Hi" } }] };
  assert.equal(withAppended(answer, "Note").choices[0].message.content, "Hi\n\nNote");
  assert.equal(withAppended(answer, "").choices[0].message.content, "Hi");

  const chunk = (delta, finish = null) => `data: ${JSON.stringify({
    id: "c1", created: 1, model: "m", choices: [{ index: 0, delta, finish_reason: finish }] })}\n\n`;
  const stream = chunk({ content: "Hi" }) + chunk({}, "stop") + "data: [DONE]\n\n";
  const appender = streamAppender("Note");
  const out = [...stream].map((c) => appender.push(c)).join("") + appender.end();
  const contents = out.split("\n").filter((l) => l.startsWith("data: {"))
    .map((l) => JSON.parse(l.slice(6)).choices[0]);
  assert.deepEqual(contents.map((c) => [c.delta.content ?? null, c.finish_reason]),
                   [["Hi", null], ["\n\nNote", null], [null, "stop"]]);
  assert.ok(out.endsWith("data: [DONE]\n\n"));
  const none = streamAppender("");
  assert.equal(none.push(stream) + none.end(), stream);
});

test("the budget answer is Tally's /api/budgets/me shape, without key digests", () => {
  const row = budgetRow(decision("alice", 300, "allow", { key_digests: ["sha256:x"],
                                                         status: "ok" }));
  assert.deepEqual(Object.keys(row), ["user_id", "daily_used", "daily_limit", "daily_remaining",
                                      "monthly_used", "monthly_limit", "status", "decision"]);
  assert.equal(row.daily_remaining, 700);
  assert.equal("key_digests" in row.decision, false);
});

test("session keys: the door's own, the core endpoint's, and an anonymous one", () => {
  const id = "0b9c6c52-3f7e-4a8e-9a55-7a9f3c3b2d11";
  assert.equal(doorSession(`agent:main:tally-door:${id}`), id);
  assert.equal(doorSession("agent:main:openai-user:tally-door:x"), null);
  assert.equal(coreSession("agent:main:openai-user:bob"), true);
  assert.equal(coreSession(`agent:main:openai:${id}`), true);
  assert.equal(anonymousSession(`agent:main:openai:${id}`), true);
  assert.equal(anonymousSession("agent:main:openai-user:bob"), false);
  assert.equal(agentOf("openclaw/a1"), "a1");
  assert.equal(agentOf("gpt-4o"), "main");
});

function tallyWith(options) {
  const sent = [];
  const tally = createTally({ config: resolveConfig(options), transport: { send: (e) => sent.push(e) },
                              logger: { info: () => {}, warn: () => {} }, clock: () => NOON });
  tally.book.markReady();
  return { tally, sent };
}

const LLM_OUTPUT = { runId: "r1", provider: "fake", model: "big-model",
                     usage: { input: 100, output: 20 } };

test("a front-door run counts under the key's owner, and its usage settles the reservation", () => {
  const { tally, sent } = tallyWith({});
  const id = "0b9c6c52-3f7e-4a8e-9a55-7a9f3c3b2d11";
  tally.book.applyDecision("dave", decision("dave", 0));
  const reservation = tally.book.reserve("dave", 500, NOON);
  tally.doors.set(id, { userId: "dave", reservation });
  const ctx = { runId: "r1", sessionKey: `agent:main:tally-door:${id}` };
  tally.hooks.before_agent_reply({}, ctx);
  tally.hooks.llm_output(LLM_OUTPUT, ctx);
  assert.equal(sent.length, 1);
  assert.equal(sent[0].user_id, "dave");
  assert.equal(tally.book.reservedTokens("dave", NOON), 0);
  assert.equal(tally.book.pendingTokens("dave", NOON), 120);
});

test("httpIdentity: operator counts the core endpoint under one name", () => {
  const { tally, sent } = tallyWith({ httpIdentity: "operator" });
  tally.hooks.llm_output(LLM_OUTPUT, { runId: "r1", sessionKey: "agent:main:openai-user:bob" });
  assert.equal(sent[0].user_id, "openclaw-operator");
});

test("httpIdentity: refuse-anonymous stops a core call without user, not one with it", () => {
  const { tally } = tallyWith({ httpIdentity: "refuse-anonymous", unavailableMessage: "Who?" });
  const anonymous = { runId: "r2",
                      sessionKey: "agent:main:openai:0b9c6c52-3f7e-4a8e-9a55-7a9f3c3b2d11" };
  assert.deepEqual(tally.hooks.before_agent_reply({}, anonymous),
                   { handled: true, reply: { text: "Who?" }, reason: "tally:anonymous" });
  assert.equal(tally.hooks.before_agent_reply({}, { runId: "r3",
                                                    sessionKey: "agent:main:openai-user:bob" }),
               undefined);
  const { tally: plain } = tallyWith({});
  assert.equal(plain.hooks.before_agent_reply({}, anonymous), undefined);
});
