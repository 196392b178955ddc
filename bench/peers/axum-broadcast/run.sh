#!/usr/bin/env bash
# axum + tokio::sync::broadcast peer. Usage: run.sh PORT [tuned]
# Builds the release binary when missing or older than its sources, then execs it.
set -euo pipefail
PORT=${1:?usage: run.sh PORT [tuned]}
HERE=$(cd "$(dirname "$0")" && pwd)
BIN=$HERE/target/release/axum-broadcast-peer
if [ ! -x "$BIN" ] || [ -n "$(find "$HERE/src" "$HERE/Cargo.toml" "$HERE/Cargo.lock" -newer "$BIN" 2>/dev/null)" ]; then
    cargo build --quiet --release --locked --manifest-path "$HERE/Cargo.toml" --target-dir "$HERE/target"
fi
ulimit -n "$(ulimit -Hn)"
exec "$BIN" "$PORT" ${2:+"$2"}
