#!/bin/bash
# The pretrained rows of docs/results.md: SmolLM2-135M on Penn Treebank, one budget for every
# row (configs/ptb-smollm2.yaml: 10,000 training sentences, one epoch, one cyclical-annealing
# period, LoRA r 8 over the frozen base, bf16 where the CPU has it natively, batch 8); `lm` is also run with full fine-tuning
# (lm-full). Each row trains to runs/smollm2-ROW, is evaluated on the first EXAMPLES (1,000)
# test sentences with k = 100 importance samples (runs/smollm2-ROW-test.json; each sentence's
# numbers in runs/smollm2-ROW-test-examples.jsonl for paired comparisons), then samples
# 1,000 texts with top-k 50 scored against the whole test split (runs/smollm2-ROW-diversity.json,
# texts in runs/smollm2-ROW-samples.txt; a copy in the run as generated_test.json, for
# `textvae report runs/smollm2-*`). Finished parts are skipped; an interrupted training
# run resumes from its last checkpoint. Wall times go to runs/smollm2-ROW.log.
# ROW-const (embed, memory, softmax, della) trains without annealing (constant beta = 1: the
# un-annealed rows of DELLA's Table 5) and is evaluated with k = 10 (what its claim is about,
# KL, MI and AU, does not depend on k), every other row with k = 100: k is the row's, so a
# restart cannot evaluate a row (or discard its progress) under another. IW_BATCH sets the
# samples scored in one decoder pass (default: evaluate's, sized to the batch; the rows
# evaluated before session 21 used 20, and an evaluation resumes only under the setting it
# started with). Every part runs in fp32: the rows are paired with the fp32 `lm`, and a row
# begun in fp32 is not resumed on a machine where `precision: auto` would pick bf16.
# A row already archived is skipped (FORCE=1 redoes what runs/ lacks and archives it again,
# its analyses redone); one queue at a time (a lock in runs/).
# What a report needs of each finished row (config, training log, test metrics with each
# sentence's scores, samples and their scores; no weights) is copied to
# docs/ptb-smollm2/rows/smollm2-ROW, which is committed: a lost runs/ folder (a new machine)
# then costs the checkpoints, not the paired comparisons, and `textvae report` runs on the
# copies. Beside them: for single-latent and DELLA rows each sentence's NLL with z fixed at the
# prior mean (fixed-z.jsonl, benchmarks/decoder_without_latent.py); for segment rows where their
# decoder loses against `lm` token by token (segment-boundary.txt,
# benchmarks/segment_boundary_cost.py, against runs/smollm2-lm or, when that is gone, the
# per-token NLLs the `lm` row kept as lm-token-nlls.jsonl).
#
#   bash benchmarks/smollm2_rows.sh della lm-full ...   # one row at a time on every core
set -euo pipefail
cd "$(dirname "$0")/.."
TEXTVAE=${TEXTVAE:-.venv/bin/textvae}
ARCHIVE=${ARCHIVE:-docs/ptb-smollm2/rows}
EXAMPLES=${EXAMPLES:-1000}
IW_BATCH=${IW_BATCH:+--iw-batch $IW_BATCH}
mkdir -p runs
exec {lock}> runs/smollm2-rows.lock
flock -n "$lock" || { echo "another smollm2_rows.sh queue is running (runs/smollm2-rows.lock)" >&2; exit 2; }
python="$(dirname "$TEXTVAE")/python"
native_bf16=$(grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo yes || echo no)

row_args() {
  case "$1" in
    lm-full) echo "--model lm --set backbone.adapter=none" ;;  # full fine-tuning: how far LoRA is from it
    lm|embed|memory|softmax|optimus|norec|della) echo "--model $1" ;;
    embed-const|memory-const|softmax-const|della-const) echo "--model ${1%-const} --set kl.schedule=constant" ;;
    ind|cgd|trace-r|trace-p) echo "--model $1 --set model.segment_length=10" ;;  # segments of 10 tokens, as the paper
    *) echo "unknown row $1" >&2; return 2 ;;
  esac
}

for row in "$@"; do
  args=$(row_args "$row")
  run=runs/smollm2-$row
  keep="$ARCHIVE/smollm2-$row"
  case "$row" in *-const) k=10 ;; *) k=100 ;; esac
  if [ -n "${IW_SAMPLES:-}" ] && [ "$IW_SAMPLES" != "$k" ]; then
    echo "IW_SAMPLES=$IW_SAMPLES, but row $row is evaluated with k = $k (unset IW_SAMPLES)" >&2; exit 2
  fi
  if [ -f "$keep/eval_test.json" ] && [ -z "${FORCE:-}" ]; then
    echo "row $row is archived in $keep: skipped (FORCE=1 redoes it)" >&2; continue
  fi
  if [ ! -f "$run/model.safetensors" ]; then
    start=$(date +%s)
    if [ -f "$run/checkpoints/latest" ]; then
      if [ "$native_bf16" = yes ] && grep -q 'precision: auto' "$run/config.yaml"; then
        echo "row $row began in fp32 under precision: auto; this CPU has native bf16, so resuming would switch" >&2; exit 2
      fi
      # --resume demands the run's own configuration, so pass the precision it was begun with.
      precision=$(sed -n 's/^ *precision: *\([a-z0-9]*\).*/\1/p' "$run/config.yaml" | head -n 1)
      # shellcheck disable=SC2086
      "$TEXTVAE" train $args --config configs/ptb-smollm2.yaml --set "train.precision=$precision" --out "$run" --resume \
        >> "$run.log" 2>&1
    else
      # shellcheck disable=SC2086
      "$TEXTVAE" train $args --config configs/ptb-smollm2.yaml --set train.precision=fp32 --out "$run" --overwrite \
        > "$run.log" 2>&1
    fi
    echo "train_seconds $(( $(date +%s) - start ))" >> "$run.log"
  fi
  if [ ! -f "$run-test.json" ] || [ ! -f "$run-test-examples.jsonl" ]; then
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$TEXTVAE" evaluate "$run" --examples "$EXAMPLES" --iw-samples "$k" $IW_BATCH --precision fp32 --json "$run-test.json" \
      --per-example "$run-test-examples.jsonl" >> "$run.log" 2>&1
    echo "evaluate_seconds $(( $(date +%s) - start ))" >> "$run.log"
  fi
  evaluated_k=$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["settings"]["iw_samples"])' "$run-test.json")
  if [ "$evaluated_k" != "$k" ] && [ "$evaluated_k" != None ]; then  # None: an LM's likelihood is exact
    echo "$run-test.json was evaluated with k = $evaluated_k, row $row takes k = $k: move it aside and run again" >&2; exit 2
  fi
  if [ ! -f "$run-diversity.json" ]; then
    start=$(date +%s)
    "$TEXTVAE" generate "$run" --num 1000 --decoding top-k --top-k 50 --seed 0 --out "$run-samples.txt" >> "$run.log" 2>&1
    "$TEXTVAE" score "$run-samples.txt" --refs ../shared/data/ptb/test.txt --json "$run-diversity.json" >> "$run.log" 2>&1
    echo "generate_seconds $(( $(date +%s) - start ))" >> "$run.log"
  fi
  cp "$run-diversity.json" "$run/generated_test.json"  # where `textvae report` reads it
  mkdir -p "$keep"
  rm -f "$keep/fixed-z.jsonl" "$keep/segment-boundary.txt" "$keep/lm-token-nlls.jsonl"  # of an older model, if any
  for name in config.yaml metrics.jsonl generated_test.json; do
    cp "$run/$name" "$keep/$name"
  done
  cp "$run-test-examples.jsonl" "$keep/eval_test.examples.jsonl"
  cp "$run-samples.txt" "$keep/samples.txt"
  grep '_seconds' "$run.log" > "$keep/seconds.txt" || true  # wall times of the starts that finished (a killed start logs none)
  # the analyses below report their failure in the log and let the queue go on
  case "$row" in
    lm)  # its exact per-token NLLs, which the segment rows are set against (runs/ may be gone by then)
      if [ ! -f "$keep/lm-token-nlls.jsonl" ]; then
        "$python" benchmarks/segment_boundary_cost.py "$run" --save-lm "$keep/lm-token-nlls.jsonl" --examples "$EXAMPLES" --precision fp32 \
          >> "$run.log" 2>&1 || echo "lm-token-nlls failed" >> "$run.log"
      fi ;;
    embed*|memory*|softmax*|optimus|della*)  # the decoder with z at the prior mean: what the latent adds
      if [ ! -f "$keep/fixed-z.jsonl" ]; then
        "$python" benchmarks/decoder_without_latent.py "$run" --examples "$EXAMPLES" --latent prior-mean \
          --precision fp32 --per-example runs/fixed-z >> "$run.log" 2>&1 \
          && cp "runs/fixed-z/smollm2-$row.jsonl" "$keep/fixed-z.jsonl" || echo "fixed-z failed" >> "$run.log"
      fi ;;
    ind|cgd|trace-r|trace-p)  # where the decoder given z loses against the LM, [SEP] by [SEP]
      if [ ! -f "$keep/segment-boundary.txt" ]; then
        lm=runs/smollm2-lm; [ -f "$lm/model.safetensors" ] || lm="$ARCHIVE/smollm2-lm/lm-token-nlls.jsonl"
        "$python" benchmarks/segment_boundary_cost.py "$run" "$lm" --examples "$EXAMPLES" --precision fp32 > "$keep/segment-boundary.txt.tmp" \
          2>> "$run.log" && mv "$keep/segment-boundary.txt.tmp" "$keep/segment-boundary.txt" \
          || echo "segment-boundary failed" >> "$run.log"
      fi ;;
  esac
  # last: its presence marks the row archived (from the file that marks the evaluation done;
  # the run's own record may be an older, more thorough one, kept beside a new one)
  cp "$run-test.json" "$keep/eval_test.json"
done
