#!/usr/bin/env bash
# The lab's training step and sampler against PyTorch eager (../shared/bench/torch_gpt.py), one after
# the other on this machine, 2 threads each, and the ratios of their medians.
#
#   scripts/bench_vs_torch.sh            # configs A and B (train), A (sample)
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
out=$(mktemp)
for round in $(seq "$ROUNDS"); do
  for cfg in A B; do
    echo "lab A/B train round $round config $cfg" >&2
    echo "lab train $cfg $($LAB bench --config $cfg --mode train --json | sed -n 's/^RESULT //p')" >>"$out"
    flags=(--config A); [ $cfg = B ] && flags=(--vocab 4096 --ctx 64 --d 128 --layers 2 --heads 4 --batch 32)
    echo "torch train $cfg $("$TORCH_PY" "$PEER" train "${flags[@]}" --threads 2 | sed -n 's/^RESULT //p')" >>"$out"
  done
  echo "lab sample A $($LAB bench --config A --mode sample --json | sed -n 's/^RESULT //p')" >>"$out"
  echo "torch sample A $("$TORCH_PY" "$PEER" sample --config A --prompts 64 --prompt-len 64 --new 64 --threads 2 | sed -n 's/^RESULT //p')" >>"$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    who, mode, cfg, js = line.split(" ", 3)
    r = json.loads(js)
    rows.setdefault((mode, cfg), {}).setdefault(who, []).append(r["tokens_per_s"] if mode == "train" else r["new_tokens_per_s"])
print("| work | collapse-lab | PyTorch eager | ratio |")
print("| --- | --- | --- | --- |")
for (mode, cfg), v in rows.items():
    lab, torch = statistics.median(v["lab"]), statistics.median(v["torch"])
    unit = "tokens/s" if mode == "train" else "new tokens/s"
    print(f"| {mode} config {cfg} ({unit}) | {lab:,.0f} | {torch:,.0f} | {lab / torch:.2f}x |")
PY
rm -f "$out"
