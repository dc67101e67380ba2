import assert from "node:assert/strict";
import { test } from "node:test";
import { connectionOptions, resolveConfig, topicNames } from "../src/config.js";
import { createTally, notices } from "../src/plugin.js";

const NOON = Date.parse("2026-05-10T12:00:00Z");
const RESET = "2026-05-11T00:00:00+00:00";
const ALICE = { runId: "r1", sessionKey: "agent:main:openai-user:alice", channel: "webchat" };

function setup(options = {}) {
  const sent = [];
  const warnings = [];
  const tally = createTally({
    config: resolveConfig(options),
    transport: { send: (e) => sent.push(e) },
    logger: { info: () => {}, warn: (m) => warnings.push(m) },
    clock: () => NOON,
  });
  tally.book.markReady();
  return { tally, hooks: tally.hooks, sent, warnings };
}

function decide(tally, user, used, action, extra = {}) {
  const period = (name, limit) => ({ period: name, period_start: "2026-05-10T00:00:00+00:00",
                                     tokens_used: used, tokens_limit: limit, reset_time: RESET });
  tally.book.applyDecision(user, {
    user_id: user, action, period: "daily", tokens_used: used, tokens_limit: 1000,
    reset_time: RESET, daily: period("daily", 1000), monthly: period("monthly", 100000),
    message: null, footer: null, force_model: null, ...extra });
}

test("settings: defaults, the namespace, explicit topics", () => {
  const config = resolveConfig({ namespace: "t1", topics: { usageRaw: "raw-x" } });
  assert.deepEqual(config.topics, { usageRaw: "raw-x", budgetDecisions: "t1.budget.decisions" });
  assert.equal(config.failOpen, true);
  assert.deepEqual(topicNames(""), { usageRaw: "usage.raw", budgetDecisions: "budget.decisions" });
});

test("settings: SASL and TLS from the environment, the plugin config winning", () => {
  const env = { KAFKA_SECURITY_PROTOCOL: "SASL_SSL", KAFKA_SASL_MECHANISM: "SCRAM-SHA-256",
                KAFKA_SASL_USERNAME: "tally", KAFKA_SASL_PASSWORD: "s3cret",
                KAFKA_SSL_CA_FILE: "/etc/kafka/ca.pem" };
  assert.deepEqual(resolveConfig({}, env).security, {
    protocol: "SASL_SSL",
    sasl: { mechanism: "scram-sha-256", username: "tally", password: "s3cret" },
    tls: { caFile: "/etc/kafka/ca.pem", certFile: undefined, keyFile: undefined } });
  const given = { securityProtocol: "SASL_PLAINTEXT", sasl: { mechanism: "PLAIN", username: "gw" } };
  assert.deepEqual(resolveConfig(given, env).security.sasl,
                   { mechanism: "plain", username: "gw", password: "s3cret" });
  assert.deepEqual(resolveConfig({}, {}).security, { protocol: "PLAINTEXT", sasl: null, tls: null });
  assert.deepEqual(connectionOptions(resolveConfig({ securityProtocol: "SSL" }, {}).security),
                   { ssl: true });
  assert.throws(() => resolveConfig({ securityProtocol: "SASL_SSL" }, {}),
                /SASL_SSL needs sasl.username and sasl.password/);
});

test("allowed calls pass untouched and send their usage", () => {
  const { hooks, sent } = setup();
  assert.equal(hooks.before_agent_reply({ cleanedBody: "hi" }, ALICE), undefined);
  assert.equal(hooks.before_model_resolve({ prompt: "hi" }, ALICE), undefined);
  assert.equal(hooks.before_agent_run({ prompt: "hi", senderIsOwner: true }, ALICE), undefined);
  const output = { runId: "r1", provider: "fake", model: "big", usage: { input: 100, output: 20 } };
  hooks.llm_output(output, ALICE);
  hooks.llm_output(output, ALICE); // the same attempt told twice
  hooks.llm_output({ ...output }, ALICE); // a second attempt of the run
  assert.deepEqual(sent.map((e) => [e.event_id, e.user_id, e.input_tokens + e.output_tokens]), [
    ["openclaw:r1:1", "openai-user:alice", 120], ["openclaw:r1:2", "openai-user:alice", 120]]);
});

test("a hard stop answers with the decision's message, before any model call", () => {
  const { tally, hooks } = setup();
  decide(tally, "openai-user:alice", 1050, "hard_stop", { message: "Stopped until tomorrow." });
  assert.deepEqual(hooks.before_agent_reply({ cleanedBody: "hi" }, ALICE),
    { handled: true, reply: { text: "Stopped until tomorrow." }, reason: "tally:decision" });
  const cron = { ...ALICE, runId: "cron-1", trigger: "cron" }; // never through before_agent_reply
  assert.deepEqual(hooks.before_agent_run({ prompt: "hi" }, cron),
    { outcome: "block", reason: "tally:decision", message: "Stopped until tomorrow." });
  const bob = { ...ALICE, sessionKey: "agent:main:openai-user:bob", runId: "r2" };
  assert.equal(hooks.before_agent_reply({ cleanedBody: "hi" }, bob), undefined);
});

test("the gateway's own count stops a user past the limit before the decision does", () => {
  const { tally, hooks } = setup();
  decide(tally, "openai-user:alice", 900, "warn");
  hooks.llm_output({ runId: "r1", model: "m", usage: { input: 100, output: 20 } }, ALICE);
  const answer = hooks.before_agent_reply({ cleanedBody: "hi" }, { ...ALICE, runId: "r3" });
  assert.equal(answer?.reply.text,
               `You've reached your daily token limit. Your budget resets at ${RESET}.`);
});

test("a run admitted by before_agent_reply is let finish, even if the user is stopped since", () => {
  const { tally, hooks } = setup();
  assert.equal(hooks.before_agent_reply({ cleanedBody: "hi" }, ALICE), undefined);
  decide(tally, "openai-user:alice", 1050, "hard_stop", { message: "Stopped." });
  assert.equal(hooks.before_agent_run({ prompt: "hi" }, ALICE), undefined);
  assert.equal(hooks.before_agent_reply({}, { ...ALICE, runId: "r2" })?.reply.text, "Stopped.");
});

test("reduced priority routes to the configured model, provider and model apart", () => {
  const { tally, hooks } = setup();
  decide(tally, "openai-user:alice", 1050, "reduced_priority",
         { force_model: "fake/cheap-model", message: "Over budget." });
  assert.deepEqual(hooks.before_model_resolve({ prompt: "hi" }, ALICE),
                   { providerOverride: "fake", modelOverride: "cheap-model" });
  assert.equal(hooks.before_agent_reply({ cleanedBody: "hi" }, ALICE), undefined);
});

test("a claimed user's decision is found by the identity the gateway sees", () => {
  // users.yaml: {id: user_alice, identities: ["openai-user:alice"]}; the client sends
  // user "Alice". The decision is keyed user_alice and lists her identities.
  const { tally, hooks, sent } = setup();
  const caller = { runId: "c1", sessionKey: "agent:main:openai-user:Alice" };
  const claimed = { identities: ["openai-user:alice"] };
  decide(tally, "user_alice", 900, "warn", claimed);
  decide(tally, "openai-user:alice", 0, "allow"); // a stale one, from before the claim
  assert.equal(hooks.before_agent_reply({ cleanedBody: "hi" }, caller), undefined);
  hooks.llm_output({ runId: "c1", model: "m", usage: { input: 100, output: 20 } }, caller);
  assert.equal(sent[0].user_id, "openai-user:alice"); // Tally's ingest resolves it
  assert.equal(tally.book.pendingTokens("openai-user:alice", NOON), 120);
  const next = { ...caller, runId: "c2" };
  assert.equal(hooks.before_agent_reply({}, next)?.reason, "tally:local");

  decide(tally, "user_alice", 1020, "hard_stop", { ...claimed, message: "Stopped." });
  assert.equal(tally.book.pendingTokens("openai-user:alice", NOON), 0); // counted now
  assert.deepEqual(hooks.before_agent_reply({}, { ...caller, runId: "c3" }),
    { handled: true, reply: { text: "Stopped." }, reason: "tally:decision" });
  decide(tally, "user_alice", 1020, "reduced_priority",
         { ...claimed, force_model: "fake/cheap-model" });
  assert.deepEqual(hooks.before_model_resolve({}, { ...caller, runId: "c4" }),
                   { providerOverride: "fake", modelOverride: "cheap-model" });
  const bob = { runId: "b1", sessionKey: "agent:main:openai-user:bob" };
  assert.equal(hooks.before_model_resolve({}, bob), undefined);
});

test("channel replies get the warning and the footer", () => {
  const { tally, hooks } = setup();
  decide(tally, "telegram:42", 800, "warn", { message: "80% used", footer: "---\n800/1000" });
  const ctx = { channel: "telegram", senderId: "42", sessionKey: "agent:main:telegram:dm:42",
                runId: "r9" };
  hooks.before_agent_run({ prompt: "hi" }, ctx);
  assert.deepEqual(hooks.message_sending({ to: "42", content: "Answer" },
                                         { channelId: "telegram", sessionKey: ctx.sessionKey }),
                   { content: "Answer\n\n80% used\n\n---\n800/1000" });
  assert.deepEqual(hooks.message_sending({ to: "42", content: "A" },
                                         { channelId: "telegram", senderId: "42" }),
                   { content: "A\n\n80% used\n\n---\n800/1000" });
  assert.equal(hooks.message_sending({ content: "A" }, { channelId: "x" }), undefined);
  assert.equal(setup({ appendFooter: false }).hooks.message_sending({ content: "A" }, ctx),
               undefined);
});

test("the notices: the message only for warnings and past the limit; the footer always", () => {
  const base = { footer: " f ", forceModel: null, basis: "decision" };
  assert.equal(notices({ ...base, action: "allow", message: null }), "f");
  assert.equal(notices({ ...base, action: "soft_limit", message: "flagged" }), "flagged\n\nf");
  assert.equal(notices({ ...base, action: "allow", message: null, footer: null }), "");
});

test("a failing handler lets the call through and is logged", () => {
  const { tally, hooks, warnings } = setup();
  tally.book.verdict = () => { throw new Error("boom"); };
  assert.equal(hooks.before_agent_reply({}, ALICE), undefined);
  assert.match(warnings[0], /before_agent_reply failed.*boom/);
  assert.equal(tally.stats().calls, 1);
});
