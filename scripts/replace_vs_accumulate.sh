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
sweep "$OUT" --temperature "${TEMPERATURES// /,}" --regime replace,accumulate,accumulate-subsample \
  --set "recursion.prompt_mode=$PROMPT_MODE"
publish replace-vs-accumulate "$OUT/compare" "$OUT/t1-p1-replace-seed0" "$OUT/t1-p1-accumulate-seed0"
