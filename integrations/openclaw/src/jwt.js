/**
 * JWTs at the front door, checked as Tally's ingest checks them (src/tally/auth.py, which
 * uses PyJWT with no leeway): node's own crypto, no dependency.
 *
 * The key: a public key file (RS*, PS*, ES*, EdDSA) named in the plugin config, or, for
 * HS*, the shared secret from the gateway's environment (TALLY_JWT_SECRET), never from
 * openclaw.json: a secret there would let anyone who reads the config sign tokens.
 *
 * A token is accepted when: its header names an algorithm that is configured and fits the
 * key ("none" never); its signature verifies; it carries `exp`, not passed; `nbf` and
 * `iat`, when present, not in the future; `iss` and `aud` match when configured; `sub` and
 * `jti`, when present, are strings; the user id claim is a non-empty string.
 */

import {
  constants, createHmac, createPublicKey, createSecretKey, timingSafeEqual, verify,
} from "node:crypto";
import { readFileSync } from "node:fs";

/** The environment variable an HS* secret comes from. */
export const SECRET_ENV = "TALLY_JWT_SECRET";

/** RFC 7518 3.2, and Tally's MIN_HMAC_SECRET_BYTES: an HMAC key as long as the hash. */
const MIN_SECRET_BYTES = 32;

const HASHES = Object.freeze({ 256: "sha256", 384: "sha384", 512: "sha512" });
const CURVES = Object.freeze({ ES256: "prime256v1", ES384: "secp384r1", ES512: "secp521r1" });

/**
 * @typedef {object} JwtSettings the plugin's `frontDoor.jwt`, as auth.yaml names them
 * @property {string[]} algorithms
 * @property {string} [publicKeyFile]
 * @property {string} [audience]
 * @property {string} [issuer]
 * @property {string} userIdClaim
 */

/** A token the door does not accept; `message` says why. */
export class JwtError extends Error {}

/**
 * The key that verifies tokens: the public key file, else the environment's secret.
 * Throws on a configuration that cannot work (both, neither, a short secret).
 * @param {JwtSettings} settings @param {Record<string, string | undefined>} env
 * @returns {import("node:crypto").KeyObject}
 */
export function loadKey(settings, env, read = readFileSync) {
  const secret = env[SECRET_ENV];
  if (settings.publicKeyFile && secret) {
    throw new Error(`tally: frontDoor.jwt.publicKeyFile and ${SECRET_ENV} are both set: ` +
                    "say which one verifies tokens");
  }
  if (settings.publicKeyFile) return createPublicKey(read(settings.publicKeyFile));
  if (!secret) {
    throw new Error(`tally: frontDoor.jwt needs publicKeyFile, or ${SECRET_ENV} in the ` +
                    "gateway's environment for HS256");
  }
  if (Buffer.byteLength(secret) < MIN_SECRET_BYTES) {
    throw new Error(`tally: ${SECRET_ENV} needs at least ${MIN_SECRET_BYTES} bytes`);
  }
  return createSecretKey(Buffer.from(secret, "utf8"));
}

/** Whether `token` has the three dot-separated parts of a JWT. @param {string} token */
export function looksLikeJwt(token) {
  return token.split(".").length === 3;
}

/**
 * The claims of a token that passes every check, else a JwtError.
 * @param {string} token @param {JwtSettings} settings
 * @param {import("node:crypto").KeyObject} key @param {number} nowMs
 * @returns {Record<string, unknown>}
 */
export function verifyJwt(token, settings, key, nowMs) {
  const parts = token.split(".");
  if (parts.length !== 3 || !parts.every((p) => /^[A-Za-z0-9_-]*$/.test(p))) {
    throw new JwtError("not a JWT");
  }
  const header = jsonPart(parts[0], "header");
  if (header.kid !== undefined && typeof header.kid !== "string") {
    throw new JwtError("the key id (kid) must be a string");
  }
  const alg = header.alg;
  if (typeof alg !== "string" || !settings.algorithms.includes(alg) || !fits(alg, key)) {
    throw new JwtError("the algorithm is not allowed");
  }
  const signed = Buffer.from(`${parts[0]}.${parts[1]}`, "ascii");
  if (!signatureHolds(alg, key, signed, Buffer.from(parts[2], "base64url"))) {
    throw new JwtError("signature verification failed");
  }
  const claims = jsonPart(parts[1], "payload");
  checkClaims(claims, settings, nowMs / 1000);
  return claims;
}

/**
 * The user id a verified token names: its `userIdClaim`.
 * @param {Record<string, unknown>} claims @param {string} claim
 */
export function subjectOf(claims, claim) {
  const subject = claims[claim];
  if (typeof subject !== "string" || !subject) {
    throw new JwtError(`the token has no ${JSON.stringify(claim)} claim`);
  }
  return subject;
}

/** @param {string} part @param {string} what @returns {Record<string, any>} */
function jsonPart(part, what) {
  let value;
  try {
    value = JSON.parse(Buffer.from(part, "base64url").toString("utf8"));
  } catch {
    throw new JwtError(`the ${what} is not JSON`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new JwtError(`the ${what} is not a JSON object`);
  }
  return value;
}

/**
 * Whether `alg` can be verified with this key at all: a secret only for HS*, an RSA key
 * for RS* and PS*, an EC key on the algorithm's curve for ES*, an Edwards key for EdDSA.
 * @param {string} alg @param {import("node:crypto").KeyObject} key
 */
function fits(alg, key) {
  if (key.type === "secret") return /^HS(256|384|512)$/.test(alg);
  const type = key.asymmetricKeyType;
  if (/^RS(256|384|512)$/.test(alg)) return type === "rsa";
  if (/^PS(256|384|512)$/.test(alg)) return type === "rsa" || type === "rsa-pss";
  if (alg in CURVES) {
    return type === "ec"
      && key.asymmetricKeyDetails?.namedCurve === CURVES[/** @type {keyof CURVES} */ (alg)];
  }
  return alg === "EdDSA" && (type === "ed25519" || type === "ed448");
}

/**
 * @param {string} alg @param {import("node:crypto").KeyObject} key
 * @param {Buffer} signed @param {Buffer} signature
 */
function signatureHolds(alg, key, signed, signature) {
  const hash = HASHES[/** @type {keyof HASHES} */ (Number(alg.slice(2)))];
  try {
    if (alg.startsWith("HS")) {
      const expected = createHmac(hash, key).update(signed).digest();
      return expected.length === signature.length && timingSafeEqual(expected, signature);
    }
    if (alg === "EdDSA") return verify(null, signed, key, signature);
    if (alg.startsWith("ES")) return verify(hash, signed, { key, dsaEncoding: "ieee-p1363" },
                                            signature);
    const padding = alg.startsWith("PS")
      ? { padding: constants.RSA_PKCS1_PSS_PADDING, saltLength: constants.RSA_PSS_SALTLEN_DIGEST }
      : { padding: constants.RSA_PKCS1_PADDING };
    return verify(hash, signed, { key, ...padding }, signature);
  } catch {
    return false; // a signature of the wrong size or shape
  }
}

/**
 * PyJWT's checks with no leeway: a time claim is read as an integer (a numeric string too).
 * @param {Record<string, unknown>} claims @param {JwtSettings} settings @param {number} now seconds
 */
function checkClaims(claims, settings, now) {
  if (claims.exp === undefined || claims.exp === null) throw new JwtError("no exp claim");
  if (claims.iat !== undefined && timeClaim(claims, "iat") > now) {
    throw new JwtError("the token is not yet valid (iat)");
  }
  if (claims.nbf !== undefined && timeClaim(claims, "nbf") > now) {
    throw new JwtError("the token is not yet valid (nbf)");
  }
  if (timeClaim(claims, "exp") <= now) throw new JwtError("the token has expired");
  if (typeof settings.issuer === "string" && claims.iss !== settings.issuer) {
    throw new JwtError("invalid issuer");
  }
  if (typeof settings.audience === "string" && !audienceHolds(claims.aud, settings.audience)) {
    throw new JwtError("invalid audience");
  }
  for (const name of ["sub", "jti"]) {
    if (claims[name] !== undefined && typeof claims[name] !== "string") {
      throw new JwtError(`the ${name} claim must be a string`);
    }
  }
}

/** @param {Record<string, unknown>} claims @param {string} name */
function timeClaim(claims, name) {
  const value = claims[name];
  if (typeof value === "number" && Number.isFinite(value)) return Math.trunc(value);
  if (typeof value === "string" && /^\s*[+-]?\d+\s*$/.test(value)) return Number(value);
  throw new JwtError(`the ${name} claim must be an integer`);
}

/** @param {unknown} aud @param {string} audience */
function audienceHolds(aud, audience) {
  const listed = typeof aud === "string" ? [aud] : aud;
  return Array.isArray(listed) && listed.length > 0
    && listed.every((a) => typeof a === "string") && listed.includes(audience);
}
