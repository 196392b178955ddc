#!/usr/bin/env bash
# Profiles confab under one workload: runs bench/run.sh, attaches `perf record -g` to the
# server inside the measured window, and renders a flamegraph (SVG) plus a text report of
# the hottest symbols.
#
# Usage: bench/profile.sh WORKLOAD OUT_STEM [bench/run.sh options]
#   e.g. bench/profile.sh w1 docs/bench/flame-w1-r100 --rate 100
# Writes OUT_STEM.svg (flamegraph) and OUT_STEM.txt (self time by symbol, top 40).
# Needs perf (Debian's linux-perf) and inferno (`cargo install inferno`); both are installed
# on first use. Recording starts PROFILE_DELAY seconds (default 6: connecting plus the
# warmup) after the server does and lasts PROFILE_SECONDS (default 6), inside the window.
# PROFILE_TARGET (default confab) profiles another target of bench/run.sh instead, e.g. the
# floor, to compare where the kernel time goes. PROFILE_CALL_GRAPH is perf's --call-graph
# (default fp; dwarf,32768 attributes time inside our frames, which carry no frame pointers),
# and PROFILE_KEEP=1 keeps the recording as OUT_STEM.perf.data for `perf report` afterwards.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 2 ] || { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
WORKLOAD=$1 STEM=$2
shift 2
DELAY=${PROFILE_DELAY:-6} RECORD=${PROFILE_SECONDS:-6}

command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
command -v inferno-flamegraph >/dev/null || cargo install --quiet --locked inferno
mkdir -p "$(dirname "$STEM")"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/confab-profile.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
"$ROOT/bench/run.sh" "$WORKLOAD" "${PROFILE_TARGET:-confab}" --out "$TMP/results" "$@" 2>"$TMP/run.log" &
RUN_PID=$!
pid=
for _ in $(seq 600); do
    pid=$(sed -n 's/.*server pid \([0-9]*\) on .*/\1/p' "$TMP/run.log" | head -1)
    [ -n "$pid" ] && break
    kill -0 "$RUN_PID" 2>/dev/null || break
    sleep 0.1
done
[ -n "$pid" ] || { cat "$TMP/run.log" >&2; echo "profile.sh: the server did not start" >&2; exit 1; }
sleep "$DELAY"
perf record -F 999 --call-graph "${PROFILE_CALL_GRAPH:-fp}" -p "$pid" -o "$TMP/perf.data" -- sleep "$RECORD" >/dev/null 2>&1 || true
wait "$RUN_PID" || true
grep -E 'latency|acked|server ' "$TMP/run.log" >&2 || true
perf script -i "$TMP/perf.data" 2>/dev/null | inferno-collapse-perf |
    inferno-flamegraph --title "confab $WORKLOAD $*" >"$STEM.svg"
perf report -i "$TMP/perf.data" --no-children --stdio --sort dso,symbol -g none 2>/dev/null |
    grep -E '^ +[0-9]' | sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//' | awk 'NR <= 40' >"$STEM.txt"
if [ "${PROFILE_KEEP:-0}" = 1 ]; then
    cp "$TMP/perf.data" "$STEM.perf.data"
    echo "kept the recording as $STEM.perf.data" >&2
fi
echo "wrote $STEM.svg and $STEM.txt" >&2
