/**
 * The front door's rules, pure: who the caller is, how big a call may be, and how the
 * budget is shown to an HTTP client (status, headers, error body, appended text).
 *
 * Identity comes from the caller's own credential only, checked as Tally's ingest checks
 * it (src/tally/auth.py): an API key from users.yaml, or a JWT when `frontDoor.jwt` is
 * configured (jwt.js). The plugin never holds a key: each decision on budget.decisions
 * lists `key_digests`, SHA-256 over a fixed label and the key (Tally's `api_key_digest`,
 * src/tally/identity.py), and the door compares the digest of the key it is shown. Keys
 * are long random strings, so a digest gives nothing away.
 */

import { createHash } from "node:crypto";
import { JwtError, looksLikeJwt, subjectOf, verifyJwt } from "./jwt.js";

const DIGEST_LABEL = "tally.api_key.v1\u0000";

/** Tally's api_key_digest(). @param {string} key */
export function keyDigest(key) {
  return "sha256:" + createHash("sha256").update(DIGEST_LABEL + key, "utf8").digest("hex");
}

/**
 * The credential a request presents: `X-API-Key` (an API key), else `Authorization: Bearer
 * <token>` (a JWT or an API key), else null.
 * @param {Record<string, string | string[] | undefined>} headers lower-case names
 * @returns {{bearer: boolean, value: string} | null}
 */
export function presentedCredential(headers) {
  const one = (/** @type {string | string[] | undefined} */ v) => (Array.isArray(v) ? v[0] : v);
  const apiKey = one(headers["x-api-key"])?.trim();
  if (apiKey) return { bearer: false, value: apiKey };
  const found = /^Bearer\s+(\S+)\s*$/i.exec(one(headers.authorization) ?? "");
  return found ? { bearer: true, value: found[1] } : null;
}

/**
 * The API key or token a request presents, or null.
 * @param {Record<string, string | string[] | undefined>} headers lower-case names
 */
export function presentedKey(headers) {
  return presentedCredential(headers)?.value ?? null;
}

/**
 * @typedef {object} JwtCheck what verifies tokens at the door
 * @property {import("./jwt.js").JwtSettings} settings
 * @property {import("node:crypto").KeyObject | null} key null: configured, but the key
 *   could not be loaded (every token is refused)
 */

/**
 * Who the request's credential names, as Tally's Authenticator does: a Bearer value with
 * the three parts of a JWT is a token when JWTs are configured, anything else an API key.
 * A token's user id claim is resolved as the ingest resolves a name (`book.resolve`).
 * @param {Record<string, string | string[] | undefined>} headers
 * @param {import("./budget.js").BudgetBook} book
 * @param {JwtCheck | null} jwt
 * @param {number} nowMs
 * @returns {{user: string} | {code: string, message: string}}
 */
export function callerOf(headers, book, jwt, nowMs) {
  const credential = presentedCredential(headers);
  if (!credential) {
    return { code: "invalid_api_key",
             message: "No API key provided: send Authorization: Bearer <your Tally API key>." };
  }
  if (jwt && credential.bearer && looksLikeJwt(credential.value)) {
    if (!jwt.key) return { code: "invalid_token", message: "JWTs cannot be checked here." };
    try {
      const claims = verifyJwt(credential.value, jwt.settings, jwt.key, nowMs);
      return { user: book.resolve(subjectOf(claims, jwt.settings.userIdClaim)) };
    } catch (error) {
      if (!(error instanceof JwtError)) throw error;
      return { code: "invalid_token", message: `Invalid token: ${error.message}.` };
    }
  }
  const user = book.userOfKey(keyDigest(credential.value));
  return user ? { user } : { code: "invalid_api_key", message: "Incorrect API key provided." };
}

/**
 * A call's worst case in tokens: its output cap (or `defaultOutput`) plus its prompt,
 * estimated at one token per 4 characters of the messages (rounded up) plus `overhead`
 * for what the gateway adds (system prompt, tools).
 * @param {Record<string, any>} body @param {{defaultOutput: number, overhead: number}} sizes
 */
export function worstCase(body, { defaultOutput, overhead }) {
  const cap = Number(body?.max_completion_tokens ?? body?.max_tokens);
  const output = Number.isSafeInteger(cap) && cap > 0 ? cap : defaultOutput;
  const prompt = Math.ceil(JSON.stringify(body?.messages ?? []).length / 4);
  return output + prompt + overhead;
}

/**
 * Seconds from `nowMs` until `resetTime`, rounded up, never below 0.
 * @param {string} resetTime @param {number} nowMs
 */
export function secondsUntil(resetTime, nowMs) {
  const at = Date.parse(resetTime);
  return Number.isFinite(at) ? Math.max(0, Math.ceil((at - nowMs) / 1000)) : 0;
}

/**
 * x-ratelimit-* headers for the period that drives the decision.
 * @param {{period: {tokens_limit: number, reset_time: string}, left: number} | null} room
 * @param {number} nowMs
 * @returns {Record<string, string>}
 */
export function rateHeaders(room, nowMs) {
  if (!room) return {};
  return {
    "x-ratelimit-limit-tokens": String(room.period.tokens_limit),
    "x-ratelimit-remaining-tokens": String(Math.max(0, room.left)),
    "x-ratelimit-reset-tokens": `${secondsUntil(room.period.reset_time, nowMs)}s`,
  };
}

/**
 * The OpenAI-style error body.
 * @param {string} type @param {string} code @param {string} message
 */
export function errorBody(type, code, message) {
  return { error: { type, code, message } };
}

/**
 * A non-streaming answer with `extra` appended to the first choice's message.
 * @param {Record<string, any>} answer @param {string} extra
 */
export function withAppended(answer, extra) {
  const choice = answer?.choices?.[0];
  if (!extra || typeof choice?.message?.content !== "string") return answer;
  const message = { ...choice.message, content: `${choice.message.content}\n\n${extra}` };
  return { ...answer, choices: [{ ...choice, message }, ...answer.choices.slice(1)] };
}

/**
 * Rewrites an SSE stream of chat.completion.chunk events line by line: one extra
 * `delta.content` chunk carrying `extra` goes before the first chunk with a
 * finish_reason (or before `data: [DONE]` when none came). Feed it text, it returns text.
 * @param {string} extra
 */
export function streamAppender(extra) {
  let pending = "";
  let added = !extra;
  /** @param {Record<string, any>} like */
  const chunk = (like) => `data: ${JSON.stringify({
    id: like.id, object: "chat.completion.chunk", created: like.created, model: like.model,
    choices: [{ index: 0, delta: { content: `\n\n${extra}` }, finish_reason: null }],
  })}\n\n`;
  /** @type {Record<string, any>} */
  let last = {};
  /** @param {string} line */
  function line(line) {
    if (added || !line.startsWith("data: ")) return `${line}\n`;
    if (line.trim() === "data: [DONE]") {
      added = true;
      return `${chunk(last)}${line}\n`;
    }
    try {
      const event = JSON.parse(line.slice(6));
      last = event;
      if (event?.choices?.some((/** @type {any} */ c) => c?.finish_reason)) {
        added = true;
        return `${chunk(event)}${line}\n`;
      }
    } catch {
      // not JSON: passed through as it came
    }
    return `${line}\n`;
  }
  return {
    /** @param {string} text */
    push(text) {
      pending += text;
      const cut = pending.lastIndexOf("\n");
      if (cut < 0) return "";
      const whole = pending.slice(0, cut);
      pending = pending.slice(cut + 1);
      return whole.split("\n").map(line).join("");
    },
    end() {
      const rest = pending ? line(pending) : "";
      pending = "";
      return rest;
    },
  };
}

/**
 * What /tally/v1/budget answers: the shape of Tally's /api/budgets/me.
 * @param {import("./budget.js").Decision} d
 */
export function budgetRow(d) {
  const { key_digests: _hidden, ...decision } = /** @type {any} */ (d);
  return {
    user_id: d.user_id,
    daily_used: d.daily?.tokens_used,
    daily_limit: d.daily?.tokens_limit,
    daily_remaining: /** @type {any} */ (d.daily)?.tokens_remaining,
    monthly_used: d.monthly?.tokens_used,
    monthly_limit: d.monthly?.tokens_limit,
    ...(d.weekly ? { weekly_used: d.weekly.tokens_used, weekly_limit: d.weekly.tokens_limit,
                     weekly_remaining: /** @type {any} */ (d.weekly).tokens_remaining } : {}),
    status: /** @type {any} */ (d).status,
    decision,
  };
}
