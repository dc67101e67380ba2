/**
 * Who is calling, from what an OpenClaw hook knows. Pure.
 *
 * In order of preference:
 * 1. `channel:senderId` when the run came from a channel with a known sender
 *    (e.g. "telegram:123456");
 * 2. the OpenAI `user` of an /v1/chat/completions call, which the gateway puts in the
 *    session key ("agent:main:openai-user:alice" -> "openai-user:alice", lower case,
 *    the way Tally compares it);
 * 3. the session key itself;
 * 4. "unknown".
 * Tally's users.yaml `identities` map these names to people.
 */

const OPENAI_USER = "openai-user:";

/**
 * @typedef {object} CallerFacts
 * @property {string} [channel] e.g. "telegram", "webchat"
 * @property {string} [senderId]
 * @property {string} [sessionKey]
 */

/**
 * The OpenAI user named in a session key, normalised, or null.
 * @param {string | undefined} sessionKey
 */
export function openaiUserOf(sessionKey) {
  if (!sessionKey) return null;
  const at = sessionKey.toLowerCase().indexOf(OPENAI_USER);
  if (at < 0 || (at > 0 && sessionKey[at - 1] !== ":")) return null;
  const user = sessionKey.slice(at + OPENAI_USER.length);
  return user ? OPENAI_USER + user.toLowerCase() : null;
}

/**
 * The compared form of an identity, as Tally's `normalise_identity`.
 * @param {string} identity
 */
export function normaliseIdentity(identity) {
  if (identity.slice(0, OPENAI_USER.length).toLowerCase() === OPENAI_USER) {
    return OPENAI_USER + identity.slice(OPENAI_USER.length).toLowerCase();
  }
  return identity;
}

/**
 * @param {CallerFacts} facts
 * @param {string} [prefix] put before the identity
 */
export function identityOf(facts, prefix = "") {
  return prefix + bareIdentity(facts);
}

/** @param {CallerFacts} facts */
function bareIdentity({ channel, senderId, sessionKey }) {
  if (senderId) return `${channel || "unknown"}:${senderId}`;
  return openaiUserOf(sessionKey) ?? (sessionKey || "unknown");
}

/**
 * The caller facts of a hook's context, and of a before_agent_run event.
 * @param {Record<string, any> | undefined} ctx
 * @param {Record<string, any>} [event]
 * @returns {CallerFacts}
 */
export function factsOf(ctx, event) {
  const c = ctx ?? {};
  const e = event ?? {};
  return {
    channel: c.channel ?? c.messageProvider ?? e.channelId ?? c.channelId,
    senderId: c.senderId ?? e.senderId,
    sessionKey: c.sessionKey,
  };
}

/** The session key prefix of a front-door call; the rest is the call's own id. */
export const DOOR_SESSION = "tally-door:";

/**
 * The front-door call id in a session key, or null.
 * @param {string | undefined} sessionKey
 */
export function doorSession(sessionKey) {
  const found = /(?:^|:)tally-door:([0-9a-f-]{36})$/i.exec(sessionKey ?? "");
  return found ? found[1].toLowerCase() : null;
}

/**
 * A session of the core /v1/chat/completions endpoint: "...:openai-user:<user>" or, for a
 * call without `user`, "...:openai:<random uuid>".
 * @param {string | undefined} sessionKey
 */
export function coreSession(sessionKey) {
  return openaiUserOf(sessionKey) !== null || anonymousSession(sessionKey);
}

/** A core-endpoint call that sent no `user`. @param {string | undefined} sessionKey */
export function anonymousSession(sessionKey) {
  return /(?:^|:)openai:[0-9a-f-]{36}$/i.test(sessionKey ?? "");
}
