/**
 * The hook handlers: identity, enforcement and usage, answered from memory.
 *
 * OpenClaw fails closed when a gating hook throws or times out, so every handler here
 * is synchronous, touches no network, and catches everything: a bug in Tally must not
 * stop a person's chat. Usage goes to a `transport` whose `send` only queues.
 *
 * Hook order seen on openclaw 2026.9.6 for one chat: before_agent_reply,
 * before_model_resolve, before_agent_run, (model call), agent_end, llm_output;
 * message_sending only on channel deliveries.
 */

import { BudgetBook, modelOverride } from "./budget.js";
import { anonymousSession, coreSession, doorSession, factsOf, identityOf } from "./identity.js";
import { RunMemory, countedTokens, usageEvent } from "./usage.js";

/**
 * @typedef {object} Transport
 * @property {(event: import("./usage.js").UsageEvent) => void} send queue one event; never throws
 */

/**
 * @typedef {object} Logger
 * @property {(msg: string) => void} info
 * @property {(msg: string) => void} warn
 */

/** Time spent inside the handlers, to show the plugin adds next to nothing. */
class HookTimer {
  constructor() {
    this.calls = 0;
    this.totalNs = 0n;
    this.maxNs = 0n;
  }

  /** @param {bigint} ns */
  add(ns) {
    this.calls += 1;
    this.totalNs += ns;
    if (ns > this.maxNs) this.maxNs = ns;
  }

  summary() {
    const mean = this.calls ? Number(this.totalNs / BigInt(this.calls)) / 1000 : 0;
    return { calls: this.calls, meanMicros: Math.round(mean * 10) / 10,
             maxMicros: Math.round(Number(this.maxNs) / 100) / 10 };
  }
}

/**
 * A bounded map, oldest entry out first.
 * @template V
 * @extends {Map<string, V>}
 */
class Recent extends Map {
  /** @param {number} limit */
  constructor(limit) {
    super();
    this.limit = limit;
  }

  /** @param {string} key @param {V} value */
  set(key, value) {
    super.delete(key);
    super.set(key, value);
    if (this.size > this.limit) super.delete(this.keys().next().value);
    return this;
  }
}

/**
 * @param {object} p
 * @param {import("./config.js").TallyConfig} p.config
 * @param {Transport} p.transport
 * @param {Logger} p.logger
 * @param {() => number} [p.clock] epoch milliseconds
 */
export function createTally({ config, transport, logger, clock = Date.now }) {
  const book = new BudgetBook({
    failOpen: config.failOpen,
    localLimitAction: config.localLimitAction,
    localLimitMessage: config.localLimitMessage,
    unavailableMessage: config.unavailableMessage,
    pendingTtlMs: config.pendingTtlSeconds * 1000,
    reservationTtlMs: config.frontDoor.reservationTimeoutSeconds * 1000,
  });
  const runs = new RunMemory();
  /** @type {Recent<string>} */
  const sessions = new Recent(10_000);
  const timer = new HookTimer();
  const seen = new WeakSet();
  /** @type {Recent<{userId: string, reservation: string}>} front-door call -> its caller */
  const doors = new Recent(10_000);

  /** The front-door call a session belongs to, if any. @param {string | undefined} key */
  function doorOf(key) {
    const id = doorSession(key);
    return id ? doors.get(id) ?? null : null;
  }

  /** Who the run or session belongs to; remembered for the hooks that follow. */
  function caller(/** @type {any} */ ctx, /** @type {any} */ event) {
    const identity = identityFor(ctx, event);
    runs.remember(ctx?.runId, identity);
    if (ctx?.sessionKey) sessions.set(ctx.sessionKey, identity);
    return identity;
  }

  /** A front-door call counts under its key's owner; "operator" puts the core endpoint's
   * calls under one name; otherwise the channel sender, the run's earlier identity, or the
   * session's. */
  function identityFor(/** @type {any} */ ctx, /** @type {any} */ event) {
    const door = doorOf(ctx?.sessionKey);
    if (door) return door.userId;
    if (config.httpIdentity === "operator" && coreSession(ctx?.sessionKey)) {
      return config.operatorIdentity;
    }
    const facts = factsOf(ctx, event);
    if (facts.senderId) return identityOf(facts, config.identityPrefix);
    return runs.identity(ctx?.runId) ?? identityOf(facts, config.identityPrefix);
  }

  function verdictFor(/** @type {any} */ ctx, /** @type {any} */ event) {
    const identity = caller(ctx, event);
    if (config.httpIdentity === "refuse-anonymous" && anonymousSession(ctx?.sessionKey)) {
      return { action: "hard_stop", message: config.unavailableMessage, footer: null,
               forceModel: null, basis: /** @type {const} */ ("anonymous") };
    }
    return book.verdict(identity, clock());
  }

  const handlers = {
    before_agent_reply(/** @type {any} */ _event, /** @type {any} */ ctx) {
      const verdict = verdictFor(ctx);
      if (verdict.action !== "hard_stop") {
        runs.admit(ctx?.runId);
        return undefined;
      }
      return { handled: true, reply: { text: verdict.message ?? "" },
               reason: `tally:${verdict.basis}` };
    },

    before_model_resolve(/** @type {any} */ _event, /** @type {any} */ ctx) {
      const verdict = verdictFor(ctx);
      if (verdict.action !== "reduced_priority") return undefined;
      return modelOverride(verdict.forceModel) ?? undefined;
    },

    // Only for runs that did not come through before_agent_reply (e.g. cron, heartbeat):
    // a run admitted there is let finish, since a block here reaches an HTTP client as a
    // bare 500 "internal error", not as the budget message.
    before_agent_run(/** @type {any} */ event, /** @type {any} */ ctx) {
      const verdict = verdictFor(ctx, event);
      if (runs.admitted(ctx?.runId) || verdict.action !== "hard_stop") return undefined;
      return { outcome: "block", reason: `tally:${verdict.basis}`,
               message: verdict.message ?? undefined };
    },

    llm_output(/** @type {any} */ event, /** @type {any} */ ctx) {
      if (!event || seen.has(event)) return undefined; // one attempt, told twice
      seen.add(event);
      const runId = event.runId ?? ctx?.runId;
      const identity = caller({ ...ctx, runId });
      const usage = usageEvent({ event, ctx, userId: identity,
                                 attempt: runs.nextAttempt(runId), now: new Date(clock()) });
      if (!usage) return undefined;
      book.addUsage(identity, countedTokens(usage, config.countedTokens), clock());
      const door = doorOf(ctx?.sessionKey);
      if (door) book.release(door.reservation); // the real usage now counts instead
      transport.send(usage);
      return undefined;
    },

    message_sending(/** @type {any} */ event, /** @type {any} */ ctx) {
      if (!config.appendFooter || typeof event?.content !== "string") return undefined;
      const identity = ctx?.senderId
        ? identityOf({ channel: ctx.channelId, senderId: ctx.senderId }, config.identityPrefix)
        : sessions.get(ctx?.sessionKey);
      if (!identity) return undefined;
      const extra = notices(book.verdict(identity, clock()));
      return extra ? { content: `${event.content}\n\n${extra}` } : undefined;
    },
  };

  return {
    book,
    doors,
    stats: () => timer.summary(),
    /** Each handler timed, and never throwing. */
    hooks: Object.fromEntries(Object.entries(handlers).map(([name, handler]) => [name,
      (/** @type {any} */ event, /** @type {any} */ ctx) => {
        const started = process.hrtime.bigint();
        try {
          return handler(event, ctx);
        } catch (error) {
          logger.warn(`tally: ${name} failed, letting the call through: ${String(error)}`);
          return undefined;
        } finally {
          timer.add(process.hrtime.bigint() - started);
        }
      }])),
  };
}

/**
 * The text added to a channel reply: the warning or limit message, then the footer.
 * @param {import("./budget.js").Verdict} verdict
 */
export function notices(verdict) {
  const shown = ["warn", "soft_limit", "reduced_priority"].includes(verdict.action);
  const parts = [shown ? verdict.message : null, verdict.footer]
    .filter((p) => typeof p === "string" && p.trim())
    .map((p) => /** @type {string} */ (p).trim());
  return parts.join("\n\n");
}
