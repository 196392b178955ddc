#!/usr/bin/env bash
# Runs a set of benchmarks N times each through bench/run.sh, into one results folder, then
# prints the report's tables. A failed run is logged and the matrix goes on.
#
# Usage: bench/matrix.sh [options] [-- extra bench/run.sh options]
#   --runs N        runs of each (workload, target, rate) (default 3)
#   --workloads L   comma-separated, from w1,w2,w3,w4,w5 (default w1,w3,w2)
#   --targets L     comma-separated targets (default: confab and every peer and variant);
#                   w4 and w5 only ever run against confab
#   --rates L       W1 rates in messages/s (default 100,500,1000,2000)
#   --out DIR       results folder (default bench/results/YYYY-MM-DD)
# Environment: CONFAB_BIN as for bench/run.sh (built once here when unset).
#
# Runs are interleaved (run 1 of everything, then run 2, ...) so that a noisy period of the
# machine does not fall on a single target. Example:
#   bench/matrix.sh --workloads w1 --targets confab,floor,floor:batched --rates 100,1000 --runs 1
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUNS=3
WORKLOADS=w1,w3,w2
TARGETS=confab,floor,floor:batched,axum-broadcast,axum-broadcast:tuned,ws,socketio,gorilla
RATES=100,500,1000,2000
OUT=$ROOT/bench/results/$(date +%F)
PASS=()
while [ $# -gt 0 ]; do
    case $1 in
        --runs) RUNS=$2; shift 2 ;;
        --workloads) WORKLOADS=$2; shift 2 ;;
        --targets) TARGETS=$2; shift 2 ;;
        --rates) RATES=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --) shift; PASS=("$@"); break ;;
        *) sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2; exit 2 ;;
    esac
done
IFS=, read -r -a WORKLOADS <<<"$WORKLOADS"
IFS=, read -r -a TARGETS <<<"$TARGETS"
IFS=, read -r -a RATES <<<"$RATES"

if [ -z "${CONFAB_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --quiet --release -p confab)
    export CONFAB_BIN=$ROOT/target/release/confab
fi
mkdir -p "$OUT"

# The list of runs: "workload target rate".
JOBS=()
for workload in "${WORKLOADS[@]}"; do
    for target in "${TARGETS[@]}"; do
        case $workload in
            w1) for rate in "${RATES[@]}"; do JOBS+=("w1 $target $rate"); done ;;
            w4|w5) [ "$target" = confab ] && JOBS+=("$workload confab -") ;;
            *) JOBS+=("$workload $target -") ;;
        esac
    done
done

failed=()
total=$(( ${#JOBS[@]} * RUNS )) done=0
for run in $(seq "$RUNS"); do
    for job in "${JOBS[@]}"; do
        read -r workload target rate <<<"$job"
        done=$((done + 1))
        what="$workload $target"
        [ "$rate" = - ] || what="$what at $rate msgs/s"
        echo "== [$done/$total] run $run: $what" >&2
        args=("$workload" "$target" --run "$run" --out "$OUT")
        [ "$rate" = - ] || args+=(--rate "$rate")
        if ! "$ROOT/bench/run.sh" "${args[@]}" "${PASS[@]}" >/dev/null; then
            failed+=("run $run: $what")
        fi
        sleep 2   # let sockets in TIME_WAIT and the page cache settle between runs
    done
done

echo >&2
echo "${#failed[@]} of $total runs failed${failed:+:}" >&2
for f in "${failed[@]}"; do echo "  $f" >&2; done
cargo run --quiet --release --manifest-path "$ROOT/bench/report/Cargo.toml" -- "$OUT"
