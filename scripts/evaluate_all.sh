#!/usr/bin/env bash
# Evaluate the shipped model, its ablations and the classical baselines on the
# validation split with the bundle's own evaluator, then print the comparison tables.
#   scripts/evaluate_all.sh DATASET_DIR [RUNS_DIR [NAME...]]
# RUNS_DIR holds one folder per trained variant with its model.pt (default bundle/runs);
# each variant's post-processing is tuned on the validation split first (stored in its model.pt),
# on attention maps computed with the sigmoid slope R=$R (default 1, as for the shipped
# model; R= empty: each network's own slope).
# A folder <variant>_s<seed> is a seed replica of <variant> ("train" = the shipped recipe):
# it is evaluated into $EVAL_ROOT/replicas/<variant>_s<seed>/ and summarised by
# `results_table.py --seeds`; every other evaluation goes to $EVAL_ROOT/<name>/ (default
# EVAL_ROOT=bundle/runs/eval, the user's own; EVAL_ROOT=results rewrites the committed summaries that
# the documents' tables read, EVAL_ROOT=results/plain_reinhard_recipe an archived recipe's).
# With NAMEs, only those folders are evaluated (no model, no baselines). Every evaluation writes its
# error analysis too (--error_analysis true).
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
DATA=${1:?usage: scripts/evaluate_all.sh DATASET_DIR [RUNS_DIR [NAME...]]}
RUNS=${2:-bundle/runs}
shift $(( $# < 2 ? $# : 2 )); NAMES=("$@")
C=bundle/configs
PY=${PYTHON:-python}
R=${R-1}; slope=(); [ -n "$R" ] && slope=(--r "$R")
EVAL_ROOT=${EVAL_ROOT:-bundle/runs/eval}
# shellcheck source=scripts/bundle_evaluate.sh
. "$(dirname "$0")/bundle_evaluate.sh"
evaluate() {  # [into=EVAL_DIR] evaluate METHOD EXTRA_CONFIG... -- OVERRIDES...  (default EVAL_DIR: $EVAL_ROOT/METHOD)
  bundle_evaluate "${into:-$EVAL_ROOT/$1}" "$@"
}
if [ ${#NAMES[@]} -eq 0 ]; then
  # the classical baselines tuned on validation like the model, then the model (with its tuned
  # post-processing and with the paper's) and each baseline (with the paper's and with its tuned one)
  for b in $BASELINES; do
    $PY scripts/tune_postprocess.py --dataset_dir "$DATA" --method $b --out_config "bundle/configs/baselines/${b}_tuned.json"
  done
  bundle_evaluate_rows "$EVAL_ROOT"
  NAMES=(); for d in "$RUNS"/*/; do NAMES+=("$(basename "$d")"); done
fi
# trained variants (ablations and seed replicas), each tuned on validation the same way
for n in "${NAMES[@]}"; do
  d=$RUNS/$n; [ -f "$d/model.pt" ] || { [ $# -gt 0 ] && { echo "$d/model.pt: not found" >&2; exit 1; }; continue; }
  [ "$n" = train ] && continue
  variant=$n; dir=$EVAL_ROOT/$n; if [[ $n =~ ^(.+)_s[0-9]+$ ]]; then variant=${BASH_REMATCH[1]}; dir=$EVAL_ROOT/replicas/$n; fi
  ablation=$C/ablations/$variant.json; extra=(); [ -f "$ablation" ] && extra=("$ablation")
  $PY scripts/tune_postprocess.py --dataset_dir "$DATA" --checkpoint "$d/model.pt" --write_model \
      --out_config "$d/postprocess_tuned.json" ${extra[@]:+--config "${extra[0]}"} "${slope[@]}"
  into=$dir evaluate "$n" "${extra[@]}" -- --checkpoint "$d/model.pt" --error_analysis true
done
$PY scripts/results_table.py --eval_root "$EVAL_ROOT"
if [ -d "$EVAL_ROOT/replicas" ]; then $PY scripts/results_table.py --seeds --eval_root "$EVAL_ROOT"; fi
