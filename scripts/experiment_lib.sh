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

# sweep OUT FLAG...: `collapse-lab sweep` with the settings above (every run resumable; compare in OUT/compare).
sweep() {
  local out=$1
  shift
  "$LAB" sweep --preset "$PRESET" --generations "$GENERATIONS" --seeds "$SEEDS" --device "$DEVICE" --quiet \
    --out "$out" "$@"
}

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
  # The compared metrics, as the binary's registry lists them (`metrics --list`: key, unit, healthier, shown in).
  for key in $("$LAB" metrics --list | awk -F'\t' 'NR > 1 && $4 ~ /compare/ {print $1}'); do
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
