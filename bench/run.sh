#!/usr/bin/env bash
# One benchmark run (issue 4): start the server under test pinned to core 0, run `confab bench`
# pinned to core 1 with the workload's parameters, write its JSON report, stop the server.
#
# Usage: bench/run.sh WORKLOAD TARGET [options] [-- extra confab bench flags]
#   WORKLOAD  w1 (fan-out) | w2 (many rooms) | w3 (idle) | w4 (durable, confab only)
#             | w5 (resume storm, confab only)
#   TARGET    confab | PEER[:VARIANT]: floor, floor:batched, floor:uring, axum-broadcast,
#             axum-broadcast:tuned, ws, socketio, gorilla (see bench/peers/README.md)
# Options:
#   --rate R          W1: messages/s published into the room (default 100)
#   --connections N   override the workload's connection count
#   --rooms N         override the workload's room count
#   --duration S      override the measured window, seconds
#   --warmup S        override the warmup, seconds
#   --payload B       W1, W2, W4: message payload bytes (default 64); e.g. a raw peer at
#                     confab's frame size (292 bytes) shows what the envelope's bytes cost
#   --run N           run number in the file name (default: the next free one)
#   --out DIR         results folder (default bench/results/YYYY-MM-DD)
#   --port P          server port (default: the first free one from 9500)
#   --realtime        run the server and the generator at real-time priority (`chrt`,
#                     SCHED_FIFO: the server's main thread at 2, its other threads and the
#                     generator at 1), so that nothing else on their cores can preempt them:
#                     on these machines the sandbox's own agent (PID 1) takes 20-30 ms of a
#                     core every ~3.1 s while 20,000 sockets are open, and the generator then
#                     publishes what it owed in one burst (BENCHMARKS.md, 2026-12-05). Only for
#                     workloads that leave both cores idle part of the time (W2, W1 at low
#                     rates): a saturated real-time process starves its core's kernel threads
#                     down to the kernel's real-time throttle (5 %)
# Environment:
#   CONFAB_BIN        the confab binary (server and load generator); default: build
#                     target/release/confab with `cargo build --release -p confab`
#   LOG_TAIL          lines of the server's log kept in the .txt (default 20)
#
# Output: DIR/WORKLOAD-LABEL-PARAMS-runN.json (the generator's report plus a "driver" object
# saying what ran) and the same name with .txt (generator summary, server log tail).
# LABEL is the target with ':' turned into '-' (floor-batched); PARAMS is r<rate> for W1 and
# n<connections> for the others, prefixed by n<connections>_ / suffixed by _k<rooms> when
# overridden. Every run is bounded in time; the server is stopped and temp files removed on
# any exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2; exit 2; }

[ $# -ge 2 ] || usage
WORKLOAD=$(tr '[:upper:]' '[:lower:]' <<<"$1")
TARGET=$2
shift 2
RATE=100 CONNECTIONS= ROOMS= DURATION= WARMUP= RUN= OUT= PORT= PAYLOAD=64 REALTIME=
EXTRA=()
while [ $# -gt 0 ]; do
    case $1 in
        --rate) RATE=$2; shift 2 ;;
        --connections) CONNECTIONS=$2; shift 2 ;;
        --rooms) ROOMS=$2; shift 2 ;;
        --duration) DURATION=$2; shift 2 ;;
        --warmup) WARMUP=$2; shift 2 ;;
        --payload) PAYLOAD=$2; shift 2 ;;
        --run) RUN=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        --realtime) REALTIME=1; shift ;;
        --) shift; EXTRA=("$@"); break ;;
        -h|--help) usage ;;
        *) echo "run.sh: unknown option $1" >&2; usage ;;
    esac
done

# How the generator is started (`chrt` runs it at SCHED_FIFO 1 with --realtime; the server is
# switched once it is up, below).
SCHED=() SCHEDULING=default
if [ -n "$REALTIME" ]; then
    chrt -f 1 true 2>/dev/null || { echo "run.sh: --realtime needs chrt and CAP_SYS_NICE" >&2; exit 2; }
    SCHED=(chrt -f 1) SCHEDULING="fifo: server main thread 2, its other threads 1, generator 1"
fi

PEER=${TARGET%%:*}
VARIANT=
[ "$PEER" = "$TARGET" ] || VARIANT=${TARGET#*:}
LABEL=$PEER${VARIANT:+-$VARIANT}
if [ "$PEER" != confab ] && [ ! -x "$ROOT/bench/peers/$PEER/run.sh" ]; then
    echo "run.sh: unknown target $TARGET (confab or a peer under bench/peers/)" >&2
    exit 2
fi
case $PEER in
    confab) PROTOCOL=confab ;;
    socketio) PROTOCOL=socketio ;;
    *) PROTOCOL=raw ;;
esac
[ "$(nproc)" -ge 2 ] || { echo "run.sh: needs 2 cores (server on 0, generator on 1)" >&2; exit 2; }

# ---- the workload's parameters (keep in step with bench/README.md) ----
SECRET=bench-secret-not-for-production
SERVER_ENV=()     # extra environment for confab serve
WARMUP_DEFAULT=2 DURATION_DEFAULT=10
case $WORKLOAD in
    w1) # fan-out: 1 room, 1,000 subscribers, one publisher at RATE messages/s
        N=${CONNECTIONS:-1000} K=${ROOMS:-1}
        MODE_ARGS=(--publishers 1 --rate "$RATE" --max-conn-rate 0 --payload "$PAYLOAD")
        SERVER_ENV=(CONFAB_MESSAGE_RATE=1000000 CONFAB_MESSAGE_BURST=1000000)
        PARAMS=r$RATE ;;
    w2) # many rooms: 10,000 connections in 1,000 rooms of 10, each publishing 1 message/s
        N=${CONNECTIONS:-10000} K=${ROOMS:-1000}
        MODE_ARGS=(--publishers "$N" --rate "$N" --max-conn-rate 1 --payload "$PAYLOAD" --source-addrs 4)
        PARAMS=n$N ;;
    w3) # idle capacity: 19,000 joined connections (rooms of 100) held for the window
        N=${CONNECTIONS:-19000} K=${ROOMS:-$(( (N + 99) / 100 ))}
        MODE_ARGS=(--idle --source-addrs 4)
        PARAMS=n$N ;;
    w4) # durable throughput: 100 senders, each in its own room, acked as fast as possible
        N=${CONNECTIONS:-100} K=${ROOMS:-$N}
        MODE_ARGS=(--durable --rate 0 --max-conn-rate 0 --pipeline 16 --payload "$PAYLOAD")
        SERVER_ENV=(CONFAB_MESSAGE_RATE=1000000 CONFAB_MESSAGE_BURST=1000000)
        PARAMS=n$N ;;
    w5) # resume storm: 10,000 clients in 100 rooms rejoin at once with since, 100 behind
        N=${CONNECTIONS:-10000} K=${ROOMS:-100}
        MODE_ARGS=(--resume --prefill 200 --behind 100 --source-addrs 4)
        DURATION_DEFAULT=30
        PARAMS=n$N ;;
    *) echo "run.sh: unknown workload $WORKLOAD (w1..w5)" >&2; exit 2 ;;
esac
[ "$PEER" = confab ] || SERVER_ENV=()   # the limits are confab's; the peers have none
if [[ $WORKLOAD == w[45] && $PEER != confab ]]; then
    echo "run.sh: $WORKLOAD is for confab only (the peers neither acknowledge nor keep history)" >&2
    exit 2
fi
if [ "$WORKLOAD" = w1 ] && [ -n "$CONNECTIONS" ]; then PARAMS=n${N}_$PARAMS; fi
if [ -n "$ROOMS" ]; then PARAMS=${PARAMS}_k$K; fi
if [ "$PAYLOAD" != 64 ]; then PARAMS=${PARAMS}_p$PAYLOAD; fi
WARMUP=${WARMUP:-$WARMUP_DEFAULT} DURATION=${DURATION:-$DURATION_DEFAULT}
[ "$N" -le 19500 ] || { echo "run.sh: at most 19,500 connections (open files are capped at 20,000)" >&2; exit 2; }

# ---- binaries ----
if [ -z "${CONFAB_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --quiet --release -p confab)
    CONFAB_BIN=$ROOT/target/release/confab
fi
CONFAB_BIN=$(realpath "$CONFAB_BIN")
if ! "$CONFAB_BIN" bench --help >/dev/null 2>&1; then
    echo "run.sh: $CONFAB_BIN has no 'bench' subcommand; set CONFAB_BIN to a confab that has it" >&2
    exit 2
fi

# ---- output ----
DATE=$(date +%F)
# Which confab ran: a copied build of an older commit is told apart from this checkout (whose
# commit `commit` records) by its contents' hash.
CONFAB_SHA=$(sha256sum "$CONFAB_BIN" 2>/dev/null | cut -c1-12)
OUT=${OUT:-$ROOT/bench/results/$DATE}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")
STEM=$WORKLOAD-$LABEL-$PARAMS
if [ -z "$RUN" ]; then
    RUN=1
    while [ -e "$OUT/$STEM-run$RUN.json" ]; do RUN=$((RUN + 1)); done
fi
JSON=$OUT/$STEM-run$RUN.json
TXT=$OUT/$STEM-run$RUN.txt
if [ ! -e "$OUT/machine.txt" ]; then
    {
        echo "date: $(date -Is)"
        echo "commit: $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "confab: $("$CONFAB_BIN" --version 2>/dev/null || echo unknown) ($CONFAB_BIN, sha256 ${CONFAB_SHA:-unknown})"
        echo "cpu: $(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1), $(nproc) cores"
        echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
        echo "kernel: $(uname -sr)"
        echo "open files: $(ulimit -Hn)"
    } >"$OUT/machine.txt"
fi

# ---- start the server on core 0 ----
ulimit -n "$(ulimit -Hn)"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/confab-bench.XXXXXX")
SERVER_PID= GEN_PID=
cleanup() {
    if [ -n "$GEN_PID" ]; then
        kill -TERM "$GEN_PID" 2>/dev/null || true   # timeout passes it on to the generator
        wait "$GEN_PID" 2>/dev/null || true
    fi
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [ -z "$PORT" ]; then
    PORT=9500
    while ss -Hltn "sport = :$PORT" | grep -q .; do PORT=$((PORT + 1)); done
fi
LOG=$TMP/server.log
if [ "$PEER" = confab ]; then
    env CONFAB_LOG=warn "${SERVER_ENV[@]}" taskset -c 0 "$CONFAB_BIN" serve \
        --addr "127.0.0.1:$PORT" --data-dir "$TMP/data" --jwt-secret "$SECRET" >"$LOG" 2>&1 &
    SERVER_PID=$!
else
    # run.sh execs the server, so $! is the server's PID; a first start builds or installs it.
    taskset -c 0 "$ROOT/bench/peers/$PEER/run.sh" "$PORT" ${VARIANT:+"$VARIANT"} >"$LOG" 2>&1 &
    SERVER_PID=$!
fi
echo "== $WORKLOAD $TARGET ($PARAMS, run $RUN): server pid $SERVER_PID on 127.0.0.1:$PORT" >&2
up=
for _ in $(seq 2400); do   # up to 20 minutes: a peer's first start compiles or installs it
    if ss -Hltn "sport = :$PORT" | grep -q .; then up=1; break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.5
done
if [ -z "$up" ]; then
    echo "run.sh: the server did not come up on port $PORT; its log:" >&2
    tail -30 "$LOG" >&2
    exit 1
fi

if [ -n "$REALTIME" ]; then
    # Every thread of the server at SCHED_FIFO 1, then its main thread above them: a server's
    # helper threads (confab's store writer and checkpointer) must not hold its event loop up
    # longer than they would at the default policy, where the two share the core by time slices;
    # at one priority, SCHED_FIFO lets none preempt another. Threads started later take the
    # policy of the thread that starts them.
    chrt -a -f -p 1 "$SERVER_PID" >/dev/null
    chrt -f -p 2 "$SERVER_PID" >/dev/null
fi

# ---- run the generator on core 1, bounded in time ----
ARGS=(bench --addr "127.0.0.1:$PORT" --target "$PROTOCOL" --connections "$N" --rooms "$K"
      --duration "$DURATION" --warmup "$WARMUP" --server-pid "$SERVER_PID" --json "$TMP/report.json"
      "${MODE_ARGS[@]}")
[ "$PROTOCOL" != confab ] || ARGS+=(--jwt-secret "$SECRET")
[ -t 2 ] || ARGS+=(--quiet)
ARGS+=("${EXTRA[@]}")
# warmup + window + drain (5 s) + connecting (bounded by the connect timeout per wave) + margin
LIMIT=$(awk -v w="$WARMUP" -v d="$DURATION" -v n="$N" 'BEGIN { printf "%d", w + d + 5 + 60 + n / 50 }')
# In the background with `wait`, so that a signal to this script stops the run at once (the
# EXIT trap stops the generator too) instead of waiting for the generator to finish.
mkfifo "$TMP/output"
tee "$TXT" <"$TMP/output" &
TEE_PID=$!
timeout --kill-after=10 "$LIMIT" taskset -c 1 "${SCHED[@]}" "$CONFAB_BIN" "${ARGS[@]}" >"$TMP/output" 2>&1 &
GEN_PID=$!
STATUS=0
wait "$GEN_PID" || STATUS=$?
GEN_PID=
wait "$TEE_PID" || true
# What confab's store holds on disk once the window is over, before the server stops: a WAL
# past its rewind size (64 MiB) for long means checkpoints fell behind, which a run's CPU and
# latency do not show (a starved checkpointer once looked like a better p99; BENCHMARKS.md,
# 2026-12-04, Xeon).
DATA_BYTES=null WAL_BYTES=null
if [ "$PEER" = confab ] && [ -d "$TMP/data" ]; then
    DATA_BYTES=$(du -sb "$TMP/data" | cut -f1)
    WAL_BYTES=$(stat -c %s "$TMP/data/confab.db-wal" 2>/dev/null || echo 0)
fi
{
    echo
    echo "# command: confab ${ARGS[*]/$SECRET/SECRET}"
    [ "$DATA_BYTES" = null ] || echo "# store on disk: $DATA_BYTES bytes, of which the WAL $WAL_BYTES"
    echo "# scheduling of the server and the generator: $SCHEDULING"
    echo "# server: $TARGET, pid $SERVER_PID${SERVER_ENV[*]:+, ${SERVER_ENV[*]}}; log tail:"
    tail -${LOG_TAIL:-20} "$LOG"
} >>"$TXT"
if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "run.sh: the server died during the run; its log:" >&2
    tail -30 "$LOG" >&2
fi
if [ ! -s "$TMP/report.json" ]; then
    echo "run.sh: confab bench wrote no report (exit status $STATUS; $([ "$STATUS" = 124 ] && echo "killed after $LIMIT s"))" >&2
    exit 1
fi
jq --arg workload "$WORKLOAD" --arg target "$LABEL" --arg peer "$PEER" --arg variant "$VARIANT" \
    --arg params "$PARAMS" --argjson run "$RUN" --arg date "$DATE" \
    --arg commit "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --arg server_env "${SERVER_ENV[*]:-}" --arg scheduling "$SCHEDULING" \
    --argjson exit_status "$STATUS" --arg confab_sha256 "${CONFAB_SHA:-unknown}" \
    --argjson data_bytes "$DATA_BYTES" --argjson wal_bytes "$WAL_BYTES" \
    '. + {driver: {workload: $workload, target: $target, peer: $peer, variant: $variant,
                   params: $params, run: $run, date: $date, commit: $commit,
                   server_env: $server_env, scheduling: $scheduling,
                   exit_status: $exit_status, confab_sha256: $confab_sha256,
                   data_bytes: $data_bytes, wal_bytes: $wal_bytes}}' \
    "$TMP/report.json" >"$JSON"
echo "wrote $JSON" >&2
exit "$STATUS"
