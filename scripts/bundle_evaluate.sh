# Sourced by scripts/evaluate_all.sh and scripts/ablation_study.sh: one run of the bundle's evaluation workflow.
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
