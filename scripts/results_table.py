"""Print the Table-1-style comparison from evaluation summaries (``summary.json``
files written by ``bundle/configs/evaluate.json``), so that the documents' tables are
generated, not typed. The committed summaries live in ``results/`` at the repository root.

Usage::

    python scripts/results_table.py                      # every results/*/summary.json
    python scripts/results_table.py results/model bundle/runs/eval/model --paper false
    python scripts/results_table.py --eval_root bundle/runs/eval   # your own evaluations
    python scripts/results_table.py --into README.md      # refill the README's results block
    python scripts/results_table.py --seeds --eval_root results/plain_reinhard_recipe   # a seed table
    python scripts/results_table.py --eval_root results/plain_reinhard_recipe --paper false \
        --block plain_reinhard_recipe --into docs/experiments.md   # an archived recipe's rows, its own block
    python scripts/results_table.py --errors --into docs/experiments.md  # the error analysis and its block
    python scripts/results_table.py --refresh_all --into README.md  # every generated block, each by its name
    scripts/refresh_tables.sh                                  # every generated block of every document

Rows: one per summary (its ``method``; default: every ``<eval_root>/*/summary.json``),
in the order given (default: sorted by AJI),
then the paper's Table 1 rows for reference, labelled as measured on the MoNuSeg
test set by the paper, not by this bundle.

With ``--errors``: where each method loses AJI, from the ``errors_summary.json`` files of an evaluation
run with ``--error_analysis true`` (``ErrorAnalysisReport``): its AJI, the AJI of its foreground split by the
labels, the AJI of the true foreground split by its post-processing, and its instance errors.

With ``--seeds``: one row per trained variant that has seed replicas
(``<eval_root>/replicas/<variant>_s<seed>/``, written by ``scripts/evaluate_all.sh``),
with the mean and the range over its seeds; seed 0 is the variant's own row
(``<eval_root>/<variant>/``; for ``train``, the shipped ``model``).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import fire

from custom.atomic_write import write_atomic
from custom.command_line import flag

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
            raise SystemExit(f"{p}: no summary.json (run the evaluation first: README, 'Results').")
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




def markers(block: str) -> tuple[str, str]:
    """The lines that enclose the generated table ``block`` in a Markdown file:
    ``<!-- {block} table: generated -->`` and ``<!-- end of {block} table -->``."""
    if not isinstance(block, str) or not re.fullmatch(r"[A-Za-z0-9_ -]+", block):
        raise ValueError(f"--block {block!r}: a table name of letters, digits, '_', '-' or spaces.")
    return f"<!-- {block} table: generated -->", f"<!-- end of {block} table -->"


START, END = markers("results")
ERROR_COLUMNS = [("aji", "AJI", 4), ("aji_oracle_split", "AJI, its foreground split by the labels", 4),
                 ("aji_true_foreground", "AJI, the true foreground split by its post-processing", 4), ("dice", "ADC (Dice)", 4)]
ERROR_COUNTS = [("merged_true", "true nuclei merged (merges)", "merges"), ("split_true", "true nuclei split", None),
                ("missed_true", "true nuclei missed", None), ("false_pred", "false nuclei", None)]


def load_errors(eval_root) -> list[dict]:
    """Every ``<eval_root>/*/errors_summary.json``, sorted by AJI, best first."""
    return sorted(load_summaries(sorted(Path(eval_root).glob("*/errors_summary.json"))), key=lambda s: -_aji_key(s))


def error_table(summaries: list[dict]) -> str:
    """Markdown table: method, nuclei found / true, the scores of ``ERROR_COLUMNS``, the counts of ``ERROR_COUNTS``."""
    head = ["method", "nuclei found / true", *(c[1] for c in ERROR_COLUMNS), *(c[1] for c in ERROR_COUNTS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        cells = [s.get("method", "?"), f"{s.get('n_pred', '?')} / {s.get('n_true', '?')}", *(_fmt(s.get(k), d) for k, _, d in ERROR_COLUMNS)]
        cells += [f"{s.get(k, '?')} ({s.get(extra, '?')})" if extra else str(s.get(k, "?")) for k, _, extra in ERROR_COUNTS]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


SEED_COLUMNS = [("aji", "AJI", 4), ("dice", "ADC (Dice)", 4), ("ahd", "AHD (px)", 2), ("pq", "PQ", 4)]


def seed_groups(eval_root) -> list[tuple[str, list[dict]]]:
    """``(variant, summaries)`` for every variant with seed replicas under ``eval_root/replicas``:
    seed 0 (``eval_root/<variant>``, ``model`` for ``train``) first when it exists, then the
    replicas by seed. Variants are ordered by mean AJI, best first."""
    eval_root = Path(eval_root)
    replicas: dict[str, list[tuple[int, Path]]] = {}
    for f in (eval_root / "replicas").glob("*/summary.json"):
        m = re.fullmatch(r"(.+)_s(\d+)", f.parent.name)
        if m:
            replicas.setdefault(m.group(1), []).append((int(m.group(2)), f))
    groups = []
    for variant, seeds in replicas.items():
        own = eval_root / ("model" if variant == "train" else variant) / "summary.json"
        files = ([own] if own.is_file() else []) + [f for _, f in sorted(seeds)]
        groups.append((variant, load_summaries(files)))
    groups.sort(key=lambda g: -sum(_aji_key(s) for s in g[1]) / len(g[1]))
    return groups


def seed_table(groups: list[tuple[str, list[dict]]]) -> str:
    """Markdown table: variant, number of seeds, then per metric ``mean (min-max)`` over the seeds."""
    head = ["variant (training seeds)", "seeds", *(c[1] for c in SEED_COLUMNS)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for variant, summaries in groups:
        label = "train (the shipped recipe)" if variant == "train" else variant
        cells = [label, str(len(summaries))]
        for key, _, digits in SEED_COLUMNS:
            values = [s[key] for s in summaries if isinstance(s.get(key), (int, float)) and math.isfinite(s[key])]
            cells.append(f"{_fmt(sum(values) / len(values), digits)} ({_fmt(min(values), digits)}-{_fmt(max(values), digits)})"
                         if values else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(text: str, table_text: str, source: str = "the document", start_marker: str = START,
                  end_marker: str = END) -> str:
    """``text`` with the lines between ``start_marker`` and ``end_marker`` replaced by ``table_text``.

    Raises:
        ValueError: naming ``source`` when the markers are missing or out of order.
    """
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{source}: no '{start_marker}' ... '{end_marker}' block to fill.")
    return text[: start + len(start_marker)] + "\n" + table_text + "\n" + text[end:]


def _eval_summaries(eval_root) -> list[dict]:
    """Every ``<eval_root>/*/summary.json`` (in path order), or ``SystemExit`` when there is none."""
    found = sorted(Path(eval_root).glob("*/summary.json"))
    if not found:
        raise SystemExit(f"no {eval_root}/*/summary.json yet: run the evaluation first (README, 'Results').")
    return load_summaries(found)


def summary_table_of(eval_root, paper: bool = True) -> str:
    """:func:`table` of every ``<eval_root>/*/summary.json``, best AJI first (``SystemExit`` when none)."""
    return table(sorted(_eval_summaries(eval_root), key=lambda s: -_aji_key(s)), paper)


def seed_table_of(eval_root) -> str:
    """:func:`seed_table` of ``eval_root``'s replicas (``SystemExit`` when none)."""
    groups = seed_groups(eval_root)
    if not groups:
        raise SystemExit(f"{eval_root}/replicas: no seed replicas evaluated yet (scripts/evaluate_all.sh with "
                         "<variant>_s<seed> run folders).")
    return seed_table(groups)


def error_table_of(eval_root) -> str:
    """:func:`error_table` of every ``<eval_root>/*/errors_summary.json`` (``SystemExit`` when none)."""
    found = load_errors(eval_root)
    if not found:
        raise SystemExit(f"no {eval_root}/*/errors_summary.json yet: evaluate with --error_analysis true first.")
    return error_table(found)


BLOCK_NAME = re.compile(r"<!-- ([A-Za-z0-9_ -]+) table: generated -->")


def block_table(name: str, eval_root) -> str:
    """The table that the generated Markdown block ``name`` holds, from the outputs under ``eval_root``:

    - ``results``: every ``<eval_root>/*/summary.json`` with the paper's rows;
    - ``errors`` / ``<root>_errors``: the error analysis of ``eval_root`` / ``<eval_root>/<root>``;
    - ``<root>_seeds``: the seed table of ``<eval_root>/<root>``;
    - any other ``<root>``: every ``<eval_root>/<root>/*/summary.json``, without the paper's rows.
    """
    root = Path(eval_root)
    if name == "results":
        return summary_table_of(root)
    if name == "errors":
        return error_table_of(root)
    if name.endswith("_errors"):
        return error_table_of(root / name[: -len("_errors")])
    if name.endswith("_seeds"):
        return seed_table_of(root / name[: -len("_seeds")])
    return summary_table_of(root / name, paper=False)


def refresh(doc, eval_root) -> list[str]:
    """Refill every generated block of the Markdown file ``doc`` with :func:`block_table` of its name
    and write the file once (atomically). Returns the block names, in document order."""
    try:
        text = Path(doc).read_text()
    except OSError as e:
        raise SystemExit(f"--into {doc}: {e}") from e
    names = BLOCK_NAME.findall(text)
    if not names:
        raise SystemExit(f"--into {doc}: no '<!-- NAME table: generated -->' block to refresh.")
    for name in names:
        try:
            text = replace_block(text, block_table(name, eval_root), str(doc), *markers(name))
        except ValueError as e:
            raise SystemExit(f"--into {doc}: {e}") from e
    write_atomic(doc, lambda tmp: Path(tmp).write_text(text))
    return names


def main(*paths: str, paper: bool = True, sort: bool = True, out: str | None = None, into: str | None = None,
         seeds: bool = False, eval_root: str = str(REPO / "results"), block: str | None = None,
         errors: bool = False, refresh_all: bool = False) -> None:
    """Print (and optionally write to ``out``) the comparison table, with ``seeds`` the seed table, or
    with ``errors`` the error-analysis table.

    Args:
        paths: summary files or evaluation folders (default: every ``<eval_root>/*/summary.json``).
        paper: append the paper's Table 1 rows (their test set) for reference.
        sort: order this bundle's rows by AJI, best first (else in the given order).
        out: also write the table to this file (atomically).
        into: also put the table into this Markdown file, between the lines
            ``<!-- results table: generated -->`` and ``<!-- end of results table -->``
            (README.md and bundle/docs/README.md have that block); with ``seeds``, between
            ``<!-- seed table: generated -->`` and ``<!-- end of seed table -->`` (see ``block``).
        seeds: print the seed table of ``eval_root`` instead (``paths``, ``paper`` and ``sort`` do not apply).
        eval_root: the evaluation folder read when no ``paths`` are given, and by ``seeds``, ``errors``
            and ``refresh_all`` (default: the committed ``results/``; ``bundle/runs/eval`` holds the
            evaluations a user runs; ``results/plain_reinhard_recipe``: an archived earlier recipe).
        block: the name of the block that ``into`` fills, between ``<!-- {block} table: generated -->``
            and ``<!-- end of {block} table -->`` (default ``results``, ``seed`` with ``seeds``, ``errors``
            with ``errors``).
        errors: print the error-analysis table of every ``<eval_root>/*/errors_summary.json`` instead
            (``paths``, ``paper`` and ``sort`` do not apply).
        refresh_all: refill every generated block of ``into``, each with the table its name stands
            for (:func:`block_table`), and print their names; the other options do not apply.
    """
    seeds, errors = flag(seeds, "--seeds"), flag(errors, "--errors")
    if flag(refresh_all, "--refresh_all"):
        if not into:
            raise SystemExit("--refresh_all: name the Markdown file to refill with --into.")
        print(f"{into}: refilled {', '.join(refresh(into, eval_root))}")
        return
    if seeds and errors:
        raise SystemExit("--seeds and --errors: one table at a time.")
    try:
        start, end = markers(block if block is not None else ("seed" if seeds else "errors" if errors else "results"))
    except ValueError as e:
        raise SystemExit(str(e)) from e
    if errors:
        _emit(error_table_of(eval_root), out, into, start, end)
        return
    if seeds:
        _emit(seed_table_of(eval_root), out, into, start, end)
        return
    summaries = load_summaries(paths) if paths else _eval_summaries(eval_root)
    if flag(sort, "--sort"):
        summaries.sort(key=lambda s: -_aji_key(s))
    _emit(table(summaries, flag(paper, "--paper")), out, into, start, end)


def _emit(text: str, out: str | None, into: str | None, start_marker: str, end_marker: str) -> None:
    """Print ``text``; write it to ``out`` and into ``into``'s marked block (atomically)."""
    if out:
        write_atomic(out, lambda tmp: Path(tmp).write_text(text + "\n"))
    if into:
        try:
            filled = replace_block(Path(into).read_text(), text, into, start_marker, end_marker)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--into {into}: {e}") from e
        write_atomic(into, lambda tmp: Path(tmp).write_text(filled))
    print(text)


if __name__ == "__main__":
    fire.Fire(main)
