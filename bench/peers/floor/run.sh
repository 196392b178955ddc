#!/usr/bin/env bash
# The floor: minimal single-threaded epoll WebSocket room broadcaster. Usage: run.sh PORT [batched]
# Builds the release binary on first use (or when its sources changed), then execs it.
HERE=$(cd "$(dirname "$0")" && pwd)
exec "$HERE/../cargo-peer.sh" "$HERE" floor-peer "$@"
