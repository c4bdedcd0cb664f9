#!/usr/bin/env bash
# Evaluate the shipped model and the classical baselines on the TRAINING split's labels, with
# the post-processing tuned on the validation split (nothing is re-tuned here).
#   scripts/evaluate_heldout.sh DATASET_DIR [EVAL_ROOT]     (default EVAL_ROOT=bundle/runs/eval/heldout_train;
#                                                             results/heldout_train: the committed summaries)
# Training is self-supervised and tuning uses the validation labels only, so the 19 training
# images' labels are untouched by every choice made for these rows: the table shows how much of
# the validation margin is tuning on the validation images. (The network has seen these images,
# without labels; the classical baselines have seen nothing.)
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
DATA=${1:?usage: scripts/evaluate_heldout.sh DATASET_DIR [EVAL_ROOT]}
EVAL_ROOT=${2:-bundle/runs/eval/heldout_train}
C=bundle/configs
PY=${PYTHON:-python}
# shellcheck source=scripts/bundle_evaluate.sh
. "$(dirname "$0")/bundle_evaluate.sh"
bundle_evaluate_rows "$EVAL_ROOT" --eval_split train --write_overlays false
$PY scripts/results_table.py --eval_root "$EVAL_ROOT" --paper false
