"""Speed and accuracy of each inference candidate, the classical pipeline in the same run.

    python -m scripts.bench.pipeline --dataset_dir ../shared/data/monuseg
    python -m scripts.bench.pipeline --dataset_dir ../shared/data/monuseg --candidates "['student', 'classical_otsu']"
    python -m scripts.bench.pipeline --dataset_dir ../shared/data/monuseg --segment_images 6

Run it as a module from the repository root. Two parts, one process, the machine's cores as they are:

1. **Evaluation** of every candidate on the validation images (``--split``) through the bundle's own
   evaluation workflow (``bundle/configs/evaluate.json`` with the candidate's overrides, in this
   process, after the workflow is built): read, stain-normalise, network, post-process, metrics.
   Seconds are Ignite's for the evaluator's run (start-up excluded, metrics included for every
   candidate alike); MP/s counts the images' pixels (all tissue on MoNuSeg tiles). AJI, Dice, AHD,
   PQ come from the same run's ``summary.json``.
2. **The user's command**: ``scripts/segment.py FOLDER --out DIR --base_magnification 40`` in a child
   process over the first ``--segment_images`` validation images, for the shipped default and for
   stage 1: wall-clock seconds from start to exit (Python start-up, imports, model loading, reading,
   network, post-processing, GeoJSON/CSV/PNG writing).

The generated 40x slide is ``python -m scripts.bench.wsi --skip_reads`` (same child-process timing).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundle" / "configs"
MODELS = REPO / "bundle" / "models"

# name -> (what it is, config files over train.json + evaluate.json, overrides)
CANDIDATES = {
    "classical_otsu": ("hematoxylin + Otsu + watershed (tuned), no network",
                       ["baselines/hematoxylin_otsu.json", "baselines/hematoxylin_otsu_tuned.json"], {}),
    "classical_local": ("hematoxylin + local threshold + watershed (tuned), no network",
                        ["baselines/hematoxylin_local.json", "baselines/hematoxylin_local_tuned.json"], {}),
    "stage1_tta": ("attention network F (width 32), 7-view TTA: the default before 0.14.0", [],
                   {"checkpoint": str(MODELS / "attention.pt"), "tta": True}),
    "stage1": ("attention network F (width 32), TTA off", [], {"checkpoint": str(MODELS / "attention.pt"), "tta": False}),
    "student": ("compact student distilled from F, TTA off, markers without h-maxima: the shipped default", [],
                {"checkpoint": str(MODELS / "model.pt"), "tta": False}),
    "student_hmaxima": ("compact student, TTA off, h-maxima markers (`inference_hmaxima.json`: the default before 0.15.0)",
                        ["inference_hmaxima.json"], {"checkpoint": str(MODELS / "model.pt"), "tta": False}),
    "student_tta": ("compact student, 7-view TTA", [], {"checkpoint": str(MODELS / "model.pt"), "tta": True}),
}
SEGMENT_MODELS = {"student": MODELS / "model.pt", "stage1": MODELS / "attention.pt"}


def evaluate(name: str, dataset_dir: str, split: str, work: Path) -> dict:
    """Run candidate ``name``'s evaluation workflow in this process; its summary plus seconds and megapixels."""
    from monai.bundle import ConfigWorkflow

    _, extra_configs, overrides = CANDIDATES[name]
    files = [str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json"), *(str(CONFIGS / f) for f in extra_configs)]
    eval_dir = work / name
    workflow = ConfigWorkflow(config_file=files, workflow_type="eval", logging_file=str(CONFIGS / "logging.conf"),
                              bundle_root=str(REPO / "bundle"), dataset_dir=dataset_dir, download=False, eval_split=split,
                              eval_dir=str(eval_dir), write_overlays=False, method=name, **overrides)
    workflow.initialize()
    evaluator = workflow.parser.get_parsed_content("eval#evaluator")
    evaluator.run()
    seconds = float(evaluator.state.times["COMPLETED"])
    workflow.finalize()
    summary = json.loads((eval_dir / "summary.json").read_text())
    ids = workflow.parser.get_parsed_content("eval#ids")
    megapixels = sum(_pixels(Path(dataset_dir) / "images" / f"{i}.png") for i in ids) / 1e6
    return {**summary, "seconds": seconds, "megapixels": megapixels}


def segment(model: Path, images: list[Path], work: Path) -> dict:
    """``scripts/segment.py FOLDER --out DIR --base_magnification 40 --model MODEL`` in a child process, timed whole."""
    folder = work / "segment_input"
    folder.mkdir(parents=True, exist_ok=True)
    for p in images:
        link = folder / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    out = work / f"segment_{model.stem}"
    cmd = [sys.executable, str(REPO / "scripts" / "segment.py"), str(folder), "--out", str(out), "--base_magnification", "40",
           "--model", str(model), "--overwrite", "True"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} exited with {done.returncode}:\n{done.stderr[-3000:]}")
    nuclei = sum(json.loads(p.read_text())["nuclei"] for p in out.glob("*.json"))
    return {"command": shlex.join(["python", "scripts/segment.py", "FOLDER", "--out", "DIR", "--base_magnification", "40",
                                   "--model", str(model.relative_to(REPO))]), "seconds": seconds, "nuclei": nuclei}


def main(dataset_dir: str, split: str = "val", candidates=tuple(CANDIDATES), segment_images: int = 6,
         segment_models=tuple(SEGMENT_MODELS), work_dir: str | None = None) -> None:
    """Print both tables (markdown).

    Args:
        dataset_dir: prepared MoNuSeg folder (images/, labels/, splits.json).
        split: the images evaluated and segmented.
        candidates: names among ``CANDIDATES`` (see the module docstring).
        segment_images: validation images for part 2 (0 skips it).
        segment_models: names among ``SEGMENT_MODELS`` for part 2.
        work_dir: outputs (default: a temporary folder, removed at the end).
    """
    import torch

    from custom.data.prepared import list_ids

    unknown = [c for c in (*candidates, *segment_models) if c not in CANDIDATES]
    if unknown:
        raise SystemExit(f"--candidates/--segment_models: unknown {unknown}; choose among {list(CANDIDATES)}.")
    tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="bench_pipeline_")
    work = Path(work_dir or tmp.name)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); command: python -m scripts.bench.pipeline {shlex.join(sys.argv[1:])}", flush=True)
    rows = []
    for name in candidates:
        print(f"evaluating {name} ...", flush=True)
        rows.append((name, evaluate(name, dataset_dir, split, work)))
    ids = list_ids(dataset_dir, split=split)[:segment_images]
    runs = []
    if ids:
        images = [Path(dataset_dir) / "images" / f"{i}.png" for i in ids]
        for name in segment_models:
            print(f"segment.py with {name} ...", flush=True)
            runs.append((name, segment(SEGMENT_MODELS[name], images, work)))

    classical = next((r for n, r in rows if n == "classical_otsu"), None)
    print(f"\n1. Evaluation workflow on the {split} images "
          "(read, normalise, network, post-process, metrics; start-up excluded)\n")
    print("| candidate | AJI | Dice | AHD | PQ | s/image | MP/s | vs classical |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows:
        mp_s = r["megapixels"] / r["seconds"]
        ratio = f"{mp_s / (classical['megapixels'] / classical['seconds']):.2f}x" if classical else "-"
        print(f"| {name}: {CANDIDATES[name][0]} | {r['aji']:.4f} | {r['dice']:.4f} | {r['ahd']:.2f} | {r['pq']:.4f} | "
              f"{r['seconds'] / r['n_images']:.2f} | {mp_s:.2f} | {ratio} |")
    if runs:
        mp = sum(_pixels(Path(dataset_dir) / "images" / f"{i}.png") for i in ids) / 1e6
        print(f"\n2. The user's command over {len(ids)} {split} images ({mp:.1f} MP), start-up included\n")
        print("| model | command | seconds | MP/s | nuclei |")
        print("| --- | --- | --- | --- | --- |")
        for name, r in runs:
            print(f"| {name} | `{r['command']}` | {r['seconds']:.1f} | {mp / r['seconds']:.2f} | {r['nuclei']:,} |")
    if tmp is not None:
        tmp.cleanup()


def _pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        return im.width * im.height


if __name__ == "__main__":
    fire.Fire(main)
