#!/usr/bin/env bash
# Counts the server's instructions under W2's shape with callgrind: repeatable whatever else
# the machine is doing (timings on these hosts are not), so two builds compare by their counts.
#
# Usage: bench/callgrind.sh BINARY OUT_FILE
#   BINARY    a confab build (server and load generator)
#   OUT_FILE  the callgrind output (read it with `callgrind_annotate --inclusive=yes OUT_FILE`)
# Environment (defaults: W2 at a tenth of its load, which a server under valgrind keeps up with):
#   CG_CONNECTIONS 1000, CG_ROOMS 100, CG_RATE 1000 (messages/s in all: each connection one a
#   second), CG_DURATION 140 (seconds the generator runs), CG_FROM 110 and CG_TO 130 (seconds
#   after the generator starts between which instructions are counted: in the steady state,
#   past the history index's first runs, written 19-32 s in at this rate per room, and the
#   retry keys' first merges, 100,000 messages after their keys).
# At a tenth of the load a commit holds about one message against W2's eight, so a commit's
# fixed costs weigh more here than in W2 itself; compare builds, not workloads.
# The server runs on core 0, the generator on core 1. Prints the generator's summary and the
# instructions counted (the `summary:` line of the output).
set -euo pipefail

[ $# -eq 2 ] || { sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2; exit 2; }
BIN=$(realpath "$1") OUT=$2
CONNECTIONS=${CG_CONNECTIONS:-1000} ROOMS=${CG_ROOMS:-100} RATE=${CG_RATE:-1000}
DURATION=${CG_DURATION:-140} FROM=${CG_FROM:-110} TO=${CG_TO:-130}
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/confab-callgrind.XXXXXX")
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
server=
cleanup() {
    [ -n "$server" ] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT

taskset -c 0 valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$OUT" \
    "$BIN" serve --addr "127.0.0.1:$PORT" --data-dir "$TMP/data" --jwt-secret s3cret \
    >"$TMP/server.log" 2>&1 &
server=$!
for _ in $(seq 300); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break
    sleep 0.2
done

taskset -c 1 "$BIN" bench --addr "127.0.0.1:$PORT" --target confab \
    --connections "$CONNECTIONS" --rooms "$ROOMS" --publishers "$CONNECTIONS" --rate "$RATE" \
    --duration "$DURATION" --warmup 2 --max-conn-rate 1 --jwt-secret s3cret --quiet \
    >"$TMP/bench.txt" 2>&1 &
generator=$!
sleep "$FROM"
callgrind_control -i on "$server" >/dev/null 2>&1
sleep $((TO - FROM))
callgrind_control -d "$server" >/dev/null 2>&1
callgrind_control -i off "$server" >/dev/null 2>&1
wait "$generator" || { cat "$TMP/bench.txt" >&2; echo "callgrind.sh: the generator failed" >&2; exit 1; }
kill "$server"
wait "$server" 2>/dev/null || true
server=
cat "$TMP/bench.txt"
# `-d` wrote OUT.1 (the counted window); the final dump at exit, OUT, holds nothing counted.
mv "$OUT.1" "$OUT" 2>/dev/null || true
grep '^summary:' "$OUT"
