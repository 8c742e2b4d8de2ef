#!/bin/bash
# The conditional rows of docs/results.md: DATASET-MODEL with DATASET in quora (paraphrase) and
# cnndm (summarisation, small), MODEL in lm (plain seq2seq), embed, memory, softmax, della;
# wp (WritingPrompts stories on the pretrained SmolLM2: lm, della, trace-r) and quorasmol (Quora
# on SmolLM2, decoder-only with the question as prefix: lm, della);
# every row of a dataset shares its config (configs/DATASET.yaml) (one backbone, budget, seed 0; cyclical KL).
# Each row trains to runs/DATASET-MODEL and evaluates the test split: IW-PPL (k = 100, bf16 where native),
# KL, MI, AU, and 4 outputs per source decoded with the task's beam search, scored with
# BLEU against the reference, Rouge, BERTScore, Dist and per-source Self-BLEU / Jaccard;
# each example's numbers go to runs/ROW-test-examples.jsonl (for `textvae compare`).
# Finished parts are skipped; an interrupted training run resumes from its last checkpoint.
#
#   bash benchmarks/seq2seq_rows.sh quora-lm quora-della cnndm-della ...
set -euo pipefail
cd "$(dirname "$0")/.."
TEXTVAE=${TEXTVAE:-.venv/bin/textvae}

for row in "$@"; do
  dataset=${row%%-*} model=${row#*-}
  config=configs/$dataset.yaml
  iw_batch=20  # importance samples scored at a time
  batch=32  # texts per evaluation batch: the unit an interrupted evaluation resumes from
  case "$dataset" in
    quora) limit=48 sources=454 ;;   # every test source
    cnndm) limit=160 sources=46 ;;
    wp) limit=256 sources=29 config=configs/writingprompts.yaml iw_batch=5 batch=8 ;;  # 384-token texts: bounded
      # memory; batches of 8 stories, so that a session's end loses at most one (wp-lm and wp-della ran in one of 32)
    quorasmol) limit=48 sources=454 config=configs/quora-smollm2.yaml ;;
    *) echo "unknown dataset in row $row" >&2; exit 2 ;;
  esac
  run=runs/$row
  extra=()  # row-specific flags; the PTB-era DELLA rows used raw per-layer states (no `state_norm`)
  [ "$model" = della ] && [ "$dataset" != wp ] && [ "$dataset" != quorasmol ] && extra=(--set model.state_norm=false)
  [ "$model" = trace-r ] && extra=(--set model.segment=sentence)  # the TRACE paper's WP segments
  if [ ! -f "$run/model.safetensors" ]; then
    start=$(date +%s)
    if [ -f "$run/checkpoints/latest" ]; then
      "$TEXTVAE" train --model "$model" --config "$config" --out "$run" --resume >> "$run.log" 2>&1
    else
      "$TEXTVAE" train --model "$model" "${extra[@]}" --config "$config" --out "$run" --overwrite > "$run.log" 2>&1
    fi
    echo "train_seconds $(( $(date +%s) - start ))" >> "$run.log"
  fi
  if [ ! -f "$run/eval_test.json" ]; then
    start=$(date +%s)
    "$TEXTVAE" evaluate "$run" --precision auto --batch-size "$batch" --iw-batch "$iw_batch" --generate "$sources" --samples-per-source 4 \
      --max-new-tokens "$limit" --samples-out "$run/samples_test.txt" \
      --per-example "$run-test-examples.jsonl" >> "$run.log" 2>&1
    echo "evaluate_seconds $(( $(date +%s) - start ))" >> "$run.log"
  fi
done
