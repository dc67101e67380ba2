/**
 * Tally for OpenClaw: per-user token budgets, enforced inside the gateway.
 *
 * - llm_output: one usage event per model attempt to Tally's usage.raw topic.
 * - before_agent_reply: a hard stop answers with the budget message; no model call.
 * - before_model_resolve: reduced priority routes to the configured cheaper model.
 * - before_agent_run: a second gate for runs that skipped before_agent_reply.
 * - message_sending: warnings and the budget footer on channel deliveries.
 *
 * OpenClaw calls register() several times per process (snapshots, reloads), so the
 * Kafka link and the budget view live once per process and settings, and register()
 * only attaches handlers to them.
 */

import { definePluginEntry } from "openclaw/plugin-sdk/plugin-entry";
import { resolveConfig } from "./src/config.js";
import { KafkaLink } from "./src/kafka.js";
import { createTally } from "./src/plugin.js";

const RUNTIMES = Symbol.for("tally.openclaw.runtimes");

/** @returns {Map<string, {tally: ReturnType<typeof createTally>, link: KafkaLink}>} */
function runtimes() {
  const holder = /** @type {any} */ (globalThis);
  holder[RUNTIMES] ??= new Map();
  return holder[RUNTIMES];
}

/**
 * The process's runtime for these settings, created on first use.
 * @param {import("./src/config.js").TallyConfig} config
 * @param {import("./src/plugin.js").Logger} logger
 */
function runtimeFor(config, logger) {
  const key = JSON.stringify(config);
  let runtime = runtimes().get(key);
  if (!runtime) {
    /** @type {KafkaLink | null} */
    let link = null;
    const transport = { send: (/** @type {any} */ e) => link?.send(e) };
    const tally = createTally({ config, transport, logger });
    link = new KafkaLink({ config, book: tally.book, logger });
    runtime = { tally, link };
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
    const { tally, link } = runtimeFor(resolveConfig(api.pluginConfig), logger);
    for (const [name, handler] of Object.entries(tally.hooks)) {
      api.on(/** @type {any} */ (name), (event, ctx) => {
        link.ensureStarted(); // normally the service below has started it already
        return handler(event, ctx);
      });
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
