"""Print the Table-1-style comparison from evaluation summaries (``summary.json``
files written by ``bundle/configs/evaluate.json``), so that the README table is
generated, not typed.

Usage::

    python scripts/results_table.py                      # every bundle/eval/*/summary.json
    python scripts/results_table.py bundle/eval/model bundle/eval/hematoxylin_otsu --paper false
    python scripts/results_table.py --out bundle/docs/results.md
    python scripts/results_table.py --into README.md      # refill the README's generated block

Rows: one per summary (its ``method``), in the order given (default: sorted by AJI),
then the paper's Table 1 rows for reference, labelled as measured on the MoNuSeg
test set by the paper, not by this bundle.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import fire

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from custom.config import flag  # noqa: E402
from custom.handlers import write_atomic  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

COLUMNS = [("aji", "AJI", 4), ("ahd", "AHD (px)", 2), ("dice", "ADC (Dice)", 4), ("pq", "PQ", 4), ("aji_plus", "AJI+", 4),
           ("f1", "F1", 4)]
# Sahasrabudhe et al., MICCAI 2020, Table 1: MoNuSeg test set (14 images); PQ/AJI+/F1 not reported.
PAPER_ROWS = [
    ("CellProfiler (paper)", 0.1232, 9.2771, 0.5974),
    ("Fiji (paper)", 0.2733, 8.9507, 0.6493),
    ("M_-WSI (paper)", 0.3025, 8.2853, 0.6209),
    ("M_proposed (paper)", 0.5354, 7.7502, 0.7477),
    ("CNN3, supervised (paper)", 0.5083, 7.6615, 0.7623),
]


def _fmt(value, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def load_summaries(paths) -> list[dict]:
    """Read ``summary.json`` from each path (a file or the folder holding it)."""
    out = []
    for p in paths:
        p = Path(p)
        f = p / "summary.json" if p.is_dir() else p
        if not f.is_file():
            raise SystemExit(f"{p}: no summary.json (run the evaluation first: see README, 'Evaluate').")
        try:
            out.append(json.loads(f.read_text()))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{f}: not valid JSON ({e}).") from e
    return out


def table(summaries: list[dict], paper: bool = True) -> str:
    """Markdown table: method, images, nuclei found/true, then the metric columns."""
    head = ["method", "split (images)", "nuclei found / true", *(c[1] for c in COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        split = f"{s.get('settings', {}).get('split', '?')} ({s.get('n_images', '?')})"
        counts = f"{s.get('n_pred', '?')} / {s.get('n_true', '?')}"
        cells = [s.get("method", "?"), split, counts, *(_fmt(s.get(k), d) for k, _, d in COLUMNS)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    if paper:
        for name, a, h, d in PAPER_ROWS:
            cells = [name, "MoNuSeg test (14)", "-", _fmt(a, 4), _fmt(h, 2), _fmt(d, 4), "-", "-", "-"]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _aji_key(summary: dict) -> float:
    value = summary.get("aji")
    return value if isinstance(value, (int, float)) and math.isfinite(value) else -1.0


START, END = "<!-- results table: generated -->", "<!-- end of results table -->"


def replace_block(text: str, table_text: str, source: str = "the document") -> str:
    """``text`` with the lines between the START and END markers replaced by ``table_text``.

    Raises:
        ValueError: naming ``source`` when the markers are missing or out of order.
    """
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{source}: no '{START}' ... '{END}' block to fill.")
    return text[: start + len(START)] + "\n" + table_text + "\n" + text[end:]


def main(*paths: str, paper: bool = True, sort: bool = True, out: str | None = None, into: str | None = None) -> None:
    """Print (and optionally write to ``out``) the comparison table.

    Args:
        paths: summary files or evaluation folders (default: every ``bundle/eval/*/summary.json``).
        paper: append the paper's Table 1 rows (their test set) for reference.
        sort: order this bundle's rows by AJI, best first (else in the given order).
        out: also write the table to this file (atomically).
        into: also put the table into this Markdown file, between the lines
            ``<!-- results table: generated -->`` and ``<!-- end of results table -->``
            (README.md and bundle/docs/README.md have that block).
    """
    if not paths:
        paths = sorted(str(p) for p in (REPO / "bundle" / "eval").glob("*/summary.json"))
        if not paths:
            raise SystemExit("no bundle/eval/*/summary.json yet: run the evaluation first (README, 'Evaluate').")
    summaries = load_summaries(paths)
    if flag(sort, "--sort"):
        summaries.sort(key=lambda s: -_aji_key(s))
    text = table(summaries, flag(paper, "--paper"))
    if out:
        write_atomic(out, lambda tmp: Path(tmp).write_text(text + "\n"))
    if into:
        try:
            filled = replace_block(Path(into).read_text(), text, into)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--into {into}: {e}") from e
        write_atomic(into, lambda tmp: Path(tmp).write_text(filled))
    print(text)


if __name__ == "__main__":
    fire.Fire(main)
