#!/usr/bin/env bash
# Socket.IO 4 peer. Usage: run.sh PORT  -- installs node_modules on first use, then execs node.
HERE=$(cd "$(dirname "$0")" && pwd)
exec "$HERE/../node-peer.sh" "$HERE" socket.io "$@"
