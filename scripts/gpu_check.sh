#!/usr/bin/env bash
# The CUDA checks, in one go, on a machine with an NVIDIA GPU:
#   1. the device tests (tests/device.rs: CUDA against CPU logits, a training step, sampling, dropout),
#   2. a smoke run on CUDA, twice, and whether the two give the same bytes,
#   3. `collapse-lab bench` of the paper preset's model on CUDA (training step, then sampling of
#      512 prompts × 64 tokens + 64 new), and of config A for scale.
#
#   scripts/gpu_check.sh [OUT_DIR]            # builds with --features cuda first
#
# On a machine without a Rust toolchain, build elsewhere (`cargo test --release --features cuda
# --no-run`) and point the script at the results: LAB=path/to/collapse-lab DEVICE_TESTS=path/to/
# the tests/device.rs binary (target/release/deps/device-*).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-check}
mkdir -p "$OUT"
if [ -z "${LAB:-}" ]; then
  cargo build --release --features cuda --quiet
  cargo test --release --features cuda --test device --no-run --quiet 2>/dev/null
  LAB=target/release/collapse-lab
  DEVICE_TESTS=$(ls -t target/release/deps/device-* | grep -v '\.d$' | head -1)
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== device tests (CPU and CUDA)"
"$DEVICE_TESTS" --test-threads 1 2>&1 | tee "$OUT/device-tests.txt"

echo "== smoke run on CUDA, twice"
rm -rf "$OUT/smoke-a" "$OUT/smoke-b"
TIME=(); [ -x /usr/bin/time ] && TIME=(/usr/bin/time -v)
start=$(date +%s%N)
"${TIME[@]}" "$LAB" run --preset smoke --device cuda --out "$OUT/smoke-a" --quiet 2>"$OUT/smoke-time.txt"
echo "smoke run on CUDA: $(( ($(date +%s%N) - start) / 1000000 )) ms wall"
"$LAB" run --preset smoke --device cuda --out "$OUT/smoke-b" --quiet >/dev/null
same=yes
for f in metrics.jsonl gen-00/corpus.jsonl gen-01/corpus.jsonl gen-02/corpus.jsonl gen-02/model.safetensors; do
  cmp -s "$OUT/smoke-a/$f" "$OUT/smoke-b/$f" || { same=no; echo "differs between the two CUDA runs: $f"; }
done
echo "two CUDA smoke runs byte-identical: $same" | tee "$OUT/smoke-determinism.txt"
grep -E "Elapsed|Maximum resident" "$OUT/smoke-time.txt" || true

echo "== bench on CUDA"
for cfg in paper A; do
  "$LAB" bench --config $cfg --mode train --device cuda --json | tee -a "$OUT/bench.txt"
done
"$LAB" bench --config paper --mode sample --prompts 512 --device cuda --json | tee -a "$OUT/bench.txt"
"$LAB" bench --config A --mode sample --prompts 64 --device cuda --json | tee -a "$OUT/bench.txt"
