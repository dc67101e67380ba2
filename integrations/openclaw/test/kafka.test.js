import assert from "node:assert/strict";
import { test } from "node:test";
import { BudgetBook } from "../src/budget.js";
import { resolveConfig } from "../src/config.js";
import { KafkaLink } from "../src/kafka.js";

// The broker's answers are scripted here (no broker): the first end-offset read fails as
// it does right after a topic is created, before its leader is elected.
test("the follower retries a failed start instead of leaving the book unfed", async () => {
  const warnings = [];
  const book = new BudgetBook({ failOpen: true, localLimitAction: "none", localLimitMessage: "",
                                unavailableMessage: "", pendingTtlMs: 1000 });
  const link = new KafkaLink({ config: resolveConfig({ brokers: ["127.0.0.1:9"] }), book,
                               logger: { info: () => {}, warn: (m) => warnings.push(m) } });
  let reads = 0;
  link.kafka = { admin: () => ({
    connect: async () => {},
    disconnect: async () => {},
    fetchTopicOffsets: async () => {
      reads += 1;
      if (reads === 1) throw new Error("This server is not the leader for that topic-partition");
      return [{ partition: 0, high: "0", low: "0" }];
    },
  }) };
  link.consumer = { events: { GROUP_JOIN: "join", CRASH: "crash" },
                    on: (event, listener) => { if (event === "join") listener(); return () => {}; },
                    connect: async () => {}, subscribe: async () => {}, run: async () => {},
                    disconnect: async () => {} };
  link.producer = { connect: async () => {}, disconnect: async () => {} };
  link.start();
  const deadline = Date.now() + 5_000;
  while (!book.ready && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  await link.stop(100);
  assert.equal(reads, 2);
  assert.equal(book.ready, true);
  assert.match(warnings.join("\n"), /budget\.decisions failed, retrying in 250 ms: .*not the leader/);
});
