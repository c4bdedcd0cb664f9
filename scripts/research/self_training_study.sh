#!/usr/bin/env bash
# Issue 29's study: the self-trained student (selftrain.json: stage 1's confident pseudo-instances,
# strong augmentation) for each seed of $SEEDS (default "0 1 2"), each with its post-processing tuned on
# the validation split, evaluated on the validation labels and on the training split's labels (which no
# choice reads), beside the rows it must beat.
#   scripts/research/self_training_study.sh DATASET_DIR [OVERRIDE...]
# OVERRIDEs go to every self-training run (e.g. --selftrain_epochs 5, --teacher_path R1/model.pt for a
# round 2). Runs: $RUNS/student_s<seed>/ (default RUNS=bundle/runs/selftrain_study); the teacher's
# pseudo-instances are cached once in $RUNS/pseudo_cache (PSEUDO_CACHE=... to share one);
# evaluations: $EVAL_ROOT/{val,train}/student_s<seed>/ (default EVAL_ROOT=$RUNS/eval).
# NO_LEARNING=path/model.pt also evaluates that no_learning model (F left at its initialisation,
# bundle/configs/ablations/no_learning.json, post-processing tuned) on the training split's labels.
# TUNE=false keeps the post-processing the student took from its teacher.
# EXTRA_CONFIG=FILE layers an override file on selftrain.json for every run (e.g. scripts/research/pale_paste.json).
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
DATA=${1:?usage: scripts/research/self_training_study.sh DATASET_DIR [OVERRIDE...]}; shift
C=bundle/configs
PY=${PYTHON:-python}
SEEDS=${SEEDS:-0 1 2}
RUNS=${RUNS:-bundle/runs/selftrain_study}
EVAL_ROOT=${EVAL_ROOT:-$RUNS/eval}
PSEUDO_CACHE=${PSEUDO_CACHE:-$RUNS/pseudo_cache}
TUNE=${TUNE:-true}
# shellcheck source=scripts/bundle_evaluate.sh
. "$(dirname "$0")/../bundle_evaluate.sh"
for s in $SEEDS; do
  run=$RUNS/student_s$s
  /usr/bin/time -f "student_s$s self-training: %e s wall" \
    $PY -m monai.bundle run selftraining --config_file "['$C/train.json','$C/distill.json','$C/selftrain.json'${EXTRA_CONFIG:+,'$EXTRA_CONFIG'}]" \
      --dataset_dir "$DATA" --download false --seed "$s" --output_dir "$run" --pseudo_cache_dir "$PSEUDO_CACHE" "$@"
  if [ "$TUNE" = true ]; then
    $PY scripts/tune_postprocess.py --dataset_dir "$DATA" --checkpoint "$run/model.pt" --write_model --r 1 \
        --out_config "$run/postprocess_tuned.json"
  fi
  bundle_evaluate "$EVAL_ROOT/val/student_s$s" "student_s$s" -- --checkpoint "$run/model.pt" --tta false
  bundle_evaluate "$EVAL_ROOT/train/student_s$s" "student_s$s" -- --checkpoint "$run/model.pt" --tta false --eval_split train
done
if [ -n "${NO_LEARNING:-}" ]; then
  bundle_evaluate "$EVAL_ROOT/train/no_learning" no_learning -- --checkpoint "$NO_LEARNING" --tta false --eval_split train
fi
for split in val train; do
  $PY scripts/results_table.py --eval_root "$EVAL_ROOT/$split" --paper false
done
