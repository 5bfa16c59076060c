#!/usr/bin/env bash
# Counts what user space executes between two KVM_RUNs, for the raw KVM
# loop and for nkvm's enter_guest, in the exit_roundtrip bench: every
# instruction, single-stepped under gdb (this host has no hardware
# performance counters). The exit path's cost on this host tracks these
# counts (docs/benchmarks.md, "Fifteenth session").
#
# Usage: scripts/exit-path-trace.sh [OUT_DIR]   (needs gdb; default OUT_DIR
# target/exit-path-trace). The full traces go to OUT_DIR/{raw,nkvm}.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/exit-path-trace}
mkdir -p "$out"
command -v gdb > /dev/null || { echo "exit-path-trace: needs gdb (apt-get install gdb)" >&2; exit 1; }
bench=$(cargo bench -p nkvm --bench exit_roundtrip --no-run --message-format=json 2> /dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "exit_roundtrip" and m.get("executable"):
        print(m["executable"])')
[ -x "$bench" ] || { echo "exit-path-trace: could not build the exit_roundtrip bench" >&2; exit 1; }
# With 100 exits a round, each path's warm-up makes 11 KVM_RUNs, raw first.
for kind in raw nkvm; do
    skip=5
    [ "$kind" = nkvm ] && skip=16
    PATH_KIND=$kind SKIP=$skip OUT="$out/$kind.txt" NKVM_BENCH_EXITS=100 NKVM_BENCH_ROUNDS=1 \
        timeout 600 gdb -q -batch -x scripts/exit-path-trace.py "$bench" 2>&1 | grep '^RESULT' | sed 's/^RESULT /  /'
done
