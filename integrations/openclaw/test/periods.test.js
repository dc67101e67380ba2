import assert from "node:assert/strict";
import { test } from "node:test";
import { BudgetBook, PERIODS, periodsOf } from "../src/budget.js";
import { budgetRow } from "../src/frontdoor.js";

const RESET = "2026-05-11T00:00:00+00:00";
const NOON = Date.parse("2026-05-10T12:00:00Z");
const OPTIONS = { failOpen: true, localLimitAction: "hard_stop", pendingTtlMs: 600_000,
                  localLimitMessage: "Local stop for {period} ({tokens_used}/{tokens_limit})",
                  unavailableMessage: "Budgets unavailable" };

/** A decision with a daily limit of 1000, and a weekly one of `weekly` unless null. */
function decision(user, used, weekly, action = "allow") {
  const limits = { daily: 1000, weekly, monthly: 100000 };
  const periods = Object.fromEntries(PERIODS.map((kind) => [kind, limits[kind] === null ? null
    : { period: kind, period_start: "2026-05-04T00:00:00+00:00", tokens_used: used,
        tokens_limit: limits[kind], tokens_remaining: Math.max(0, limits[kind] - used),
        reset_time: RESET }]));
  return { user_id: user, action, period: "daily", tokens_used: used, tokens_limit: 1000,
           reset_time: RESET, message: null, footer: null, force_model: null, status: "ok",
           ...periods };
}

test("the period kinds are Tally's, shortest first; a missing week is left out", () => {
  assert.deepEqual(PERIODS, ["daily", "weekly", "monthly"]);
  assert.deepEqual(periodsOf(decision("a", 1, 600)).map((p) => p.period), PERIODS);
  assert.deepEqual(periodsOf(decision("a", 1, null)).map((p) => p.period), ["daily", "monthly"]);
});

test("the budget answer shows the weekly figures beside the brief's, only with a week", () => {
  const row = budgetRow(decision("alice", 300, 500));
  assert.deepEqual(Object.keys(row), ["user_id", "daily_used", "daily_limit", "daily_remaining",
                                      "monthly_used", "monthly_limit", "weekly_used",
                                      "weekly_limit", "weekly_remaining", "status", "decision"]);
  assert.deepEqual([row.weekly_used, row.weekly_limit, row.weekly_remaining], [300, 500, 200]);
  assert.equal("weekly_used" in budgetRow(decision("bob", 300, null)), false);
});

test("the tightest period may be the week: headroom and the local stop count it", () => {
  const b = new BudgetBook(OPTIONS);
  b.markReady();
  b.applyDecision("alice", decision("alice", 400, 500));
  const room = b.headroom("alice", NOON);
  assert.deepEqual([room.period.period, room.left], ["weekly", 100]);
  b.addUsage("alice", 150, NOON);
  const verdict = b.verdict("alice", NOON);
  assert.equal(verdict.action, "hard_stop");
  assert.equal(verdict.message, "Local stop for weekly (550/500)");
});
