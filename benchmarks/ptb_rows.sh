#!/bin/bash
# The Penn Treebank rows of docs/results.md: one shared config (configs/ptb.yaml: gpt2-tiny,
# 2 epochs = 2,630 steps, batch 32, lr 1e-3, seed 0), one row per model setting.
# Each row trains to runs/ptb-ROW and evaluates the test split (IW-PPL with k = 100, bf16
# autocast, densities in float32) into runs/ptb-ROW-test.json; finished parts are skipped and
# an interrupted training run resumes from its last checkpoint.
#
#   bash benchmarks/ptb_rows.sh embed-constant embed-cyclical ...   (rows run one after another)
#   OMP_NUM_THREADS=1 bash benchmarks/ptb_rows.sh ... &   (two such lists side by side used the
#                                                          2 cores best: ~1.3x the throughput)
set -euo pipefail
cd "$(dirname "$0")/.."
TEXTVAE=${TEXTVAE:-.venv/bin/textvae}

row_args() {
  case "$1" in
    lm) echo "--model lm" ;;
    embed-constant|memory-constant|softmax-constant|optimus-constant|embed-cyclical|memory-cyclical|softmax-cyclical|optimus-cyclical)
      echo "--model ${1%-*} --set kl.schedule=${1##*-}" ;;
    # the DELLA rows were measured before `state_norm` existed: raw per-layer states, as in the paper
    della-constant) echo "--model della --set model.state_norm=false --set kl.schedule=constant" ;;
    della-cyclical) echo "--model della --set model.state_norm=false --set kl.schedule=cyclical" ;;
    della-ltp) echo "--model della --set model.state_norm=false --set kl.schedule=cyclical --set model.fusion=add" ;;       # -LTP
    della-lw) echo "--model della --set model.state_norm=false --set kl.schedule=cyclical --set model.layerwise=false" ;;  # -LW
    della-separate) echo "--model della --set model.state_norm=false --set kl.schedule=cyclical --set model.independent=true" ;;
    # the DELLA paper as written: Eq. 9's product of sums, the released initialisation, x_l the first token's state
    della-paper) echo "--model della --set model.state_norm=false --set kl.schedule=cyclical --set model.ltp_form=paper --set model.ltp_init=random --set model.pooling=first" ;;
    della-klfirst) echo "--model della --set model.state_norm=false --set kl.schedule=cyclical --set model.kl_layers=first" ;;
    ind|cgd|norec) echo "--model $1 --set kl.schedule=cyclical" ;;  # segments of 10 tokens
    # the first TRACE rows: d_mu normalised alone, no shift (Theorem 1's floor; the default until the eq11 rows)
    trace-r|trace-p) echo "--model $1 --set kl.schedule=cyclical --set model.norm_over=mean --set model.norm_shift=zero" ;;
    trace-r-gamma1) echo "--model trace-r --set kl.schedule=cyclical --set model.norm_over=mean --set model.norm_shift=zero --set model.ln_gamma=1" ;;  # floor 16 nats, not 144
    # the TRACE paper's Eq. 11 as printed: one LayerNorm over [d_mu, log d_sigma^2], gamma 3 fixed,
    # beta learned (BN-VAE); its Table 5 ablations relative to it
    trace-r-eq11|trace-p-eq11) echo "--model ${1%-eq11} --set kl.schedule=cyclical --set model.norm_over=both --set model.norm_shift=learned" ;;
    trace-r-bn) echo "--model trace-r --set kl.schedule=cyclical --set model.posterior_norm=bn --set model.norm_over=both --set model.norm_shift=learned" ;;  # +BN
    trace-r-noln) echo "--model trace-r --set kl.schedule=cyclical --set model.posterior_norm=none" ;;  # -LN
    trace-r-norp) echo "--model trace-r --set kl.schedule=cyclical --set model.norm_over=both --set model.norm_shift=learned --set model.residual_posterior=false" ;;  # -RP
    *) echo "unknown row $1" >&2; return 2 ;;
  esac
}

for row in "$@"; do
  args=$(row_args "$row")
  run=runs/ptb-$row
  if [ ! -f "$run/model.safetensors" ]; then
    start=$(date +%s)
    if [ -f "$run/checkpoints/latest" ]; then  # an interrupted run continues exactly
      # shellcheck disable=SC2086
      "$TEXTVAE" train $args --config configs/ptb.yaml --out "$run" --resume >> "$run.log" 2>&1
    else
      # shellcheck disable=SC2086
      "$TEXTVAE" train $args --config configs/ptb.yaml --out "$run" --overwrite > "$run.log" 2>&1
    fi
    echo "train_seconds $(( $(date +%s) - start ))" >> "$run.log"
  fi
  if [ ! -f "$run-test.json" ]; then
    start=$(date +%s)
    "$TEXTVAE" evaluate "$run" --precision auto --json "$run-test.json" >> "$run.log" 2>&1
    echo "evaluate_seconds $(( $(date +%s) - start ))" >> "$run.log"
  fi
done
