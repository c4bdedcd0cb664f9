#!/usr/bin/env bash
# A same-budget ablation study of the recipe in train.json (paper Table 1, M_-smooth / M_-equiv / M_-sparse):
# the recipe itself ("control") and each ablation are trained for the same budget (one epoch of ITERATIONS
# iterations, seed 0), then evaluated on the validation split with fixed post-processing, the same for every
# row (not tuned per row, so that the rows differ by their training only):
#   - the paper's post-processing (threshold 0.5 at the training slope, sigma 1, footprint 7), into
#     bundle/eval/budget<ITERATIONS>_paper_postprocess/<name>/;
#   - the tuned post-processing stored in REFERENCE_MODEL, into
#     bundle/eval/budget<ITERATIONS>_reference_postprocess/<name>/.
# REFERENCE_MODEL itself is evaluated the same way, as the row $REFERENCE_NAME (default "reference").
#   scripts/ablation_study.sh DATASET_DIR [ITERATIONS [REFERENCE_MODEL]]
# Defaults: ITERATIONS 60 (the shipped recipe's budget), REFERENCE_MODEL bundle/models/model.pt.
# Runs go to $RUNS_ROOT/b<ITERATIONS>_<name>/ (default RUNS_ROOT=bundle/runs); VARIANTS="control minus_sparse"
# picks some; TTA=true evaluates with test-time augmentation (default false: 8x cheaper on a CPU).
# Then it prints both tables (scripts/results_table.py --eval_root ... --paper false).
set -euo pipefail
DATA=${1:?usage: scripts/ablation_study.sh DATASET_DIR [ITERATIONS [REFERENCE_MODEL]]}
N=${2:-60}
REFERENCE=${3:-bundle/models/model.pt}
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "ITERATIONS=$N: a positive whole number of training iterations" >&2; exit 2; }
[ -f "$REFERENCE" ] || { echo "REFERENCE_MODEL $REFERENCE: not found (a model.pt with tuned post-processing)" >&2; exit 2; }
C=bundle/configs
PY=${PYTHON:-python}
RUNS_ROOT=${RUNS_ROOT:-bundle/runs}
VARIANTS=${VARIANTS:-control minus_smooth minus_equiv minus_sparse}
REFERENCE_NAME=${REFERENCE_NAME:-reference}
TTA=${TTA:-false}
PAPER=bundle/eval/budget${N}_paper_postprocess
FIXED=bundle/eval/budget${N}_reference_postprocess
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
for v in $VARIANTS; do
  [ "$v" = control ] || [ -f "$C/ablations/$v.json" ] || { echo "VARIANTS: $v is neither control nor $C/ablations/$v.json" >&2; exit 2; }
done
mkdir -p "$RUNS_ROOT"
# the reference model's tuned post-processing as an evaluation override (eval#tuned)
pp=$RUNS_ROOT/budget${N}_reference_postprocess.json
$PY -c "import json, sys, torch; s = torch.load(sys.argv[1], map_location='cpu', weights_only=False); \
pp = s.get('_extra_state', {}).get('postprocess') if isinstance(s, dict) else None; \
sys.exit(sys.argv[1] + ': stores no tuned post-processing (scripts/tune_postprocess.py --write_model)') if not pp else \
json.dump({'eval#tuned': pp}, open(sys.argv[2], 'w'), indent=1)" "$REFERENCE" "$pp"
evaluate() {  # evaluate NAME CHECKPOINT
  local files="'$C/train.json','$C/evaluate.json'"
  $PY -m monai.bundle run evaluating --config_file "[$files]" --dataset_dir "$DATA" --download false --method "$1" \
      --checkpoint "$2" --tta "$TTA" --eval_dir "$PAPER/$1" --eval#tuned "{}"
  $PY -m monai.bundle run evaluating --config_file "[$files,'$pp']" --dataset_dir "$DATA" --download false --method "$1" \
      --checkpoint "$2" --tta "$TTA" --eval_dir "$FIXED/$1"
}
for v in $VARIANTS; do
  out=$RUNS_ROOT/b${N}_$v; files="'$C/train.json'"; [ "$v" = control ] || files="$files,'$C/ablations/$v.json'"
  echo "== $v: train $N iterations into $out ($(date -u +%T))"
  $PY -m monai.bundle run training --config_file "[$files]" --dataset_dir "$DATA" --download false \
      --epochs 1 --iterations_per_epoch "$N" --output_dir "$out" --model_path "$out/model.pt"
  evaluate "$v" "$out/model.pt"
done
evaluate "$REFERENCE_NAME" "$REFERENCE"
for root in "$PAPER" "$FIXED"; do $PY scripts/results_table.py --eval_root "$root" --paper false; done
