#!/usr/bin/env bash
# Gerstgrasser et al. (2024): replace vs accumulate (plus Kazdan et al.'s accumulate-subsample), at
# Gerstgrasser's two sampling temperatures, 1.0 and 0.3, free generation (each sequence sampled from
# the end-of-text token), fresh initialisation every generation, SEEDS seeds.
#
#   scripts/replace_vs_accumulate.sh [OUT]      # default OUT: experiments/replace-vs-accumulate
#   SEEDS=3 GENERATIONS=10 TEMPERATURES="1.0 0.3" PROMPT_MODE=free PRESET=lab DEVICE=cpu (the defaults)
source "$(dirname "$0")/experiment_lib.sh"
OUT=${1:-experiments/replace-vs-accumulate}
TEMPERATURES=${TEMPERATURES:-1.0 0.3}
PROMPT_MODE=${PROMPT_MODE:-free}
runs=()
for t in $TEMPERATURES; do
  for regime in replace accumulate accumulate-subsample; do
    for seed in $(seq 0 $((SEEDS - 1))); do
      dir=$OUT/t$t-$regime-seed$seed
      run_or_resume "$dir" --regime "$regime" --temperature "$t" --prompt-mode "$PROMPT_MODE" --seed "$seed"
      runs+=("$dir")
    done
  done
done
"$LAB" compare "${runs[@]}" --out "$OUT/compare"
publish replace-vs-accumulate "$OUT/compare" "$OUT/t1.0-replace-seed0" "$OUT/t1.0-accumulate-seed0"
