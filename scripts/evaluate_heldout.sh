#!/usr/bin/env bash
# Evaluate the shipped model and the classical baselines on the TRAINING split's labels, with
# the post-processing tuned on the validation split (nothing is re-tuned here).
#   scripts/evaluate_heldout.sh DATASET_DIR [EVAL_ROOT]     (default EVAL_ROOT=bundle/eval/heldout_train)
# Training is self-supervised and tuning uses the validation labels only, so the 19 training
# images' labels are untouched by every choice made for these rows: the table shows how much of
# the validation margin is tuning on the validation images. (The network has seen these images,
# without labels; the classical baselines have seen nothing.)
set -euo pipefail
DATA=${1:?usage: scripts/evaluate_heldout.sh DATASET_DIR [EVAL_ROOT]}
EVAL_ROOT=${2:-bundle/eval/heldout_train}
C=bundle/configs
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-}:$(pwd)
# shellcheck source=scripts/bundle_evaluate.sh
. "$(dirname "$0")/bundle_evaluate.sh"
for b in hematoxylin_otsu hematoxylin_local; do
  [ -f "$C/baselines/${b}_tuned.json" ] || { echo "$C/baselines/${b}_tuned.json: not found; tune it on validation first (scripts/evaluate_all.sh)" >&2; exit 1; }
done
held=(--eval_split train --write_overlays false)
bundle_evaluate "$EVAL_ROOT/model" model -- "${held[@]}"
bundle_evaluate "$EVAL_ROOT/model_paper_postprocess" model_paper_postprocess -- "${held[@]}" --eval#tuned "{}"
for b in hematoxylin_otsu hematoxylin_local; do
  bundle_evaluate "$EVAL_ROOT/$b" "$b" "$C/baselines/$b.json" -- "${held[@]}"
  bundle_evaluate "$EVAL_ROOT/${b}_tuned" "${b}_tuned" "$C/baselines/$b.json" "$C/baselines/${b}_tuned.json" -- "${held[@]}"
done
$PY scripts/results_table.py --eval_root "$EVAL_ROOT" --paper false
