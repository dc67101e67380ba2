/**
 * The gateway's view of every user's budget: the latest decision from
 * budget.decisions plus the tokens of calls made since. Pure: time is an argument,
 * no I/O, nothing here throws on odd input.
 *
 * A decision takes a round trip through Kafka (usage.raw -> ingest -> projector ->
 * enforcer -> budget.decisions). Until the decision that counts a call arrives, the
 * call's tokens are kept as *pending* and added to the decision's figures, so a user
 * who crosses a limit is stopped at the next call, not a round trip later. A pending
 * call is dropped once a decision counts it (its daily total reached what it expected),
 * once its day is over, or after `pendingTtlMs`.
 */

import { normaliseIdentity } from "./identity.js";
import { periodValues, render } from "./templates.js";

/**
 * @typedef {object} Period Tally's PeriodStatus (the fields used here).
 * @property {string} period
 * @property {string} [period_start]
 * @property {number} tokens_used
 * @property {number} tokens_limit
 * @property {string} reset_time
 */

/**
 * @typedef {object} Decision Tally's BudgetDecided (the fields used here).
 * @property {string} user_id
 * @property {string} action allow | warn | soft_limit | hard_stop | reduced_priority
 * @property {string} period
 * @property {number} tokens_used
 * @property {number} tokens_limit
 * @property {string} reset_time
 * @property {string | null} [message]
 * @property {string | null} [footer]
 * @property {string | null} [force_model]
 * @property {Period} [daily]
 * @property {Period | null} [weekly] only where the user has a weekly limit
 * @property {Period} [monthly]
 * @property {string[]} [identities] gateway identities the user claims, when published
 * @property {string[]} [key_digests] digests of the user's API keys (the front door's check)
 * @property {number | null} [status_code] the hard stop's HTTP status
 */

/**
 * @typedef {object} Verdict
 * @property {string} action what the gateway does now
 * @property {string | null} message
 * @property {string | null} footer
 * @property {string | null} forceModel "provider/model"
 * @property {"decision"|"local"|"unavailable"|"unknown-user"|"expired"|"anonymous"} basis
 */

/** @typedef {{tokens: number, at: number, expect: number}} Pending */

/** @typedef {{user: string, tokens: number, at: number}} Reservation */

/**
 * @typedef {object} BookOptions
 * @property {boolean} failOpen
 * @property {"hard_stop"|"none"} localLimitAction
 * @property {string} localLimitMessage
 * @property {string} unavailableMessage
 * @property {number} pendingTtlMs
 * @property {number} [reservationTtlMs] a front-door reservation not settled by then is released
 */

const UNDER_LIMIT = new Set(["allow", "warn"]);
/** Tally's period kinds (tally.core.periods.PERIODS): the decision's per-period keys. */
export const PERIODS = ["daily", "weekly", "monthly"];

/**
 * The user's own periods the decision states, shortest first.
 * @param {Decision} d @returns {Period[]}
 */
export function periodsOf(d) {
  const found = PERIODS.map((kind) => /** @type {any} */ (d)[kind]);
  return found.filter((p) => p);
}

/** @param {string | undefined} iso */
function timeOf(iso) {
  const t = iso ? Date.parse(iso) : NaN;
  return Number.isFinite(t) ? t : NaN;
}

/** @param {Decision} d */
function drivingPeriod(d) {
  return { period: d.period, tokens_used: d.tokens_used, tokens_limit: d.tokens_limit,
           reset_time: d.reset_time };
}

export class BudgetBook {
  /** @param {BookOptions} options */
  constructor(options) {
    this.options = options;
    this.ready = false;
    /** @type {Map<string, Decision>} */
    this.decisions = new Map();
    /** @type {Map<string, string>} normalised identity -> user id */
    this.owners = new Map();
    /** @type {Map<string, string[]>} user id -> the identities its decision lists */
    this.claimed = new Map();
    /** @type {Map<string, Pending[]>} normalised identity -> calls not yet in a decision */
    this.pending = new Map();
    /** @type {Map<string, string>} API key digest -> user id */
    this.keyOwners = new Map();
    /** @type {Map<string, string[]>} user id -> the key digests its decision lists */
    this.keysOf = new Map();
    /** @type {Map<string, Reservation>} id -> a front-door call's worst case, not yet settled */
    this.reservations = new Map();
    this.nextReservation = 0;
  }

  /** The user whose API key has this digest, or null. @param {string} digest */
  userOfKey(digest) {
    return this.keyOwners.get(digest) ?? null;
  }

  /** The latest decision for a users.yaml id. @param {string} userId */
  decisionOf(userId) {
    return this.decisions.get(userId) ?? null;
  }

  /**
   * Hold a call's worst case against its user until settled; returns the reservation id.
   * @param {string} userId @param {number} tokens @param {number} nowMs
   */
  reserve(userId, tokens, nowMs) {
    const id = `r${++this.nextReservation}`;
    this.reservations.set(id, { user: userId, tokens: Math.max(0, tokens), at: nowMs });
    return id;
  }

  /** The call is over (its real usage counted, or it never reached the model). @param {string} id */
  release(id) {
    this.reservations.delete(id);
  }

  /** Tokens held by live reservations of this user. @param {string} userId @param {number} nowMs */
  reservedTokens(userId, nowMs) {
    const oldest = nowMs - (this.options.reservationTtlMs ?? 300_000);
    let sum = 0;
    for (const [id, r] of this.reservations) {
      if (r.at < oldest) this.reservations.delete(id);
      else if (r.user === userId) sum += r.tokens;
    }
    return sum;
  }

  /**
   * What is left of the tightest period for this user now: the decision's figures less
   * pending and reserved tokens (negative past the limit), with that period. Null without
   * a decision.
   * @param {string} userId @param {number} nowMs
   */
  headroom(userId, nowMs) {
    const d = this.decisions.get(userId);
    if (!d) return null;
    const held = this.pendingTokens(userId, nowMs) + this.reservedTokens(userId, nowMs);
    const periods = periodsOf(d);
    const tightest = (periods.length ? periods : [drivingPeriod(d)])
      .map((p) => ({ period: p, left: p.tokens_limit - p.tokens_used - held }))
      .reduce((a, b) => (b.left < a.left ? b : a));
    return tightest;
  }

  /** budget.decisions has been read up to its end once. */
  markReady() {
    this.ready = true;
  }

  /** The user id Tally records this identity under. @param {string} identity */
  userOf(identity) {
    const normal = normaliseIdentity(identity);
    return this.owners.get(normal) ?? normal;
  }

  /**
   * The users.yaml id behind a name, as Tally's Directory.resolve: a user id (one with a
   * decision) as it is, else the user whose decision claims it, else the name normalised.
   * @param {string} identity
   */
  resolve(identity) {
    return this.decisions.has(identity) ? identity : this.userOf(identity);
  }

  /**
   * One record of budget.decisions: a decision, or null for a tombstone.
   * @param {string} userId the record key
   * @param {Decision | null} decision
   */
  applyDecision(userId, decision) {
    for (const identity of this.claimed.get(userId) ?? []) {
      if (this.owners.get(identity) === userId) this.owners.delete(identity); // not if moved
    }
    this.claimed.delete(userId);
    for (const digest of this.keysOf.get(userId) ?? []) {
      if (this.keyOwners.get(digest) === userId) this.keyOwners.delete(digest);
    }
    this.keysOf.delete(userId);
    if (!decision) {
      this.decisions.delete(userId);
      return;
    }
    this.decisions.set(userId, decision);
    const identities = (Array.isArray(decision.identities) ? decision.identities : [])
      .map((identity) => normaliseIdentity(String(identity)));
    for (const identity of identities) this.owners.set(identity, userId);
    if (identities.length) this.claimed.set(userId, identities);
    const digests = (Array.isArray(decision.key_digests) ? decision.key_digests : []).map(String);
    for (const digest of digests) this.keyOwners.set(digest, userId);
    if (digests.length) this.keysOf.set(userId, digests);
    this.#settle(userId, decision);
  }

  /** Drop the pending calls this decision counts. @param {string} userId @param {Decision} d */
  #settle(userId, d) {
    const start = timeOf(d.daily?.period_start);
    const used = d.daily?.tokens_used ?? d.tokens_used;
    for (const identity of this.#identitiesOf(userId)) {
      const kept = (this.pending.get(identity) ?? [])
        .filter((p) => p.expect > used && !(p.at < start));
      this.#setPending(identity, kept);
    }
  }

  /** @param {string} identity @param {Pending[]} list */
  #setPending(identity, list) {
    if (list.length) this.pending.set(identity, list);
    else this.pending.delete(identity);
  }

  /** The identities with pending calls that belong to `userId`. @param {string} userId */
  #identitiesOf(userId) {
    const names = new Set([userId, ...(this.claimed.get(userId) ?? [])]);
    return [...names].filter((identity) => this.pending.has(identity));
  }

  /**
   * A call's counted tokens, reported by this gateway.
   * @param {string} identity @param {number} tokens @param {number} nowMs
   */
  addUsage(identity, tokens, nowMs) {
    if (!(tokens > 0)) return;
    const d = this.decisions.get(this.userOf(identity));
    const base = d?.daily?.tokens_used ?? d?.tokens_used ?? 0;
    const expect = base + this.pendingTokens(identity, nowMs) + tokens;
    const key = normaliseIdentity(identity);
    this.pending.set(key, [...(this.pending.get(key) ?? []), { tokens, at: nowMs, expect }]);
  }

  /**
   * Tokens reported here that no decision counts yet, for the user behind `identity`.
   * @param {string} identity @param {number} nowMs
   */
  pendingTokens(identity, nowMs) {
    const user = this.userOf(identity);
    const oldest = nowMs - this.options.pendingTtlMs;
    let sum = 0;
    for (const key of this.#identitiesOf(user)) {
      const live = (this.pending.get(key) ?? []).filter((p) => p.at >= oldest);
      this.#setPending(key, live);
      sum += live.reduce((s, p) => s + p.tokens, 0);
    }
    return sum;
  }

  /**
   * What to do for a call by `identity` now.
   * @param {string} identity @param {number} nowMs
   * @returns {Verdict}
   */
  verdict(identity, nowMs) {
    const d = this.decisions.get(this.userOf(identity));
    if (!d) return this.#withoutDecision();
    if (d.action === "hard_stop") {
      return nowMs >= timeOf(d.reset_time)
        ? verdictOf("allow", null, "expired")
        : verdictOf("hard_stop", d.message ?? this.#localMessage(drivingPeriod(d)), "decision");
    }
    const local = this.#localStop(d, this.pendingTokens(identity, nowMs));
    if (local) return local;
    return { action: d.action, message: d.message ?? null, footer: d.footer ?? null,
             forceModel: d.force_model ?? null, basis: "decision" };
  }

  #withoutDecision() {
    if (!this.ready && !this.options.failOpen) {
      return verdictOf("hard_stop", this.options.unavailableMessage, "unavailable");
    }
    return verdictOf("allow", null, "unknown-user");
  }

  /**
   * A stop predicted from the pending calls, for a user the decision still has under the
   * limit. Past the limit the decision already carries the policy's own action.
   * @param {Decision} d @param {number} pending
   */
  #localStop(d, pending) {
    if (pending <= 0 || this.options.localLimitAction !== "hard_stop") return null;
    if (!UNDER_LIMIT.has(d.action)) return null;
    for (const period of [...periodsOf(d), drivingPeriod(d)]) {
      const used = period.tokens_used + pending;
      if (used >= period.tokens_limit) {
        return verdictOf("hard_stop", this.#localMessage({ ...period, tokens_used: used }),
                         "local");
      }
    }
    return null;
  }

  /** @param {Period} period */
  #localMessage(period) {
    return render(this.options.localLimitMessage, periodValues(period));
  }
}

/**
 * @param {string} action @param {string | null} message @param {Verdict["basis"]} basis
 * @returns {Verdict}
 */
function verdictOf(action, message, basis) {
  return { action, message, footer: null, forceModel: null, basis };
}

/**
 * before_model_resolve's result for a forced "provider/model": the provider and the model
 * apart (a combined string in modelOverride would reach the provider as is). A bare model
 * id keeps the provider; an empty value gives null.
 * @param {string | null | undefined} forceModel
 * @returns {{providerOverride?: string, modelOverride: string} | null}
 */
export function modelOverride(forceModel) {
  const value = (forceModel ?? "").trim();
  const at = value.indexOf("/");
  if (!value || at === value.length - 1) return null;
  if (at <= 0) return { modelOverride: value.replace(/^\//, "") };
  return { providerOverride: value.slice(0, at), modelOverride: value.slice(at + 1) };
}

/**
 * The shape the plugin relies on: an object for this user with a known action.
 * @param {unknown} value @param {string} user
 */
export function isDecision(value, user) {
  if (typeof value !== "object" || value === null || Array.isArray(value)) return false;
  const d = /** @type {Record<string, unknown>} */ (value);
  return d.user_id === user && typeof d.action === "string" && ACTIONS.has(d.action)
    && Number.isSafeInteger(d.tokens_used) && Number.isSafeInteger(d.tokens_limit);
}

const ACTIONS = new Set(["allow", "warn", "soft_limit", "hard_stop", "reduced_priority"]);
