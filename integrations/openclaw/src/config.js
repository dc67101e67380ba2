/**
 * The plugin's settings: `plugins.entries.tally.config`, with defaults filled in.
 *
 * openclaw.plugin.json's `configSchema` validates the shape before the plugin loads;
 * this module only fills defaults and derives the topic names (the same rule as
 * Tally's `src/tally/topics.py`: a namespace prefixes every name).
 */

import { readFileSync } from "node:fs";

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
 * @property {KafkaSecurity} security How to reach Kafka (SASL, TLS).
 * @property {"user"|"operator"|"refuse-anonymous"} httpIdentity Who a call to the core
 *   /v1/chat/completions counts under: its `user` field (as OpenClaw makes the session),
 *   one operator identity, or its `user` with calls without one stopped.
 * @property {string} operatorIdentity The identity of core-endpoint calls under "operator".
 * @property {FrontDoor} frontDoor The per-user routes under /tally/v1/.
 */

/**
 * @typedef {object} FrontDoor
 * @property {boolean} enabled
 * @property {number} defaultMaxTokens Reserved as a call's output when it sets no max_tokens.
 * @property {number} promptOverhead Reserved on top of the prompt estimate (system prompt, tools).
 * @property {number} reservationTimeoutSeconds A reservation not settled by then is released.
 * @property {import("./jwt.js").JwtSettings | null} jwt JWTs accepted as auth.yaml says, or null.
 */

/**
 * @typedef {object} KafkaSecurity
 * @property {"PLAINTEXT"|"SSL"|"SASL_PLAINTEXT"|"SASL_SSL"} protocol
 * @property {{mechanism: "plain"|"scram-sha-256"|"scram-sha-512", username: string, password: string} | null} sasl
 * @property {{caFile?: string, certFile?: string, keyFile?: string} | null} tls
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
  httpIdentity: "user",
  operatorIdentity: "openclaw-operator",
  frontDoor: Object.freeze({ enabled: true, defaultMaxTokens: 1024, promptOverhead: 0,
                             reservationTimeoutSeconds: 300 }),
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
 * SASL and TLS settings: the plugin config's, else the environment variables Tally's
 * services read (KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_*, KAFKA_SSL_*_FILE).
 * @param {Record<string, any>} given
 * @param {Record<string, string | undefined>} env
 * @returns {KafkaSecurity}
 */
export function resolveSecurity(given, env) {
  const protocol = given.securityProtocol ?? env.KAFKA_SECURITY_PROTOCOL ?? "PLAINTEXT";
  if (!["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"].includes(protocol)) {
    throw new Error(`tally: unknown Kafka security protocol ${JSON.stringify(protocol)}`);
  }
  const s = given.sasl ?? {};
  const sasl = protocol.startsWith("SASL_") ? {
    mechanism: String(s.mechanism ?? env.KAFKA_SASL_MECHANISM ?? "PLAIN").toLowerCase(),
    username: s.username ?? env.KAFKA_SASL_USERNAME,
    password: s.password ?? env.KAFKA_SASL_PASSWORD,
  } : null;
  if (sasl && !(sasl.username && sasl.password)) {
    throw new Error(`tally: Kafka security protocol ${protocol} needs sasl.username and ` +
                    "sasl.password (or KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD)");
  }
  const t = given.tls ?? {};
  const tls = protocol.endsWith("SSL") ? {
    caFile: t.caFile ?? env.KAFKA_SSL_CA_FILE,
    certFile: t.certFile ?? env.KAFKA_SSL_CERT_FILE,
    keyFile: t.keyFile ?? env.KAFKA_SSL_KEY_FILE,
  } : null;
  return Object.freeze({ protocol, sasl: /** @type {KafkaSecurity["sasl"]} */ (sasl), tls });
}

/**
 * kafkajs's `sasl` and `ssl` options for the resolved security settings.
 * @param {import("./config.js").KafkaSecurity} security
 */
export function connectionOptions(security) {
  /** @type {Record<string, any>} */
  const options = {};
  if (security.sasl) options.sasl = { ...security.sasl };
  if (security.tls) {
    const read = (/** @type {string | undefined} */ path) => (path ? readFileSync(path) : undefined);
    const { caFile, certFile, keyFile } = security.tls;
    options.ssl = caFile || certFile ? { ca: caFile ? [read(caFile)] : undefined,
                                         cert: read(certFile), key: read(keyFile) } : true;
  }
  return options;
}

/**
 * The settings with every default filled in.
 * @param {Record<string, unknown> | undefined} raw `api.pluginConfig`
 * @param {Record<string, string | undefined>} [env] where the security settings default from
 * @returns {TallyConfig}
 */
export function resolveConfig(raw, env = process.env) {
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
    security: resolveSecurity(given, env),
    httpIdentity: merged.httpIdentity,
    operatorIdentity: merged.operatorIdentity,
    frontDoor: Object.freeze({ ...DEFAULTS.frontDoor, ...(given.frontDoor ?? {}),
                               jwt: jwtSettings(given.frontDoor?.jwt) }),
  });
}

/**
 * `frontDoor.jwt` with auth.yaml's defaults (algorithms HS256, user id claim "sub"), or
 * null when absent. No secret here: an HS* secret comes from the environment (jwt.js).
 * @param {Record<string, any> | undefined} given
 * @returns {import("./jwt.js").JwtSettings | null}
 */
export function jwtSettings(given) {
  if (!given) return null;
  return Object.freeze({
    algorithms: [...(given.algorithms ?? ["HS256"])].filter((a) => a.toLowerCase() !== "none"),
    publicKeyFile: given.publicKeyFile,
    audience: given.audience,
    issuer: given.issuer,
    userIdClaim: given.userIdClaim ?? "sub",
  });
}
