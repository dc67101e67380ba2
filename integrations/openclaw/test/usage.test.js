import assert from "node:assert/strict";
import { test } from "node:test";
import { RunMemory, countedTokens, usageEvent } from "../src/usage.js";

const NOW = new Date("2026-05-10T12:00:00Z");
const EVENT = { runId: "chatcmpl_1", provider: "fake", model: "big-model",
                usage: { input: 100, output: 20, cacheRead: 5, cacheWrite: 0, total: 125 } };
const CTX = { runId: "chatcmpl_1", sessionKey: "agent:main:openai-user:alice", channel: "webchat" };

test("an llm_output becomes Tally's UsageRecorded", () => {
  assert.deepEqual(usageEvent({ event: EVENT, ctx: CTX, userId: "openai-user:alice",
                                attempt: 1, now: NOW }), {
    event_id: "openclaw:chatcmpl_1:1",
    occurred_at: "2026-05-10T12:00:00.000Z",
    user_id: "openai-user:alice",
    model: "big-model",
    provider: "fake",
    input_tokens: 100,
    output_tokens: 20,
    cache_read_tokens: 5,
    cache_write_tokens: 0,
    session_key: "agent:main:openai-user:alice",
    channel: "webchat",
    request_id: "chatcmpl_1",
    source: "openclaw",
  });
});

test("no usage, no event; odd numbers count as zero", () => {
  assert.equal(usageEvent({ event: { runId: "r" }, userId: "u", attempt: 1, now: NOW }), null);
  const odd = usageEvent({ event: { usage: { input: "7", output: -3, cacheRead: NaN } },
                          userId: "u", attempt: 2, now: NOW });
  assert.equal(odd?.input_tokens, 7);
  assert.equal(odd?.output_tokens, 0);
  assert.equal(odd?.event_id, "openclaw:unknown-run:2");
});

test("counted tokens follow budgets.yaml counted_tokens", () => {
  const event = usageEvent({ event: EVENT, ctx: CTX, userId: "u", attempt: 1, now: NOW });
  assert.ok(event);
  assert.equal(countedTokens(event, ["input_tokens", "output_tokens"]), 120);
  assert.equal(countedTokens(event, ["input_tokens", "output_tokens", "cache_read_tokens",
                                     "cache_write_tokens"]), 125);
});

test("runs remember their caller and count their attempts, oldest forgotten first", () => {
  const runs = new RunMemory(2);
  runs.remember("a", "telegram:1");
  assert.equal(runs.nextAttempt("a"), 1);
  assert.equal(runs.nextAttempt("a"), 2);
  assert.equal(runs.identity("a"), "telegram:1");
  runs.nextAttempt("b");
  runs.nextAttempt("c");
  assert.equal(runs.identity("a"), undefined);
  assert.equal(runs.nextAttempt(undefined), 1);
});
