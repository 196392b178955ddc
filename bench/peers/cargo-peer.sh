#!/usr/bin/env bash
# Shared by the Rust peers: cargo-peer.sh DIR BINARY PORT [VARIANT]
# Builds DIR's crate (--release, --locked, into DIR/target) when the binary is missing or older
# than its sources, raises the open-files limit, then execs `BINARY PORT [VARIANT]` (same PID).
set -euo pipefail
DIR=$1 NAME=$2 PORT=${3:?usage: run.sh PORT [VARIANT]} VARIANT=${4:-}
BIN=$DIR/target/release/$NAME
if [ ! -x "$BIN" ] || [ -n "$(find "$DIR/src" "$DIR/Cargo.toml" "$DIR/Cargo.lock" -newer "$BIN" 2>/dev/null)" ]; then
    cargo build --quiet --release --locked --manifest-path "$DIR/Cargo.toml" --target-dir "$DIR/target"
    touch "$BIN"
fi
ulimit -n "$(ulimit -Hn)"
exec "$BIN" "$PORT" ${VARIANT:+"$VARIANT"}
