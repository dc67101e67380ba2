/**
 * Tally's front door on the gateway's own port (routes registered with auth "plugin", so
 * the gateway token is neither needed nor accepted from callers):
 *
 *   POST /tally/v1/chat/completions  the core endpoint, as the caller, within their budget
 *   GET  /tally/v1/models            the core endpoint's model list
 *   GET  /tally/v1/budget            the caller's own figures (Tally's /api/budgets/me shape)
 *
 * The caller's API key or JWT names them (frontdoor.js); whatever `user` the body says is
 * replaced. A chat is admitted against the user's headroom with its worst case reserved,
 * then forwarded to the gateway's /v1/chat/completions with the gateway token and a
 * session of its own ("tally-door:<uuid>": OpenClaw runs one call at a time per session,
 * so one person's concurrent calls each get one). The hooks count the run under the key's
 * owner through that session; llm_output settles the reservation with the real usage.
 */

import { randomUUID } from "node:crypto";
import http from "node:http";
import { DOOR_SESSION } from "./identity.js";
import { notices } from "./plugin.js";
import { periodValues, render } from "./templates.js";
import {
  budgetRow, callerOf, errorBody, rateHeaders, secondsUntil, streamAppender, withAppended,
  worstCase,
} from "./frontdoor.js";
import { loadKey } from "./jwt.js";

export const DOOR_PATHS = Object.freeze({
  chat: "/tally/v1/chat/completions",
  models: "/tally/v1/models",
  budget: "/tally/v1/budget",
});

const MAX_BODY = 8 * 1024 * 1024;

/**
 * The agent a `model` of "openclaw/<agent>" names; "main" (OpenClaw's default agent id)
 * otherwise. The session key must name its agent when several are configured.
 * @param {unknown} model
 */
export function agentOf(model) {
  const found = /^openclaw\/([A-Za-z0-9_-]+)$/.exec(String(model ?? ""));
  return found ? found[1] : "main";
}

/**
 * @typedef {object} GatewayLink where the core endpoint is, and the operator token for it
 * @property {string} host
 * @property {number} port
 * @property {string | undefined} token
 */

/**
 * @param {object} p
 * @param {ReturnType<typeof import("./plugin.js").createTally>} p.tally
 * @param {import("./config.js").TallyConfig} p.config
 * @param {() => GatewayLink} p.gateway
 * @param {import("./plugin.js").Logger} p.logger
 * @param {() => number} [p.clock]
 * @param {Record<string, string | undefined>} [p.env] where an HS* JWT secret comes from
 */
export function createFrontDoor({ tally, config, gateway, logger, clock = Date.now,
                                  env = process.env }) {
  const { book } = tally;
  const jwt = jwtCheck(config.frontDoor.jwt, env, logger);

  /** @param {import("node:http").ServerResponse} res @param {number} status @param {any} body */
  function send(res, status, body, headers = {}) {
    res.writeHead(status, { "content-type": "application/json; charset=utf-8",
                            "cache-control": "no-store", ...headers });
    res.end(JSON.stringify(body));
  }

  /** The caller's users.yaml id, or null after answering 401. */
  function authenticate(/** @type {import("node:http").IncomingMessage} */ req,
                        /** @type {import("node:http").ServerResponse} */ res) {
    const found = callerOf(req.headers, book, jwt, clock());
    if ("user" in found) return found.user;
    send(res, 401, errorBody("invalid_request_error", found.code, found.message),
         { "www-authenticate": "Bearer" });
    return null;
  }

  /** @param {string} userId @param {number} now */
  function headers(userId, now) {
    return rateHeaders(book.headroom(userId, now), now);
  }

  /**
   * The answer for a call that may not go ahead now, or null to admit it.
   * @param {string} userId @param {import("./budget.js").Verdict} verdict @param {number} now
   */
  function refusal(userId, verdict, now) {
    if (verdict.basis === "unavailable") {
      return { status: 503, retryAfter: 5,
               body: errorBody("service_unavailable", "budget_unavailable", verdict.message ?? "") };
    }
    const room = book.headroom(userId, now);
    const stopped = verdict.action === "hard_stop";
    // A call is admitted while any headroom is left after the calls already reserved, so
    // N calls at once overshoot a hard limit by at most one call's worth.
    const full = !stopped && room !== null && room.left <= 0
      && config.localLimitAction === "hard_stop" && ["allow", "warn"].includes(verdict.action);
    if (!stopped && !full) return null;
    const d = book.decisionOf(userId);
    const reset = room?.period.reset_time ?? d?.reset_time ?? "";
    const message = stopped || !room ? verdict.message ?? "" : render(config.localLimitMessage,
      periodValues({ ...room.period, tokens_used: room.period.tokens_limit - room.left }));
    return { status: (stopped && d?.status_code) || 429, retryAfter: secondsUntil(reset, now),
             body: errorBody("rate_limit_error", "budget_exceeded", message) };
  }

  /**
   * Forward one request to the gateway's core endpoint as the operator.
   * @param {string} method @param {string} path @param {Record<string, string>} extra
   * @param {string | null} body
   * @returns {Promise<import("node:http").IncomingMessage>}
   */
  function forward(method, path, extra, body) {
    const { host, port, token } = gateway();
    return new Promise((resolve, reject) => {
      const req = http.request({ host, port, path, method, headers: {
        ...(token ? { authorization: `Bearer ${token}` } : {}),
        ...(body !== null ? { "content-type": "application/json",
                              "content-length": Buffer.byteLength(body) } : {}),
        ...extra,
      } }, resolve);
      req.on("error", reject);
      req.end(body ?? undefined);
    });
  }

  /** @param {import("node:http").IncomingMessage} req @returns {Promise<string>} */
  async function readBody(req) {
    const parts = [];
    let size = 0;
    for await (const part of req) {
      size += part.length;
      if (size > MAX_BODY) throw new RangeError("request body too large");
      parts.push(part);
    }
    return Buffer.concat(parts).toString("utf8");
  }

  /** @param {import("node:http").IncomingMessage} upstream */
  async function text(upstream) {
    const parts = [];
    for await (const part of upstream) parts.push(part);
    return Buffer.concat(parts).toString("utf8");
  }

  async function chat(/** @type {import("node:http").IncomingMessage} */ req,
                      /** @type {import("node:http").ServerResponse} */ res) {
    const userId = authenticate(req, res);
    if (!userId) return;
    /** @type {Record<string, any>} */
    let body;
    try {
      body = JSON.parse(await readBody(req));
      if (typeof body !== "object" || body === null || Array.isArray(body)) throw new TypeError();
    } catch {
      send(res, 400, errorBody("invalid_request_error", "invalid_json",
                               "The body must be a JSON object."));
      return;
    }
    const now = clock();
    const verdict = book.verdict(userId, now);
    const size = worstCase(body, { defaultOutput: config.frontDoor.defaultMaxTokens,
                                   overhead: config.frontDoor.promptOverhead });
    const refused = refusal(userId, verdict, now);
    if (refused) {
      send(res, refused.status, refused.body,
           { "retry-after": String(refused.retryAfter), ...headers(userId, now) });
      return;
    }
    const call = randomUUID();
    const reservation = book.reserve(userId, size, now);
    tally.doors.set(call, { userId, reservation });
    const extra = notices(verdict);
    try {
      const upstream = await forward("POST", "/v1/chat/completions",
        { "x-openclaw-session-key": `agent:${agentOf(body.model)}:${DOOR_SESSION}${call}` },
        JSON.stringify({ ...body, user: userId }));
      const status = upstream.statusCode ?? 502;
      if (status !== 200) book.release(reservation); // no model call to settle it
      const shown = { ...headers(userId, clock()),
                      "content-type": upstream.headers["content-type"] ?? "application/json" };
      if (status === 200 && body.stream) {
        res.writeHead(status, { ...shown, "cache-control": "no-cache" });
        const appender = streamAppender(extra);
        upstream.setEncoding("utf8"); // a character split between two reads stays whole
        for await (const part of upstream) res.write(appender.push(part));
        res.end(appender.end());
        return;
      }
      const answer = await text(upstream);
      if (status !== 200) {
        res.writeHead(status, shown);
        res.end(answer);
        return;
      }
      send(res, status, withAppended(JSON.parse(answer), extra), shown);
    } catch (error) {
      book.release(reservation);
      logger.warn(`tally: front door call failed: ${String(error)}`);
      if (!res.headersSent) {
        send(res, 502, errorBody("api_error", "gateway_unreachable",
                                 "The gateway did not answer the call."));
      } else {
        res.end();
      }
    }
  }

  async function models(/** @type {import("node:http").IncomingMessage} */ req,
                        /** @type {import("node:http").ServerResponse} */ res) {
    const userId = authenticate(req, res);
    if (!userId) return;
    const upstream = await forward("GET", "/v1/models", {}, null);
    res.writeHead(upstream.statusCode ?? 502, {
      "content-type": upstream.headers["content-type"] ?? "application/json" });
    res.end(await text(upstream));
  }

  function budget(/** @type {import("node:http").IncomingMessage} */ req,
                  /** @type {import("node:http").ServerResponse} */ res) {
    const userId = authenticate(req, res);
    if (!userId) return;
    const d = book.decisionOf(userId);
    if (!d) {
      send(res, 404, errorBody("not_found_error", "no_decision",
                               `No budget decision for ${userId} yet.`));
      return;
    }
    send(res, 200, budgetRow(d), headers(userId, clock()));
  }

  /**
   * One route's handler: the method checked, nothing thrown to the gateway.
   * @param {string} method
   * @param {(req: import("node:http").IncomingMessage, res: import("node:http").ServerResponse) => unknown} serve
   */
  function route(method, serve) {
    return async (/** @type {import("node:http").IncomingMessage} */ req,
                  /** @type {import("node:http").ServerResponse} */ res) => {
      if (req.method !== method) {
        send(res, 405, errorBody("invalid_request_error", "method_not_allowed",
                                 `Use ${method}.`), { allow: method });
        return true;
      }
      try {
        await serve(req, res);
      } catch (error) {
        logger.warn(`tally: front door ${req.url} failed: ${String(error)}`);
        if (!res.headersSent) send(res, 500, errorBody("api_error", "internal", "Internal error."));
        else res.end();
      }
      return true;
    };
  }

  return {
    [DOOR_PATHS.chat]: route("POST", chat),
    [DOOR_PATHS.models]: route("GET", models),
    [DOOR_PATHS.budget]: route("GET", budget),
  };
}

/**
 * What verifies JWTs at the door, or null when they are not configured. A key that
 * cannot be loaded is logged and every token refused (API keys still work): the plugin's
 * hooks must keep running whatever the door's settings.
 * @param {import("./jwt.js").JwtSettings | null} settings
 * @param {Record<string, string | undefined>} env
 * @param {import("./plugin.js").Logger} logger
 * @returns {import("./frontdoor.js").JwtCheck | null}
 */
function jwtCheck(settings, env, logger) {
  if (!settings) return null;
  try {
    return { settings, key: loadKey(settings, env) };
  } catch (error) {
    logger.warn(`tally: JWTs are refused at the front door: ${String(error)}`);
    return { settings, key: null };
  }
}
