import assert from "node:assert/strict";
import { test } from "node:test";
import { BudgetBook, modelOverride } from "../src/budget.js";

const DAY = "2026-05-10T00:00:00+00:00";
const RESET = "2026-05-11T00:00:00+00:00";
const NOON = Date.parse("2026-05-10T12:00:00Z");
const OPTIONS = { failOpen: true, localLimitAction: "hard_stop", pendingTtlMs: 600_000,
                  localLimitMessage: "Local stop for {period} until {reset_time} ({tokens_used})",
                  unavailableMessage: "Budgets unavailable" };

function decision(user, used, action = "allow", extra = {}) {
  const daily = { period: "daily", period_start: DAY, tokens_used: used, tokens_limit: 1000,
                  reset_time: RESET };
  const monthly = { period: "monthly", period_start: "2026-05-01T00:00:00+00:00",
                    tokens_used: used, tokens_limit: 100000, reset_time: "2026-06-01T00:00:00+00:00" };
  return { user_id: user, action, period: "daily", tokens_used: used, tokens_limit: 1000,
           reset_time: RESET, message: null, footer: `used ${used}`, force_model: null,
           daily, monthly, ...extra };
}

function book(options = {}) {
  const b = new BudgetBook({ ...OPTIONS, ...options });
  b.markReady();
  return b;
}

test("a user without a decision is allowed, unless not loaded and fail closed", () => {
  assert.equal(book().verdict("openai-user:new", NOON).action, "allow");
  const closed = new BudgetBook({ ...OPTIONS, failOpen: false });
  assert.deepEqual(closed.verdict("x", NOON),
    { action: "hard_stop", message: "Budgets unavailable", footer: null, forceModel: null,
      basis: "unavailable" });
  closed.markReady();
  assert.equal(closed.verdict("x", NOON).action, "allow");
});

test("the decision speaks: warn with its footer, hard stop with its message", () => {
  const b = book();
  b.applyDecision("openai-user:alice", decision("openai-user:alice", 800, "warn",
                                                { message: "80% used" }));
  assert.deepEqual(b.verdict("openai-user:Alice", NOON),
    { action: "warn", message: "80% used", footer: "used 800", forceModel: null,
      basis: "decision" });
  b.applyDecision("openai-user:alice", decision("openai-user:alice", 1050, "hard_stop",
                                                { message: "Stopped until tomorrow" }));
  assert.equal(b.verdict("openai-user:alice", NOON).message, "Stopped until tomorrow");
});

test("a hard stop ends at its reset time even before the next decision", () => {
  const b = book();
  b.applyDecision("u", decision("u", 1050, "hard_stop"));
  assert.equal(b.verdict("u", Date.parse(RESET) - 1).action, "hard_stop");
  assert.equal(b.verdict("u", Date.parse(RESET)).basis, "expired");
});

test("calls since the decision count at once: a stop without the round trip", () => {
  const b = book();
  b.applyDecision("u", decision("u", 700));
  b.addUsage("u", 200, NOON);
  assert.equal(b.verdict("u", NOON).action, "allow");
  b.addUsage("u", 150, NOON + 1);
  assert.deepEqual(b.verdict("u", NOON + 2), {
    action: "hard_stop", message: `Local stop for daily until ${RESET} (1050)`, footer: null,
    forceModel: null, basis: "local" });
  assert.equal(book({ localLimitAction: "none" }).verdict("u", NOON).action, "allow");
});

test("past the limit the decision's own action stands, whatever is pending", () => {
  const b = book();
  b.applyDecision("u", decision("u", 1050, "reduced_priority", { force_model: "p/cheap" }));
  b.addUsage("u", 120, NOON);
  assert.equal(b.verdict("u", NOON).action, "reduced_priority");
  assert.equal(b.verdict("u", NOON).forceModel, "p/cheap");
});

test("a decision that counts the calls replaces them; one that does not keeps them", () => {
  const b = book();
  b.applyDecision("u", decision("u", 700));
  b.addUsage("u", 200, NOON);
  b.addUsage("u", 50, NOON);
  b.applyDecision("u", decision("u", 900)); // counts the first call only
  assert.equal(b.pendingTokens("u", NOON), 50);
  b.applyDecision("u", decision("u", 950));
  assert.equal(b.pendingTokens("u", NOON), 0);
});

test("pending calls end with their day and after the time to live", () => {
  const b = book({ pendingTtlMs: 1000 });
  b.addUsage("u", 300, NOON);
  assert.equal(b.pendingTokens("u", NOON + 999), 300);
  assert.equal(b.pendingTokens("u", NOON + 1001), 0);
  b.addUsage("u", 300, NOON);
  b.applyDecision("u", decision("u", 0, "allow", {
    daily: { period: "daily", period_start: RESET, tokens_used: 0, tokens_limit: 1000,
             reset_time: "2026-05-12T00:00:00+00:00" } }));
  assert.equal(b.pendingTokens("u", NOON), 0);
});

test("a decision's identities map gateway names to the user", () => {
  const b = book();
  b.applyDecision("alice", decision("alice", 950, "warn",
                                    { identities: ["telegram:1", "openai-user:Alice"] }));
  b.addUsage("telegram:1", 100, NOON);
  assert.equal(b.userOf("openai-user:ALICE"), "alice");
  assert.equal(b.pendingTokens("openai-user:alice", NOON), 100);
  assert.equal(b.verdict("openai-user:alice", NOON).basis, "local");
  b.applyDecision("alice", decision("alice", 950, "warn", { identities: [] }));
  assert.equal(b.userOf("telegram:1"), "telegram:1");
  b.applyDecision("alice", null);
  assert.equal(b.decisions.size, 0);
});

test("a group budget's figures count the pending calls too", () => {
  const b = book();
  b.applyDecision("u", decision("u", 100, "warn", { budget: "department:r", tokens_used: 4900,
                                                    tokens_limit: 5000 }));
  b.addUsage("u", 100, NOON);
  assert.equal(b.verdict("u", NOON).basis, "local");
});

test("a forced model is split into provider and model", () => {
  assert.deepEqual(modelOverride("anthropic/claude-3-haiku"),
                   { providerOverride: "anthropic", modelOverride: "claude-3-haiku" });
  assert.deepEqual(modelOverride("openrouter/meta/llama-3"),
                   { providerOverride: "openrouter", modelOverride: "meta/llama-3" });
  assert.deepEqual(modelOverride("cheap-model"), { modelOverride: "cheap-model" });
  assert.equal(modelOverride(""), null);
  assert.equal(modelOverride(null), null);
  assert.equal(modelOverride("fake/"), null);
});

test("an identity moved to another user stays with the new one", () => {
  const b = book();
  b.applyDecision("alice", decision("alice", 100, "allow", { identities: ["telegram:1"] }));
  b.applyDecision("bob", decision("bob", 200, "allow", { identities: ["telegram:1"] }));
  b.applyDecision("alice", decision("alice", 100, "allow", { identities: [] }));
  assert.equal(b.userOf("telegram:1"), "bob");
});
