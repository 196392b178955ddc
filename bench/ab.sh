#!/usr/bin/env bash
# Compares builds of confab (and peers) on one workload: interleaved runs of bench/run.sh, one
# results folder per label, then one line per label with the medians.
#
# Usage: bench/ab.sh WORKLOAD OUT RUNS LABEL=WHAT... [-- bench/run.sh options]
#   WHAT is a confab binary with the `bench` subcommand (a release build of some commit, or a
#   script that sets CONFAB_* variables and execs one), or peer:TARGET for a bench/run.sh
#   target such as peer:floor or peer:axum-broadcast:tuned.
# Example, this tree's build against an older one and the floor at W2's half load:
#   bench/ab.sh w2 /tmp/ab 3 new=target/release/confab old=/tmp/confab-old peer:floor \
#     -- --connections 5000 --rooms 500
# A LABEL without `=` is taken as peer:LABEL's label (`floor` above). Runs are interleaved (run
# 1 of every label, then run 2, ...) so that a noisy period of the machine does not fall on one
# build, and each takes the lock /tmp/confab-bench.lock, so two comparisons never overlap.
# Prints, per label: CPU per delivery (median and each run), p99 per run (as read, and at
# arrival: to the kernel's receive timestamp, without the generator's delay), lost deliveries, how
# late the generator's own runtime got at worst in each run (a p99 near it is partly its) and
# the cores it used, the share of the window the most robbed CPU was stolen by other guests of
# a virtual machine, and RSS per connection (W3), acked/s (W4) or time until all caught up (W5)
# where they apply, the size of confab's WAL at the end of each run (past 64 MiB for long,
# checkpoints fell behind), and whether the generator was saturated in any run (its figures are
# then lower bounds). Then, for every other label, its CPU per delivery against one label's
# (AB_AGAINST, default the last one) run by run: the ratio within each pair of runs taken one
# after the other, and their median, which a host that drifts during the set moves less than
# the ratio of the two medians.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ $# -ge 4 ] || { sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2; exit 2; }
WORKLOAD=$1 OUT=$2 RUNS=$3
shift 3
LABELS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do LABELS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
command -v jq >/dev/null || { echo "ab.sh: needs jq" >&2; exit 2; }

# Sets `label` and `what` for one LABEL=WHAT, peer:TARGET or bare TARGET argument.
parse_entry() {
    case $1 in
        *=*) label=${1%%=*} what=${1#*=} ;;
        peer:*) what=$1 label=${1#peer:} label=${label//:/-} ;;
        *) what=peer:$1 label=${1//:/-} ;;
    esac
}

for run in $(seq 1 "$RUNS"); do
    for entry in "${LABELS[@]}"; do
        parse_entry "$entry"
        status=0
        if [[ $what == peer:* ]]; then
            flock /tmp/confab-bench.lock "$ROOT/bench/run.sh" "$WORKLOAD" "${what#peer:}" \
                --run "$run" --out "$OUT/$label" "$@" >/dev/null 2>&1 || status=$?
        else
            CONFAB_BIN=$(realpath "$what") flock /tmp/confab-bench.lock "$ROOT/bench/run.sh" \
                "$WORKLOAD" confab --run "$run" --out "$OUT/$label" "$@" >/dev/null 2>&1 || status=$?
        fi
        echo "run $run of $label: exit $status" >&2
    done
done

median='sort_by(.) | if length == 0 then null elif length % 2 == 1 then .[length / 2 | floor]
        else (.[length / 2 - 1] + .[length / 2]) / 2 end'
# Sets `files` to LABEL's results of the workload in OUT (none: empty).
results_of() {
    shopt -s nullglob
    files=("$OUT/$1/$WORKLOAD"-*.json)
    shopt -u nullglob
}

for entry in "${LABELS[@]}"; do
    parse_entry "$entry"
    results_of "$label"
    [ ${#files[@]} -gt 0 ] || { echo "$label: no results"; continue; }
    jq -rs --arg name "$label" "
        def median: $median;
        def r(n): if . == null then \"-\" else (. * pow(10; n) | round / pow(10; n) | tostring) end;
        [.[] | .server.cpu_us_per_delivery | select(. != null)] as \$cpu
        | \"\(\$name): \(length) runs\"
          + (if (\$cpu | length) > 0 then
               \", µs/delivery \(\$cpu | median | r(2)) [\(\$cpu | map(r(2)) | join(\" \"))]\" else \"\" end)
          + (if .[0].mode != \"idle\" then
               \", p99 ms [\(map(.latency_us.p99 / 1000 | r(1)) | join(\" \"))]\" else \"\" end)
          + (if .[0].mode != \"idle\" and .[0].arrival_latency_us != null then
               \", at arrival [\(map(.arrival_latency_us.p99 / 1000 | r(1)) | join(\" \"))]\" else \"\" end)
          + \", lost [\(map(.lost | tostring) | join(\" \"))]\"
          + (if .[0].mode != \"idle\" and .[0].generator.max_late_ms != null then
               \", generator late ms [\(map(.generator.max_late_ms | r(0)) | join(\" \"))]\" else \"\" end)
          + (if .[0].generator.cores_used != null then
               \", generator cores [\(map(.generator.cores_used | r(2)) | join(\" \"))]\" else \"\" end)
          + (if .[0].host.steal_by_cpu != null then
               \", steal % [\(map(.host.steal_by_cpu | max * 100 | r(1)) | join(\" \"))]\" else \"\" end)
          + (if .[0].mode == \"idle\" then
               \", KiB/conn \(map(.server.rss_kib_per_connection) | median | r(2)), handshakes/s \(map(.handshakes_per_s) | median | r(0))\"
             else \"\" end)
          + (if .[0].durable != null then
               \", acked/s \(map(.durable.acked_per_s) | median | r(0)) [\(map(.durable.acked_per_s | r(0)) | join(\" \"))]\" else \"\" end)
          + (if .[0].resume != null then
               \", all caught up ms [\(map(.resume.all_caught_up_ms | r(0)) | join(\" \"))], gaps \(map(.resume.gaps) | add), duplicates \(map(.resume.duplicates) | add)\" else \"\" end)
          + (if .[0].driver.wal_bytes != null then
               \", WAL MiB at the end [\(map(.driver.wal_bytes / 1048576 | r(0)) | join(\" \"))]\" else \"\" end)
          + (if any(.[]; .generator.saturated) then \", generator saturated\" else \"\" end)
    " "${files[@]}"
done

# Run by run against one label: each run's ratio to the same run of AB_AGAINST.
[ ${#LABELS[@]} -ge 2 ] || exit 0
parse_entry "${LABELS[-1]}"
against=${AB_AGAINST:-$label}
results_of "$against"
against_files=("${files[@]}")
[ ${#against_files[@]} -gt 0 ] || exit 0
for entry in "${LABELS[@]}"; do
    parse_entry "$entry"
    [ "$label" != "$against" ] || continue
    results_of "$label"
    [ ${#files[@]} -gt 0 ] || continue
    jq -rn --arg name "$label" --arg against "$against" \
        --slurpfile these <(cat "${files[@]}") --slurpfile those <(cat "${against_files[@]}") "
        def median: $median;
        def cpu_by_run: map(select(.server.cpu_us_per_delivery != null)
            | {key: (.driver.run | tostring), value: .server.cpu_us_per_delivery}) | from_entries;
        (\$these | cpu_by_run) as \$mine | (\$those | cpu_by_run) as \$theirs
        | [\$mine | keys[] | select(\$theirs[.] != null) | {run: ., ratio: (\$mine[.] / \$theirs[.])}]
          | sort_by(.run | tonumber)
        | if length == 0 then empty else
            \"\(\$name) against \(\$against), run by run: \(map(.ratio * 100 | round / 100 | tostring)
              | join(\" \")), median \(map(.ratio) | median * 100 | round / 100)x\" end
    "
done
