/**
 * Tally for OpenClaw: per-user token budgets, enforced inside the gateway.
 *
 * - llm_output: one usage event per model attempt to Tally's usage.raw topic.
 * - before_agent_reply: a hard stop answers with the budget message; no model call.
 * - before_model_resolve: reduced priority routes to the configured cheaper model.
 * - before_agent_run: a second gate for runs that skipped before_agent_reply.
 * - message_sending: warnings and the budget footer on channel deliveries.
 * - /tally/v1/*: the per-user front door (src/door.js), each caller by their own API key
 *   or JWT.
 *
 * OpenClaw calls register() several times per process (snapshots, reloads), so the
 * Kafka link and the budget view live once per process and settings, and register()
 * only attaches handlers to them.
 */

import { definePluginEntry } from "openclaw/plugin-sdk/plugin-entry";
import { resolveConfig } from "./src/config.js";
import { createFrontDoor } from "./src/door.js";
import { KafkaLink } from "./src/kafka.js";
import { createTally } from "./src/plugin.js";

const RUNTIMES = Symbol.for("tally.openclaw.runtimes");

/**
 * @typedef {object} Runtime
 * @property {ReturnType<typeof createTally>} tally
 * @property {KafkaLink} link
 * @property {ReturnType<typeof createFrontDoor>} door
 */

/** @returns {Map<string, Runtime>} */
function runtimes() {
  const holder = /** @type {any} */ (globalThis);
  holder[RUNTIMES] ??= new Map();
  return holder[RUNTIMES];
}

/**
 * The process's runtime for these settings, created on first use.
 * @param {import("./src/config.js").TallyConfig} config
 * @param {import("./src/plugin.js").Logger} logger
 * @param {() => import("./src/door.js").GatewayLink} gateway
 */
function runtimeFor(config, logger, gateway) {
  const key = JSON.stringify(config);
  let runtime = runtimes().get(key);
  if (!runtime) {
    /** @type {KafkaLink | null} */
    let link = null;
    const transport = { send: (/** @type {any} */ e) => link?.send(e) };
    const tally = createTally({ config, transport, logger });
    link = new KafkaLink({ config, book: tally.book, logger });
    const door = createFrontDoor({ tally, config, gateway, logger });
    runtime = { tally, link, door };
    runtimes().set(key, runtime);
  }
  return runtime;
}

export default definePluginEntry({
  id: "tally",
  name: "Tally",
  description: "Per-user token budgets: usage to Kafka, decisions enforced from memory",
  register(api) {
    const logger = {
      info: (/** @type {string} */ m) => api.logger?.info?.(m),
      warn: (/** @type {string} */ m) => api.logger?.warn?.(m),
    };
    const config = resolveConfig(api.pluginConfig);
    const { tally, link, door } = runtimeFor(config, logger, () => gatewayLink(api.config));
    for (const [name, handler] of Object.entries(tally.hooks)) {
      api.on(/** @type {any} */ (name), (event, ctx) => {
        link.ensureStarted(); // normally the service below has started it already
        return handler(event, ctx);
      });
    }
    if (config.frontDoor.enabled && typeof api.registerHttpRoute === "function") {
      for (const [path, handler] of Object.entries(door)) {
        api.registerHttpRoute({ path, auth: "plugin", match: "exact", handler: (req, res) => {
          link.ensureStarted();
          return handler(req, res);
        } });
      }
    }
    api.registerService({
      id: "tally-kafka",
      start: () => link.start(),
      stop: async () => {
        const s = tally.stats();
        logger.info(`tally: ${link.sent} usage events sent; hooks took ${s.meanMicros} µs ` +
                    `on average, ${s.maxMicros} µs at most, over ${s.calls} calls`);
        await link.stop();
      },
    });
  },
});

/**
 * The gateway's own core endpoint: this process, on its configured port, with the
 * operator token (gateway.auth.token, else OPENCLAW_GATEWAY_TOKEN) that callers never see.
 * @param {any} config openclaw.json
 * @returns {import("./src/door.js").GatewayLink}
 */
function gatewayLink(config) {
  const token = config?.gateway?.auth?.token;
  return { host: "127.0.0.1", port: Number(config?.gateway?.port ?? 18789),
           token: typeof token === "string" ? token : process.env.OPENCLAW_GATEWAY_TOKEN };
}
