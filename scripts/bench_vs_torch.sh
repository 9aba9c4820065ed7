#!/usr/bin/env bash
# The lab's training step and sampler against the PyTorch peer (../shared/bench/torch_gpt.py) on this
# machine, 2 threads each, alternating in one run, and the ratios of their medians:
#   fp32 vs eager, fp32 vs torch.compile, bf16 vs compile + bf16 autocast (training, config A and B);
#   sampling (config A, 64 prompts × 64 + 64 new) fp32 vs eager, bf16 vs eager bf16.
# The machine's kind (lscpu model name, SIMD flags) and the lab's kernels head the output.
#
#   scripts/bench_vs_torch.sh
#   TORCH_PY=~/torch-peer/bin/python ROUNDS=3 scripts/bench_vs_torch.sh
#
# Set-up of the peer (once per machine, ~5 GB):
#   python3 -m venv ~/torch-peer && ~/torch-peer/bin/pip install torch numpy
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PY=${TORCH_PY:-$HOME/torch-peer/bin/python}
PEER=${PEER:-../shared/bench/torch_gpt.py}
ROUNDS=${ROUNDS:-1}
export RAYON_NUM_THREADS=2
if ! "$TORCH_PY" -c 'import torch' 2>/dev/null; then
  echo "PyTorch peer not found at $TORCH_PY." >&2
  echo "Set it up once with: python3 -m venv ~/torch-peer && ~/torch-peer/bin/pip install torch numpy" >&2
  echo "(or point TORCH_PY at a python that has torch)" >&2
  exit 1
fi
[ -f "$PEER" ] || { echo "torch_gpt.py not found at $PEER (set PEER=path)" >&2; exit 1; }
cargo build --release --quiet
LAB=target/release/collapse-lab
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) CPUs; SIMD: $(grep -o -w -E 'avx2|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "lab: $($LAB bench --config B --iters 1 --warmup 0 | head -1)"
echo "peer: PyTorch $("$TORCH_PY" -c 'import torch; print(torch.__version__)')"
# bf16 rows only where the lab can run bf16 (AVX512-BF16 or AMX-BF16); elsewhere say why and skip them.
if bf16_err=$($LAB bench --config B --iters 1 --warmup 0 --precision bf16 2>&1 >/dev/null); then
  BF16=1
else
  BF16=0
  echo "bf16: skipped on this machine (${bf16_err#error: })"
fi
out=$(mktemp)
peer() { "$TORCH_PY" "$PEER" "$@" --threads 2 | sed -n 's/^RESULT //p'; }
for round in $(seq "$ROUNDS"); do
  for cfg in A B; do
    flags=(--config A); [ $cfg = B ] && flags=(--vocab 4096 --ctx 64 --d 128 --layers 2 --heads 4 --batch 32)
    echo "round $round: train config $cfg" >&2
    echo "lab-fp32 train $cfg $($LAB bench --config $cfg --mode train --json | sed -n 's/^RESULT //p')" >>"$out"
    if [ $BF16 = 1 ]; then echo "lab-bf16 train $cfg $($LAB bench --config $cfg --mode train --precision bf16 --json | sed -n 's/^RESULT //p')" >>"$out"; fi
    echo "eager train $cfg $(peer train "${flags[@]}")" >>"$out"
    echo "compile train $cfg $(peer train "${flags[@]}" --compile)" >>"$out"
    if [ $BF16 = 1 ]; then echo "compile-bf16 train $cfg $(peer train "${flags[@]}" --compile --bf16)" >>"$out"; fi
  done
  echo "round $round: sample config A" >&2
  echo "lab-fp32 sample A $($LAB bench --config A --mode sample --json | sed -n 's/^RESULT //p')" >>"$out"
  if [ $BF16 = 1 ]; then echo "lab-bf16 sample A $($LAB bench --config A --mode sample --precision bf16 --json | sed -n 's/^RESULT //p')" >>"$out"; fi
  echo "eager sample A $(peer sample --config A --prompts 64 --prompt-len 64 --new 64)" >>"$out"
  if [ $BF16 = 1 ]; then echo "eager-bf16 sample A $(peer sample --config A --prompts 64 --prompt-len 64 --new 64 --bf16)" >>"$out"; fi
done
python3 - "$out" "$ROUNDS" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    who, mode, cfg, js = line.split(" ", 3)
    if not js.strip():
        print(f"no result from {who} ({mode} config {cfg}): see its error above", file=sys.stderr)
        continue
    r = json.loads(js)
    rows.setdefault((mode, cfg), {}).setdefault(who, []).append(r["tokens_per_s"] if mode == "train" else r["new_tokens_per_s"])
med = lambda v: statistics.median(v)
print(f"\nmedians of {sys.argv[2]} round(s); tokens/s (training) and new tokens/s (sampling)\n")
print("| work | lab | PyTorch | ratio |")
print("| --- | --- | --- | --- |")
pairs = {"train": [("lab-fp32", "eager", "fp32 vs eager"), ("lab-fp32", "compile", "fp32 vs compile"),
                   ("lab-bf16", "compile-bf16", "bf16 vs compile + bf16")],
         "sample": [("lab-fp32", "eager", "fp32 vs eager"), ("lab-bf16", "eager-bf16", "bf16 vs eager bf16")]}
for (mode, cfg), v in rows.items():
    for lab, peer, what in pairs[mode]:
        if lab in v and peer in v:
            a, b = med(v[lab]), med(v[peer])
            print(f"| {mode} config {cfg}, {what} | {a:,.0f} | {b:,.0f} | {a / b:.2f}x |")
if int(sys.argv[2]) > 1:
    # Each round's ratio (lab and peer of the same round), to show how steady the medians are.
    print("\nround by round (lab / PyTorch of the same round):\n")
    for (mode, cfg), v in rows.items():
        for lab, peer, what in pairs[mode]:
            if lab in v and peer in v:
                rs = ", ".join(f"{a / b:.2f}" for a, b in zip(v[lab], v[peer]))
                print(f"- {mode} config {cfg}, {what}: {rs}")
PY
rm -f "$out"
