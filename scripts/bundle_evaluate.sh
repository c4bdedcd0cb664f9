# Sourced by scripts/evaluate_all.sh, scripts/evaluate_heldout.sh and scripts/research/ablation_study.sh.
# One run of the bundle's evaluation workflow:
#   bundle_evaluate EVAL_DIR METHOD [EXTRA_CONFIG...] [-- OVERRIDE...]
# layers train.json, evaluate.json and the EXTRA_CONFIGs, evaluates $DATA (a prepared dataset) as METHOD
# into EVAL_DIR; OVERRIDEs are passed on (e.g. --checkpoint M --tta false --eval#tuned "{}").
# Uses $PY (python) and $C (bundle/configs) when set.
bundle_evaluate() {
  local into=$1 method=$2; shift 2
  local c=${C:-bundle/configs} files
  files="'$c/train.json','$c/evaluate.json'"
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do files="$files,'$1'"; shift; done; [ $# -gt 0 ] && shift
  ${PY:-python} -m monai.bundle run evaluating --config_file "[$files]" --dataset_dir "${DATA:?bundle_evaluate: DATA is not set}" \
      --download false --method "$method" --eval_dir "$into" "$@"
}

# The shipped model's and the classical baselines' rows:
#   bundle_evaluate_rows EVAL_ROOT [OVERRIDE...]
# the model with its stored post-processing, with F's h-maxima markers (model_hmaxima: inference_hmaxima.json)
# and with the paper's (model_paper_postprocess), then each of
# $BASELINES (default: hematoxylin_otsu hematoxylin_local) with the paper's post-processing and with its
# validation-tuned override $C/baselines/<name>_tuned.json (which must exist), each into EVAL_ROOT/<method>,
# each with its error analysis (errors.csv, errors_summary.json: --error_analysis true).
BASELINES=${BASELINES:-hematoxylin_otsu hematoxylin_local}
bundle_evaluate_rows() {
  local root=$1; shift
  local c=${C:-bundle/configs} b
  for b in $BASELINES; do
    [ -f "$c/baselines/${b}_tuned.json" ] || { echo "$c/baselines/${b}_tuned.json: not found; tune it on validation first (scripts/tune_postprocess.py --method $b)" >&2; return 1; }
  done
  bundle_evaluate "$root/model" model -- --error_analysis true "$@"
  bundle_evaluate "$root/model_hmaxima" model_hmaxima "$c/inference_hmaxima.json" -- --error_analysis true "$@"
  bundle_evaluate "$root/model_paper_postprocess" model_paper_postprocess -- --error_analysis true "$@" --eval#tuned "{}"
  for b in $BASELINES; do
    bundle_evaluate "$root/$b" "$b" "$c/baselines/$b.json" -- --error_analysis true "$@"
    bundle_evaluate "$root/${b}_tuned" "${b}_tuned" "$c/baselines/$b.json" "$c/baselines/${b}_tuned.json" -- --error_analysis true "$@"
  done
}
