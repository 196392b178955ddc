#!/usr/bin/env bash
# Starts every peer (and variant) on a free loopback port, runs check.mjs against it, stops it.
# Usage: bench/peers/check-all.sh [NAME[:VARIANT] ...]   (default: all of them)
# The first run installs and builds what the peers need (apt, npm, cargo): minutes.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
PEERS=("$@")
[ ${#PEERS[@]} -gt 0 ] || PEERS=(floor floor:batched floor:uring axum-broadcast axum-broadcast:tuned ws socketio gorilla)
LOGS=$(mktemp -d)

if [ ! -d "$HERE/node_modules/ws" ]; then
    (cd "$HERE" && npm ci --no-audit --no-fund --silent >&2)
fi

free_port() {
    local port=9400
    while ss -Hltn "sport = :$port" | grep -q .; do port=$((port + 1)); done
    echo "$port"
}

pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null' EXIT
results=()
failed=0
for peer in "${PEERS[@]}"; do
    name=${peer%%:*}
    variant=
    [ "$name" = "$peer" ] || variant=${peer#*:}
    port=$(free_port)
    log=$LOGS/${name}${variant:+-$variant}.log
    echo "== $peer on 127.0.0.1:$port (log: $log)"
    "$HERE/$name/run.sh" "$port" $variant >"$log" 2>&1 &
    pid=$!
    # Up to 15 minutes for a first install and build.
    for _ in $(seq 1800); do
        ss -Hltn "sport = :$port" | grep -q . && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    if node "$HERE/check.mjs" "$name" "$port"; then
        results+=("PASS $peer")
    else
        results+=("FAIL $peer")
        failed=$((failed + 1))
        tail -20 "$log" >&2
    fi
    kill -0 "$pid" 2>/dev/null || { results[-1]="FAIL $peer (the server died)"; failed=$((failed + 1)); }
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    pid=
done
echo
printf '%s\n' "${results[@]}"
echo "$(( ${#PEERS[@]} - failed )) passed, $failed failed"
[ "$failed" -eq 0 ]
