#!/bin/bash
# Everything docs/results.md quotes of a finished pretrained PTB row, from its committed copy
# (docs/ptb-smollm2/rows/smollm2-ROW, written by benchmarks/smollm2_rows.sh): the test metrics
# with their errors, the paired differences against the fp32 `lm` row (over the sentences both
# scored with the same tokens for segment-wise rows), for single-latent and DELLA rows the
# decoder with z at the prior mean against `lm` and the row's bound against that decoder,
# the sample metrics, and the wall times. Reading files only: seconds on any machine.
#
#   bash benchmarks/smollm2_row_summary.sh embed [REFERENCE_ROW]   # reference default: lm
set -euo pipefail
cd "$(dirname "$0")/.."
TEXTVAE=${TEXTVAE:-.venv/bin/textvae}
ARCHIVE=${ARCHIVE:-docs/ptb-smollm2/rows}
row=$ARCHIVE/smollm2-$1
reference=$ARCHIVE/smollm2-${2:-lm}
[ -d "$row" ] || { echo "no committed row $row" >&2; exit 2; }
case "$1" in
  ind|cgd|trace-r|trace-p) pairing=--same-tokens-only ;;  # [SEP]s truncate a few texts sooner
  *) pairing= ;;
esac

echo "## $1: test metrics ($row/eval_test.json)"
.venv/bin/python - "$row/eval_test.json" <<'EOF'
import json, sys
metrics = json.load(open(sys.argv[1]))
for key, value in metrics.items():
    if key.endswith("_stderr"):
        continue
    error = metrics.get(f"{key}_stderr")
    print(f"{key}: {value}" + ("" if error is None else f" ± {error}"))
EOF
.venv/bin/python - "$row/eval_test.json" "$reference/eval_test.json" <<'EOF'
import json, sys
row, reference = (json.load(open(path)).get("settings") or {} for path in sys.argv[1:])
if row.get("iw_samples") and reference.get("iw_samples") and row["iw_samples"] != reference["iw_samples"]:
    print(f"note: k = {row['iw_samples']} here, {reference['iw_samples']} in the reference: their bounds differ in tightness")
EOF
echo
echo "## $1 - ${2:-lm}, paired ($TEXTVAE compare $row/eval_test.examples.jsonl $reference/eval_test.examples.jsonl $pairing)"
$TEXTVAE compare "$row/eval_test.examples.jsonl" "$reference/eval_test.examples.jsonl" $pairing
if [ -f "$row/fixed-z.jsonl" ]; then
  echo
  echo "## the decoder with z at the prior mean - ${2:-lm} (fixed-z.jsonl)"
  $TEXTVAE compare "$row/fixed-z.jsonl" "$reference/eval_test.examples.jsonl"
  echo
  echo "## $1's bound - its decoder at the prior mean"
  $TEXTVAE compare "$row/eval_test.examples.jsonl" "$row/fixed-z.jsonl"
fi
if [ -f "$row/segment-boundary.txt" ]; then
  echo
  echo "## where the segment decoder loses to the LM (segment-boundary.txt)"
  cat "$row/segment-boundary.txt"
fi
echo
echo "## samples ($row/generated_test.json)"
cat "$row/generated_test.json"
echo
echo "## wall times, seconds ($row/seconds.txt)"
cat "$row/seconds.txt"
