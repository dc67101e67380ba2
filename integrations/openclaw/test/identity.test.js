import assert from "node:assert/strict";
import { test } from "node:test";
import { factsOf, identityOf, normaliseIdentity, openaiUserOf } from "../src/identity.js";

test("a channel sender is channel:senderId", () => {
  assert.equal(identityOf({ channel: "telegram", senderId: "123456", sessionKey: "x" }),
               "telegram:123456");
});

test("the OpenAI user comes from the session key, in lower case", () => {
  assert.equal(identityOf({ channel: "webchat", sessionKey: "agent:main:openai-user:Alice" }),
               "openai-user:alice");
  assert.equal(openaiUserOf("agent:main:openai-user:a:b"), "openai-user:a:b");
  assert.equal(openaiUserOf("agent:main:xopenai-user:a"), null);
  assert.equal(openaiUserOf("agent:main:openai-user:"), null);
});

test("else the session key, else unknown; the prefix goes first", () => {
  assert.equal(identityOf({ sessionKey: "agent:main:main" }), "agent:main:main");
  assert.equal(identityOf({}), "unknown");
  assert.equal(identityOf({ senderId: "7" }, "gw1/"), "gw1/unknown:7");
});

test("facts come from the context, then from a before_agent_run event", () => {
  assert.deepEqual(factsOf({ sessionKey: "s" }, { channelId: "discord", senderId: "9" }),
                   { channel: "discord", senderId: "9", sessionKey: "s" });
  assert.deepEqual(factsOf(undefined), { channel: undefined, senderId: undefined,
                                         sessionKey: undefined });
});

test("identities compare as Tally compares them", () => {
  assert.equal(normaliseIdentity("OpenAI-User:Bob"), "openai-user:bob");
  assert.equal(normaliseIdentity("telegram:ABC"), "telegram:ABC");
});
