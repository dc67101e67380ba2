import { test } from "node:test";
import assert from "node:assert/strict";
import { isDecision } from "../src/budget.js";

const decision = { user_id: "alice", action: "hard_stop", tokens_used: 10, tokens_limit: 5 };

test("a decision for its key is taken in", () => {
  assert.equal(isDecision(decision, "alice"), true);
});

test("what a broken producer writes to budget.decisions is not a decision", () => {
  for (const value of [5, "x", [], null, { ...decision, user_id: "bob" },
    { ...decision, action: "explode" }, { ...decision, tokens_used: "10" },
    { ...decision, tokens_limit: 2 ** 64 }]) {
    assert.equal(isDecision(value, "alice"), false, JSON.stringify(value));
  }
});
