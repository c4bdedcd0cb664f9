"""Leave-one-organ-out study of self-training (issue 29): for each organ fold of the 30 MoNuSeg images
(:func:`custom.data.monuseg.organ_folds`: breast, kidney, liver, prostate, and bladder + colon + stomach
pooled), a student is self-trained (``bundle/configs/selftrain.json``) on the unlabeled images of the
other organs, its epoch chosen on the validation images of the other organs, and scored on the held-out
organ's labels; the reference models are scored on the same images. With ``--adapt``, the shipped
student is also adapted (``scripts/adapt.py``, no labels) to the held-out organ's own images and scored
on their labels: what a user gets from adapting to slides of a new organ.

    python -m scripts.research.leave_one_organ_out --dataset_dir ../shared/data/monuseg --runs /tmp/loo
    python -m scripts.research.leave_one_organ_out --dataset_dir ../shared/data/monuseg --selftrain false --adapt true
    python -m scripts.research.leave_one_organ_out --dataset_dir ../shared/data/monuseg --folds "['breast']" \
        --overrides "{'selftrain_learning_rate': 1e-4}"

References (each evaluated once on all 30 images with the stored post-processing, TTA off; the table
averages their per-image AJI over each fold): stage 1 (``bundle/models/attention.pt``), the shipped
student (``bundle/models/model.pt``), ``--no_learning`` (a no_learning model file, optional) and the
tuned hematoxylin pipelines. Stage 1 and the shipped student were trained on the 19 training images
(unlabeled), some of which belong to the held-out organ; the fold's student never sees that organ.
Writes ``<runs>/loo_table.md`` and prints it.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import fire

from custom.command_line import flag
from custom.data.monuseg import organ_folds
from custom.data.prepared import list_ids

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
SELFTRAIN = [CONFIGS / "train.json", CONFIGS / "distill.json", CONFIGS / "selftrain.json"]


def _run(cmd: list[str], log: Path) -> None:
    print("  $", " ".join(cmd[:6]), "...", f"(log: {log})", flush=True)
    with open(log, "w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO).returncode:
            raise SystemExit(f"failed: {' '.join(cmd)}; see {log}")


def _files(paths) -> str:
    return "[" + ",".join(f"'{p}'" for p in paths) + "]"


def evaluate(dataset_dir: str, method: str, into: Path, ids: list[str], extra: list[Path] = (), **overrides) -> dict[str, float]:
    """The bundle's evaluation of ``ids`` into ``into``; per-image AJI by id."""
    if not (into / "per_image.csv").is_file():
        into.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "monai.bundle", "run", "evaluating", "--config_file",
               _files([CONFIGS / "train.json", CONFIGS / "evaluate.json", *extra]), "--dataset_dir", dataset_dir, "--download", "false",
               "--method", method, "--eval_dir", str(into), "--eval_ids", json.dumps(ids), "--write_overlays", "false"]
        for k, v in overrides.items():
            cmd += [f"--{k}", str(v)]
        _run(cmd, into.with_suffix(".log"))
    with open(into / "per_image.csv") as f:
        return {row["id"]: float(row["aji"]) for row in csv.DictReader(f)}


def main(dataset_dir: str, runs: str = "bundle/runs/loo", folds=None, overrides: dict | None = None, no_learning: str | None = None,
         pseudo_cache_dir: str | None = None, selftrain: bool = True, adapt: bool = False) -> None:
    """Run the folds (``folds``: organ names, default all) and print the table.

    Args:
        dataset_dir: the prepared MoNuSeg images with labels and splits.json.
        runs: folder of the runs and evaluations.
        folds: organ folds to run (default: every fold).
        overrides: config keys for every self-training run (e.g. ``{'selftrain_epochs': 5}``).
        no_learning: a no_learning model file to add as a reference row.
        pseudo_cache_dir: the teacher's pseudo-instance cache shared by the folds (default ``<runs>/pseudo_cache``).
        selftrain: self-train a student per fold on the other organs (the fold row).
        adapt: adapt the shipped student to each held-out organ's unlabeled images (whole 1000² images as
            tiles, as in docs/self_training.md's adaptation on the validation images) and score it.
    """
    root = Path(runs)
    selftrain, adapt = flag(selftrain, "selftrain"), flag(adapt, "adapt")
    train_ids, val_ids = list_ids(dataset_dir, split="train"), list_ids(dataset_dir, split="val")
    all_folds = organ_folds(train_ids + val_ids)
    chosen = list(all_folds) if folds is None else [str(f) for f in folds]
    unknown = [f for f in chosen if f not in all_folds]
    if unknown:
        raise SystemExit(f"--folds: unknown {unknown}; the folds are {list(all_folds)}.")
    cache = pseudo_cache_dir or str(root / "pseudo_cache")
    ids = train_ids + val_ids
    models = REPO / "bundle" / "models"
    references = {"stage 1 (F)": ("stage1", [], {"checkpoint": models / "attention.pt", "tta": "false"}),
                  "shipped student (distilled)": ("model", [], {"checkpoint": models / "model.pt", "tta": "false"}),
                  "hematoxylin + local, tuned": ("hematoxylin_local_tuned", [CONFIGS / "baselines/hematoxylin_local.json",
                                                                               CONFIGS / "baselines/hematoxylin_local_tuned.json"], {}),
                  "hematoxylin + Otsu, tuned": ("hematoxylin_otsu_tuned", [CONFIGS / "baselines/hematoxylin_otsu.json",
                                                                           CONFIGS / "baselines/hematoxylin_otsu_tuned.json"], {})}
    if no_learning:
        references["no_learning"] = ("no_learning", [], {"checkpoint": no_learning, "tta": "false"})
    per_image = {}
    for name, (method, extra, kw) in references.items():
        print(f"reference {name}", flush=True)
        per_image[name] = evaluate(dataset_dir, method, root / "references" / method, ids, extra, **kw)
    if selftrain:
        per_image["self-trained student (fold)"] = {}
    if adapt:
        per_image["shipped student adapted to the held-out organ"] = {}
    for organ in chosen:
        held = all_folds[organ]
        run = root / organ
        print(f"fold {organ}: held out {len(held)} images", flush=True)
        if adapt:
            adapted = run / "adapted.pt"
            if not adapted.is_file():
                run.mkdir(parents=True, exist_ok=True)
                images = [str(Path(dataset_dir) / "images" / f"{i}.png") for i in held]
                _run([sys.executable, str(REPO / "scripts" / "adapt.py"), json.dumps(images), "--out", str(adapted), "--base_magnification", "40",
                      "--adapt_tiles", str(len(held)), "--adapt_tile_size", "1000", "--work_dir", str(run / "adapt"),
                      "--pseudo_cache_dir", cache, "--progress", "false"], run / "adapt.log")
            per_image["shipped student adapted to the held-out organ"].update(
                evaluate(dataset_dir, f"adapted_{organ}", run / "eval_adapted", held, checkpoint=adapted, tta="false"))
        if not selftrain:
            continue
        if not (run / "model.pt").is_file():
            run.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "monai.bundle", "run", "selftraining", "--config_file", _files(SELFTRAIN), "--dataset_dir",
                   dataset_dir, "--download", "false", "--output_dir", str(run), "--pseudo_cache_dir", cache,
                   "--selftrain_ids", json.dumps([i for i in ids if i not in held]),
                   "--selftrain_val_ids", json.dumps([i for i in val_ids if i not in held]), "--progress", "false"]
            for k, v in (overrides or {}).items():
                cmd += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
            _run(cmd, run / "selftrain.log")
        per_image["self-trained student (fold)"].update(
            evaluate(dataset_dir, f"selftrain_{organ}", run / "eval", held, checkpoint=run / "model.pt", tta="false"))
    lines = ["| method | " + " | ".join(f"{o} ({len(all_folds[o])})" for o in chosen) + " | mean of folds |",
             "| --- |" + " --- |" * (len(chosen) + 1)]
    for name, scores in per_image.items():
        folds_aji = [sum(scores[i] for i in all_folds[o]) / len(all_folds[o]) for o in chosen]
        lines.append(f"| {name} | " + " | ".join(f"{a:.4f}" for a in folds_aji) + f" | {sum(folds_aji) / len(folds_aji):.4f} |")
    table = "\n".join(lines)
    (root / "loo_table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    fire.Fire(main)
