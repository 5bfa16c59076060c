#!/usr/bin/env bash
# Runs every nkvm benchmark NKVM_BENCH_RUNS times (default 3) and prints one
# table: each row's figure from every run, its target, and the verdict
# ("met" only when every run met it). Each bench compares against the raw
# KVM path (or the baseline it names) inside the same run, so the figures of
# one run are comparable even on a noisy host; the runs show how stable they
# are. Logs of every run are kept in $CARGO_TARGET_DIR/bench-all/.
#
#   scripts/bench-all.sh                       # everything, 3 runs
#   NKVM_BENCH_RUNS=1 scripts/bench-all.sh exit_roundtrip io_regions
#
# `exit_timing` is exit_roundtrip built with nkvm's `exit-timing` feature:
# only its row of user-space ticks per exit is kept.
#
# The table is Markdown, ready for docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."

runs=${NKVM_BENCH_RUNS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target}
jobs=${CARGO_BUILD_JOBS:-1}
logs=$CARGO_TARGET_DIR/bench-all
benches=("$@")
if [ ${#benches[@]} -eq 0 ]; then
    benches=(exit_roundtrip exit_timing io_regions interrupt_latency dirty_collect dirty_stall map_replace dirty_log_toggle)
fi

package() {
    case $1 in
        io_regions | interrupt_latency) echo nkvm-vmm ;;
        *) echo nkvm ;;
    esac
}

# The cargo arguments that run one bench.
cargo_args() {
    case $1 in
        exit_timing) echo "-p nkvm --features exit-timing --bench exit_roundtrip" ;;
        *) echo "-p $(package "$1") --bench $1" ;;
    esac
}

mkdir -p "$logs"
rm -f "$logs"/*.log
cargo bench -j"$jobs" --no-run -p nkvm -p nkvm-vmm >&2
if [[ " ${benches[*]} " == *" exit_timing "* ]]; then
    cargo bench -j"$jobs" --no-run -p nkvm --features exit-timing --bench exit_roundtrip >&2
fi
for run in $(seq 1 "$runs"); do
    for bench in "${benches[@]}"; do
        echo "== run $run/$runs: $bench" >&2
        log=$logs/$bench.$run.log
        # shellcheck disable=SC2046 # the arguments are words
        if ! cargo bench -q -j"$jobs" $(cargo_args "$bench") >"$log" 2>&1; then
            echo "result|$bench: FAILED (see $log)|-|-|failed" >>"$log"
        fi
        if [ "$bench" = exit_timing ]; then
            sed -i '/^result|/{/(exit-timing)\|: FAILED/!d}' "$log"
        fi
        grep -v '^result|' "$log" >&2 || true
    done
done

echo
echo "nkvm benchmarks, $runs run(s), $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) CPUs, $(uname -r)"
echo
for run in $(seq 1 "$runs"); do
    for bench in "${benches[@]}"; do
        grep '^result|' "$logs/$bench.$run.log" | sed "s/^/$run|/" || true
    done
done | awk -F'|' -v runs="$runs" '
    {
        row = $3
        if (!(row in seen)) { seen[row] = 1; order[++n] = row }
        fig[row, $1] = $4
        target[row] = $5
        v = $6
        if (v == "met") met[row]++
        else if (v == "info") info[row] = 1
        else if (v != "") bad[row]++
    }
    END {
        printf "| bench |"
        for (r = 1; r <= runs; r++) printf " run %d |", r
        printf " target | verdict |\n|---|"
        for (r = 1; r <= runs; r++) printf "---|"
        printf "---|---|\n"
        for (i = 1; i <= n; i++) {
            row = order[i]
            printf "| %s |", row
            for (r = 1; r <= runs; r++) printf " %s |", ((row, r) in fig) ? fig[row, r] : "-"
            if (info[row]) verdict = "-"
            else if (bad[row] == 0) verdict = "**met**"
            else if (met[row] > 0) verdict = sprintf("met %d/%d", met[row], met[row] + bad[row])
            else verdict = "**not met**"
            printf " %s | %s |\n", target[row], verdict
        }
    }'
