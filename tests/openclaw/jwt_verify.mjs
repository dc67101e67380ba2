// Reads {settings, publicKeyPem | secret, nowMs, tokens} on stdin and prints, per token,
// what the front door makes of it: {"user": <the user id claim>} or {"error": <why>}.
import { readFileSync } from "node:fs";
import { loadKey, subjectOf, verifyJwt } from "../../integrations/openclaw/src/jwt.js";

const input = JSON.parse(readFileSync(0, "utf8"));
const settings = { ...input.settings, publicKeyFile: input.publicKeyPem ? "stdin" : undefined };
const key = loadKey(settings, { TALLY_JWT_SECRET: input.secret }, () => input.publicKeyPem);
const results = input.tokens.map((token) => {
  try {
    return { user: subjectOf(verifyJwt(token, settings, key, input.nowMs), settings.userIdClaim) };
  } catch (error) {
    return { error: String(error.message) };
  }
});
process.stdout.write(JSON.stringify(results));
