import assert from "node:assert/strict";
import { test } from "node:test";
import { periodValues, render } from "../src/templates.js";

test("known placeholders are filled, others left as written", () => {
  const values = periodValues({ period: "daily", tokens_used: 1050, tokens_limit: 1000,
                                reset_time: "2026-05-11T00:00:00+00:00" });
  assert.equal(render("{percent_used}% of {period}, {tokens_remaining} left, {x}", values),
               "105% of daily, 0 left, {x}");
  assert.equal(periodValues({ period: "daily", tokens_used: 5, tokens_limit: 0,
                              reset_time: "" }).percent_used, 100);
});
