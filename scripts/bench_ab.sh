#!/usr/bin/env bash
# Alternates `collapse-lab bench` between two or more builds, round after round, and prints each
# build's median tokens/s and its change against the first: how BENCHMARKS.md compares commits on
# one machine (a host's speed drifts over minutes, so builds are measured in turns, never one
# after the other in blocks).
#
#   scripts/bench_ab.sh ROUNDS BIN_A BIN_B [BIN...]
#   PRECISION=fp32 CONFIG=B ITERS=20 scripts/bench_ab.sh 10 /tmp/before /tmp/after
#
# Build each commit first and copy its binary (target/release/collapse-lab) somewhere; do not
# compile while this runs.
set -euo pipefail
if [ $# -lt 3 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: scripts/bench_ab.sh ROUNDS BIN_A BIN_B [BIN...] (ROUNDS a positive integer)" >&2
  exit 2
fi
rounds=$1
shift
for b in "$@"; do
  [ -x "$b" ] || { echo "scripts/bench_ab.sh: $b is not an executable collapse-lab build" >&2; exit 2; }
done
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for round in $(seq "$rounds"); do
  for i in $(seq $#); do
    b=${!i}
    r=$("$b" bench --config "${CONFIG:-A}" --precision "${PRECISION:-bf16}" --iters "${ITERS:-20}" --json |
      sed -n 's/^RESULT //p')
    [ -n "$r" ] || { echo "scripts/bench_ab.sh: no result from $b" >&2; exit 1; }
    echo "$i $r" >>"$out"
    echo "round $round: $b $(echo "$r" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["tokens_per_s"]))') tokens/s" >&2
  done
done
python3 - "$out" "$@" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    i, js = line.split(" ", 1)
    runs.setdefault(int(i), []).append(json.loads(js)["tokens_per_s"])
bins = sys.argv[2:]
first = statistics.median(runs[1])
print("| build | median tokens/s | min–max | vs the first |")
print("| --- | --- | --- | --- |")
for i, b in enumerate(bins, 1):
    v = runs[i]
    m = statistics.median(v)
    print(f"| {b} | {m:,.0f} | {min(v):,.0f}–{max(v):,.0f} | {(m / first - 1) * 100:+.1f} % |")
PY
