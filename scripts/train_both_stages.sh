#!/usr/bin/env bash
# Train the shipped model's two stages from scratch, without annotations:
#   1. F, the paper's attention network (train.json; about 10 min on 2 CPU cores),
#   2. its post-processing tuned on the validation images (tune_postprocess.py, stored in F's file),
#   3. the fast student distilled from F (distill.json), which takes over F's tau, stain target and
#      post-processing: the model that segment.py and inference.json use.
#   scripts/train_both_stages.sh DATASET_DIR [RUNS_DIR]     (default RUNS_DIR=bundle/runs)
# Writes RUNS_DIR/train/model.pt (F) and RUNS_DIR/distill/model.pt (the student), each with progress bars
# and ETA, and prints each step's wall time. The shipped bundle/models/ files are not touched: copy the
# student there, or pass it to scripts/segment.py --model.
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
DATA=${1:?usage: scripts/train_both_stages.sh DATASET_DIR [RUNS_DIR]}
RUNS=${2:-bundle/runs}
C=bundle/configs
PY=${PYTHON:-python}
start=$(date +%s)
step() { local name=$1; shift; local t=$(date +%s); "$@"; echo "== $name: $(( $(date +%s) - t )) s (total $(( $(date +%s) - start )) s)"; }
step "stage 1: F" $PY -m monai.bundle run training --config_file "$C/train.json" --dataset_dir "$DATA" --output_dir "$RUNS/train"
step "post-processing of F, tuned on validation" $PY scripts/tune_postprocess.py --dataset_dir "$DATA" \
    --checkpoint "$RUNS/train/model.pt" --r 1 --write_model --out_config "$RUNS/train/postprocess_tuned.json"
step "stage 2: the student" $PY -m monai.bundle run distilling --config_file "['$C/train.json','$C/distill.json']" \
    --dataset_dir "$DATA" --teacher_path "$RUNS/train/model.pt" --output_dir "$RUNS/distill"
echo "the student: $RUNS/distill/model.pt (python scripts/segment.py IMAGES --out DIR --model $RUNS/distill/model.pt)"
