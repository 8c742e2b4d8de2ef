#!/bin/bash
# Generation metrics of the Penn Treebank rows (the TRACE paper's table 2 columns): each finished
# run runs/ptb-ROW (from benchmarks/ptb_rows.sh) samples 1,000 texts with top-k 50 as in the
# paper (latents from the prior; TRACE draws a new one at each [SEP]), seed 0, and they are
# scored against the 3,761 test sentences: n-gram JSD (our CND), BLEU, Self-BLEU, Dist-1..4,
# Jaccard, MAUVE (MiniLM features). Texts go to runs/ptb-ROW-samples.txt, scores to
# runs/ptb-ROW-diversity.json; finished parts are skipped.
#
#   bash benchmarks/ptb_diversity.sh lm trace-r trace-p ...
set -euo pipefail
cd "$(dirname "$0")/.."
TEXTVAE=${TEXTVAE:-.venv/bin/textvae}
NUM=${NUM:-1000}

for row in "$@"; do
  run=runs/ptb-$row
  if [ ! -f "$run/model.safetensors" ]; then
    echo "$run is not trained yet (benchmarks/ptb_rows.sh $row)" >&2
    exit 2
  fi
  if [ ! -f "$run-samples.txt" ]; then
    "$TEXTVAE" generate "$run" --num "$NUM" --decoding top-k --top-k 50 --seed 0 --out "$run-samples.txt.part"
    mv "$run-samples.txt.part" "$run-samples.txt"
  fi
  if [ ! -f "$run-diversity.json" ]; then
    "$TEXTVAE" score "$run-samples.txt" --refs ../shared/data/ptb/test.txt --json "$run-diversity.json"
  fi
done
