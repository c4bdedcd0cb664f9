#!/usr/bin/env bash
# A same-budget ablation study of the recipe in train.json (paper Table 1, M_-smooth / M_-equiv / M_-sparse):
# the recipe itself ("control") and each ablation are trained for the same budget (one epoch of ITERATIONS
# iterations, seed $SEED (default 0)), then evaluated on the validation split with fixed post-processing, the same for every
# row (not tuned per row, so that the rows differ by their training only):
#   - the paper's post-processing (threshold 0.5 at the training slope, sigma 1, footprint 7), into
#     $EVAL_ROOT/budget<ITERATIONS>_paper_postprocess/<name>/ (EVAL_ROOT default bundle/runs/eval; results/ to refresh the committed tables);
#   - the tuned post-processing stored in REFERENCE_MODEL, into
#     $EVAL_ROOT/budget<ITERATIONS>_reference_postprocess/<name>/.
# REFERENCE_MODEL itself is evaluated the same way, as the row $REFERENCE_NAME (default "reference").
#   scripts/research/ablation_study.sh DATASET_DIR [ITERATIONS [REFERENCE_MODEL]]
# Defaults: ITERATIONS 60 (the shipped recipe's budget), REFERENCE_MODEL bundle/models/model.pt.
# Runs go to $RUNS_ROOT/b<ITERATIONS>_<name>/ (default RUNS_ROOT=bundle/runs); VARIANTS="control minus_sparse"
# picks some; TTA=true evaluates with test-time augmentation (default false: 8x cheaper on a CPU).
# SEED=1 trains seed replicas instead: runs b<ITERATIONS>_<name>_s1/, rows <name>_s1 under each table's replicas/
# (the reference model, already a row of seed 0, is not evaluated again).
# Then it prints both tables (scripts/results_table.py --eval_root ... --paper false), and the seed tables
# (--seeds) of the roots that hold replicas.
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
DATA=${1:?usage: scripts/research/ablation_study.sh DATASET_DIR [ITERATIONS [REFERENCE_MODEL]]}
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
SEED=${SEED:-0}
[[ $SEED =~ ^[0-9]+$ ]] || { echo "SEED=$SEED: a whole number >= 0" >&2; exit 2; }
tag=; replicas=; [ "$SEED" = 0 ] || { tag=_s$SEED; replicas=replicas/; }
EVAL_ROOT=${EVAL_ROOT:-bundle/runs/eval}
PAPER=$EVAL_ROOT/budget${N}_paper_postprocess
FIXED=$EVAL_ROOT/budget${N}_reference_postprocess
for v in $VARIANTS; do
  [ "$v" = control ] || [ -f "$C/ablations/$v.json" ] || { echo "VARIANTS: $v is neither control nor $C/ablations/$v.json" >&2; exit 2; }
done
mkdir -p "$RUNS_ROOT"
# the reference model's tuned post-processing as an evaluation override (eval#tuned)
pp=$RUNS_ROOT/budget${N}_reference_postprocess.json
$PY -c "import json, sys
from custom.atomic_write import write_atomic
from custom.model.checkpoint import stored_postprocess
try:
    pp = stored_postprocess(sys.argv[1])
except (OSError, ValueError) as e:
    print(f'REFERENCE_MODEL: {e}', file=sys.stderr)
    sys.exit(2)
write_atomic(sys.argv[2], lambda tmp: tmp.write_text(json.dumps({'eval#tuned': pp}, indent=1)))" "$REFERENCE" "$pp"
# shellcheck source=scripts/bundle_evaluate.sh
. "$(dirname "$0")/../bundle_evaluate.sh"
evaluate() {  # evaluate NAME CHECKPOINT (into [replicas/]NAME): with the paper's post-processing, then with the reference model's
  bundle_evaluate "$PAPER/$replicas$1" "$1" -- --checkpoint "$2" --tta "$TTA" --eval#tuned "{}"
  bundle_evaluate "$FIXED/$replicas$1" "$1" "$pp" -- --checkpoint "$2" --tta "$TTA"
}
for v in $VARIANTS; do
  out=$RUNS_ROOT/b${N}_$v$tag; files="'$C/train.json'"; [ "$v" = control ] || files="$files,'$C/ablations/$v.json'"
  echo "== $v$tag: train $N iterations (seed $SEED) into $out ($(date -u +%T))"
  $PY -m monai.bundle run training --config_file "[$files]" --dataset_dir "$DATA" --download false \
      --epochs 1 --iterations_per_epoch "$N" --seed "$SEED" --output_dir "$out" --model_path "$out/model.pt"
  evaluate "$v$tag" "$out/model.pt"
done
[ -n "$tag" ] || evaluate "$REFERENCE_NAME" "$REFERENCE"
for root in "$PAPER" "$FIXED"; do
  $PY scripts/results_table.py --eval_root "$root" --paper false
  if [ -d "$root/replicas" ]; then $PY scripts/results_table.py --seeds --eval_root "$root"; fi
done
