#!/usr/bin/env bash
# Refill every generated table of README.md and the model card (bundle/docs/README.md) from the
# evaluation outputs under bundle/eval (summary.json, errors_summary.json), with no training and no
# inference. One scripts/results_table.py call per block; the block names are the
# "<!-- NAME table: generated -->" markers of the two files. Run from the repository root:
#
#   scripts/refresh_tables.sh && git diff --stat   # empty diff: the committed tables are the outputs'
set -euo pipefail
PY=${PYTHON:-python}
T=scripts/results_table.py
E=bundle/eval
for DOC in README.md bundle/docs/README.md; do
  "$PY" $T --into "$DOC" >/dev/null                                                       # results
  "$PY" $T --eval_root $E/plain_reinhard_recipe --paper false --block plain_reinhard_recipe --into "$DOC" >/dev/null
  "$PY" $T --seeds --eval_root $E/plain_reinhard_recipe --block seed --into "$DOC" >/dev/null
  "$PY" $T --eval_root $E/iterations_500_recipe --paper false --block iterations_500_recipe --into "$DOC" >/dev/null
  "$PY" $T --eval_root $E/budget60_reference_postprocess --paper false \
    --block budget60_reference_postprocess --into "$DOC" >/dev/null
  "$PY" $T --seeds --eval_root $E/budget60_reference_postprocess \
    --block budget60_reference_postprocess_seeds --into "$DOC" >/dev/null
done
"$PY" $T --eval_root $E/budget60_paper_postprocess --paper false --block budget60_paper_postprocess --into README.md >/dev/null
"$PY" $T --seeds --eval_root $E/budget60_paper_postprocess --block budget60_paper_postprocess_seeds --into README.md >/dev/null
"$PY" $T --eval_root $E/heldout_train --paper false --block heldout_train --into README.md >/dev/null
"$PY" $T --errors --into README.md >/dev/null
"$PY" $T --errors --eval_root $E/heldout_train --block heldout_train_errors --into README.md >/dev/null
echo "refilled the generated tables of README.md and bundle/docs/README.md from $E"
