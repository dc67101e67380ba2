/**
 * Tally's UsageRecorded event from an `llm_output` hook. Pure.
 *
 * OpenClaw emits `llm_output` once per model attempt of a run, with the attempt's
 * usage. The event id is `openclaw:<runId>:<n>` (n counts the run's attempts), so a
 * repeated delivery of the same attempt carries the same id and Tally counts it once.
 */

/**
 * @typedef {object} UsageEvent Tally's UsageRecorded (src/tally/wire.py), as JSON.
 * @property {string} event_id
 * @property {string} occurred_at RFC 3339 with offset
 * @property {string} user_id
 * @property {string} model
 * @property {string | null} provider
 * @property {number} input_tokens
 * @property {number} output_tokens
 * @property {number} cache_read_tokens
 * @property {number} cache_write_tokens
 * @property {string | null} session_key
 * @property {string | null} channel
 * @property {string | null} request_id
 * @property {string} source
 */

/** @param {unknown} value */
function count(value) {
  const n = Number(value);
  return Number.isFinite(n) && n > 0 ? Math.floor(n) : 0;
}

/**
 * The event for one attempt, or null when it reports no tokens at all.
 * @param {object} p
 * @param {Record<string, any>} p.event the llm_output event
 * @param {Record<string, any>} [p.ctx] the hook context
 * @param {string} p.userId
 * @param {number} p.attempt 1 for the run's first llm_output, then 2, ...
 * @param {Date} p.now
 * @returns {UsageEvent | null}
 */
export function usageEvent({ event, ctx, userId, attempt, now }) {
  const usage = event.usage ?? {};
  const tokens = {
    input_tokens: count(usage.input),
    output_tokens: count(usage.output),
    cache_read_tokens: count(usage.cacheRead),
    cache_write_tokens: count(usage.cacheWrite),
  };
  if (Object.values(tokens).every((n) => n === 0)) return null;
  const runId = event.runId ?? ctx?.runId ?? "unknown-run";
  return {
    event_id: `openclaw:${runId}:${attempt}`,
    occurred_at: now.toISOString(),
    user_id: userId,
    model: String(event.model || "unknown"),
    provider: event.provider ?? null,
    ...tokens,
    session_key: ctx?.sessionKey ?? null,
    channel: ctx?.channel ?? ctx?.messageProvider ?? null,
    request_id: runId,
    source: "openclaw",
  };
}

/**
 * The tokens of an event that the budget counts.
 * @param {UsageEvent} event
 * @param {readonly string[]} fields budgets.yaml `counted_tokens`
 */
export function countedTokens(event, fields) {
  return fields.reduce((sum, field) => sum + count(/** @type {any} */ (event)[field]), 0);
}

/**
 * A bounded memory of runs: who a run belongs to and how many attempts it reported.
 * Runs are forgotten oldest first past `limit`.
 */
export class RunMemory {
  /** @param {number} [limit] */
  constructor(limit = 10_000) {
    this.limit = limit;
    /** @type {Map<string, {identity?: string, attempts: number, admitted?: boolean}>} */
    this.runs = new Map();
  }

  /** @param {string} runId */
  #entry(runId) {
    let entry = this.runs.get(runId);
    if (!entry) {
      entry = { attempts: 0 };
      this.runs.set(runId, entry);
      if (this.runs.size > this.limit) this.runs.delete(this.runs.keys().next().value);
    }
    return entry;
  }

  /** @param {string | undefined} runId @param {string} identity */
  remember(runId, identity) {
    if (runId) this.#entry(runId).identity = identity;
  }

  /** The run passed the budget check once already. @param {string | undefined} runId */
  admit(runId) {
    if (runId) this.#entry(runId).admitted = true;
  }

  /** @param {string | undefined} runId */
  admitted(runId) {
    return runId ? this.runs.get(runId)?.admitted === true : false;
  }

  /** @param {string | undefined} runId */
  identity(runId) {
    return runId ? this.runs.get(runId)?.identity : undefined;
  }

  /** The number of this attempt: 1, 2, ... @param {string | undefined} runId */
  nextAttempt(runId) {
    if (!runId) return 1;
    const entry = this.#entry(runId);
    entry.attempts += 1;
    return entry.attempts;
  }
}
