#!/usr/bin/env bash
# npm `ws` peer. Usage: run.sh PORT  -- installs node_modules on first use, then execs node.
HERE=$(cd "$(dirname "$0")" && pwd)
exec "$HERE/../node-peer.sh" "$HERE" ws "$@"
