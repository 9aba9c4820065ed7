#!/usr/bin/env bash
# Shumailov's theory in one dimension (milliseconds): fit a Gaussian to N samples, sample N from the
# fit, repeat; replace vs 10 % real kept vs accumulate, 8 seeds each, 200 generations.
#
#   scripts/toy_gaussian.sh                     # writes docs/toy-gaussian/
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${LAB:-}" ]; then
  cargo build --release --quiet
  LAB=target/release/collapse-lab
fi
DOCS=${DOCS:-docs}/toy-gaussian
mkdir -p "$DOCS"
for regime in replace keep-real accumulate; do
  "$LAB" toy gaussian --samples 100 --generations 200 --seeds 8 --regime "$regime" --out "$DOCS/$regime" \
    | grep -v '^wrote' | tee "$DOCS/$regime.txt"
done
