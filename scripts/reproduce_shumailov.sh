#!/usr/bin/env bash
# Shumailov et al. (Nature 2024) at small scale: blocks prompt mode (every 64-token block of the
# training set continued by 64 tokens), 10 models (generation 0 on real data, then 1-9), SEEDS seeds
# with ancestral sampling at temperature 1 for (a) no real data preserved (replace) and (b) 10 % of
# the real blocks preserved (keep-real), and one seed with beam search of width 5, as the paper: with
# the repetition penalty 3.0 that their code passes (rp3.0), and without it (rp1.0).
#
#   scripts/reproduce_shumailov.sh [OUT]        # default OUT: experiments/shumailov
#   SEEDS=3 GENERATIONS=10 BEAM_REGIMES="replace keep-real" BEAM_PENALTIES="3.0 1.0" PRESET=shumailov
#   DEVICE=cpu (the defaults)
#
# The default preset is the paper's protocol: every generation fine-tuned from one pretrained base
# (pretrained once into checkpoints/bases/ and shared by every run here). PRESET=lab reruns the
# from-scratch version of the earlier EXPERIMENTS.md.
PRESET=${PRESET:-shumailov}
source "$(dirname "$0")/experiment_lib.sh"
OUT=${1:-experiments/shumailov}
BEAM_REGIMES=${BEAM_REGIMES:-replace keep-real}
BEAM_PENALTIES=${BEAM_PENALTIES:-3.0 1.0}
# Sampling at temperature 1, both regimes, SEEDS seeds; then beam search, one seed.
sweep "$OUT" --regime replace,keep-real
SEEDS=1 sweep "$OUT" --regime "${BEAM_REGIMES// /,}" --grid sample.beam=5 \
  --grid "sample.repetition_penalty=${BEAM_PENALTIES// /,}"
"$LAB" compare "$OUT"/*-seed*/ --out "$OUT/compare"
publish shumailov "$OUT/compare" "$OUT/t1-p1-replace-seed0" "$OUT/t1-p1-keep-real-seed0"
