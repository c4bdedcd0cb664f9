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
bundle_evaluate_rows "$EVAL_ROOT" --eval_split train --write_overlays false
$PY scripts/results_table.py --eval_root "$EVAL_ROOT" --paper false
