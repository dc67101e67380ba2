/**
 * The plugin's settings: `plugins.entries.tally.config`, with defaults filled in.
 *
 * openclaw.plugin.json's `configSchema` validates the shape before the plugin loads;
 * this module only fills defaults and derives the topic names (the same rule as
 * Tally's `src/tally/topics.py`: a namespace prefixes every name).
 */

/** @typedef {"input_tokens"|"output_tokens"|"cache_read_tokens"|"cache_write_tokens"} TokenField */

/**
 * @typedef {object} TallyConfig
 * @property {string[]} brokers Kafka bootstrap servers, "host:port".
 * @property {string} clientId
 * @property {{usageRaw: string, budgetDecisions: string}} topics
 * @property {boolean} failOpen Allow calls while the decisions are not loaded yet.
 * @property {string} identityPrefix Put before every identity (e.g. one per gateway).
 * @property {"hard_stop"|"none"} localLimitAction What to do when the local view is past a
 *   limit before a decision says so; match budgets.yaml `on_limit_exceeded.action`.
 * @property {string} localLimitMessage Template with Tally's placeholders.
 * @property {string} unavailableMessage The reply when failOpen is false and no decision is loaded.
 * @property {TokenField[]} countedTokens Match budgets.yaml `counted_tokens`.
 * @property {number} pendingTtlSeconds Forget a call's local tokens after this long.
 * @property {boolean} appendFooter Append warnings and the footer on channel deliveries.
 */

export const TOKEN_FIELDS = Object.freeze([
  "input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens",
]);

export const DEFAULTS = Object.freeze({
  brokers: ["127.0.0.1:9092"],
  clientId: "tally-openclaw",
  namespace: "",
  failOpen: true,
  identityPrefix: "",
  localLimitAction: "hard_stop",
  localLimitMessage:
    "You've reached your {period} token limit. Your budget resets at {reset_time}.",
  unavailableMessage:
    "Token budgets cannot be checked right now, so requests are paused. Please try again shortly.",
  countedTokens: TOKEN_FIELDS,
  pendingTtlSeconds: 600,
  appendFooter: true,
});

/**
 * Topic names as Tally's Topics(namespace) spells them.
 * @param {string} namespace
 */
export function topicNames(namespace) {
  const name = (/** @type {string} */ base) => (namespace ? `${namespace}.${base}` : base);
  return { usageRaw: name("usage.raw"), budgetDecisions: name("budget.decisions") };
}

/**
 * The settings with every default filled in.
 * @param {Record<string, unknown> | undefined} raw `api.pluginConfig`
 * @returns {TallyConfig}
 */
export function resolveConfig(raw) {
  const given = /** @type {Record<string, any>} */ (raw ?? {});
  const merged = { ...DEFAULTS, ...given };
  const topics = { ...topicNames(merged.namespace), ...(given.topics ?? {}) };
  return Object.freeze({
    brokers: [...merged.brokers],
    clientId: merged.clientId,
    topics,
    failOpen: merged.failOpen,
    identityPrefix: merged.identityPrefix,
    localLimitAction: merged.localLimitAction,
    localLimitMessage: merged.localLimitMessage,
    unavailableMessage: merged.unavailableMessage,
    countedTokens: [...merged.countedTokens],
    pendingTtlSeconds: merged.pendingTtlSeconds,
    appendFooter: merged.appendFooter,
  });
}
