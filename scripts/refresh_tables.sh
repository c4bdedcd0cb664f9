#!/usr/bin/env bash
# Refill every generated table of README.md and the model card (bundle/docs/README.md) from the
# evaluation outputs under bundle/eval (summary.json, errors_summary.json), with no training and no
# inference. Each "<!-- NAME table: generated -->" block gets the table its name stands for
# (scripts/results_table.py, block_table). Run from the repository root:
#
#   scripts/refresh_tables.sh && git diff --stat   # empty diff: the committed tables are the outputs'
set -euo pipefail
for DOC in README.md bundle/docs/README.md; do
  "${PYTHON:-python}" scripts/results_table.py --refresh_all --into "$DOC" --eval_root bundle/eval
done
