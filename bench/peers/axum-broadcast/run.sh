#!/usr/bin/env bash
# axum + tokio::sync::broadcast peer. Usage: run.sh PORT [tuned]
# Builds the release binary on first use (or when its sources changed), then execs it.
HERE=$(cd "$(dirname "$0")" && pwd)
exec "$HERE/../cargo-peer.sh" "$HERE" axum-broadcast-peer "$@"
