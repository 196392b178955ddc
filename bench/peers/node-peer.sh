#!/usr/bin/env bash
# Shared by the Node peers: node-peer.sh DIR MODULE PORT
# Installs DIR's pinned node_modules (npm ci) when MODULE is missing or the lock file changed,
# raises the open-files limit, then execs `node DIR/server.mjs PORT` (same PID as the caller).
set -euo pipefail
DIR=$1 MODULE=$2 PORT=${3:?usage: run.sh PORT}
if [ ! -d "$DIR/node_modules/$MODULE" ] || [ "$DIR/package-lock.json" -nt "$DIR/node_modules/.package-lock.json" ]; then
    (cd "$DIR" && npm ci --no-audit --no-fund --silent >&2)
fi
ulimit -n "$(ulimit -Hn)"
exec node "$DIR/server.mjs" "$PORT"
