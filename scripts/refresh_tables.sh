#!/usr/bin/env bash
# Refill every generated table of the documents (README.md, the model card bundle/docs/README.md and
# the pages of docs/) from the committed evaluation summaries under results/ (summary.json,
# errors_summary.json), with no training and no inference. Each "<!-- NAME table: generated -->" block
# gets the table its name stands for (scripts/results_table.py, block_table). Run from the repository root:
#
#   scripts/refresh_tables.sh && git diff --stat   # empty diff: the committed tables are the summaries'
set -euo pipefail
case ${1:-} in -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;; esac
for DOC in README.md bundle/docs/README.md docs/*.md; do
  [ -f "$DOC" ] && grep -q -- '-- [A-Za-z0-9_ -]* table: generated -->' "$DOC" || continue
  "${PYTHON:-python}" scripts/results_table.py --refresh_all --into "$DOC" --eval_root results
done
