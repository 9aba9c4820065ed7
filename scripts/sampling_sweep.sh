#!/usr/bin/env bash
# Dohmatob et al. (2024), "A Tale of Tails": truncating the tail when sampling (temperature < 1,
# top-p < 1) should make rare n-grams vanish faster over the generations. A temperature × top-p grid
# under replace, blocks prompt mode, SEEDS seeds.
#
#   scripts/sampling_sweep.sh [OUT]             # default OUT: experiments/sampling-sweep
#   SEEDS=3 GENERATIONS=10 TEMPERATURES="1.0 0.7" TOP_PS="1.0 0.9" PRESET=lab DEVICE=cpu (the defaults)
source "$(dirname "$0")/experiment_lib.sh"
OUT=${1:-experiments/sampling-sweep}
TEMPERATURES=${TEMPERATURES:-1.0 0.7}
TOP_PS=${TOP_PS:-1.0 0.9}
sweep "$OUT" --temperature "${TEMPERATURES// /,}" --top-p "${TOP_PS// /,}" --regime replace
publish sampling-sweep "$OUT/compare" "$OUT/t1-p1-replace-seed0" "$OUT/t0.7-p0.9-replace-seed0"
