# Shared by the experiment scripts (sourced, not run): settings, one build, run-or-resume, and
# publishing a comparison's tables and plots under docs/.
#
# Settings (environment): PRESET (lab), SEEDS (3), GENERATIONS (10), DEVICE (cpu), DOCS (docs: where
# the tables and plots go), LAB (the binary; built here when unset). Every run is resumable: rerunning a script after an interruption, or with
# more SEEDS, continues where it stopped and keeps the finished runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PRESET=${PRESET:-lab}
SEEDS=${SEEDS:-3}
GENERATIONS=${GENERATIONS:-10}
DEVICE=${DEVICE:-cpu}
DOCS=${DOCS:-docs}
if [ -z "${LAB:-}" ]; then
  cargo build --release --quiet
  LAB=target/release/collapse-lab
fi
START=$(date +%s)

# run_or_resume DIR FLAG...: a finished run is kept, an interrupted one resumed, a new one started.
run_or_resume() {
  local dir=$1
  shift
  if [ -f "$dir/run.json" ]; then
    "$LAB" resume "$dir" --quiet --device "$DEVICE"
  else
    echo "== $dir"
    "$LAB" run --preset "$PRESET" --generations "$GENERATIONS" --device "$DEVICE" --quiet --out "$dir" "$@"
  fi
}

# publish NAME COMPARE_DIR [RUN_DIR...]: $DOCS/NAME/ gets compare.md, the comparison plots, each named
# run's Figure-1 histograms (gen0_seq_ppl-<run>.svg) and a provenance line.
publish() {
  local name=$1 cmp=$2 docs=$DOCS/$1
  shift 2
  mkdir -p "$docs"
  cp "$cmp/compare.md" "$docs/compare.md"
  for key in test_ppl test_ppl_rare ttr_at_n distinct_2 unigram_entropy rare_ngram_recall_1 \
    rare_ngram_recall_3 common_ngram_recall_1 gen0_seq_ppl_p5 gen0_seq_ppl_p95; do
    cp "$cmp/plots/compare_$key.svg" "$docs/"
  done
  for run in "$@"; do
    cp "$run/plots/gen0_seq_ppl.svg" "$docs/gen0_seq_ppl-$(basename "$run").svg"
  done
  echo "$(date -u +%FT%TZ) commit $(git rev-parse --short HEAD) preset=$PRESET seeds=$SEEDS" \
    "generations=$GENERATIONS device=$DEVICE wall_s=$(($(date +%s) - START)) (this invocation)" \
    >>"$docs/provenance.txt"
  echo "published $docs"
}
