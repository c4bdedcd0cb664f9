"""Would two teachers make better pseudo-instances than one? (issue 29) The shipped student's instances
and the tuned hematoxylin local-threshold pipeline's, combined on the same images and scored on the
labels: an upper bound of what a student of their combination could reach by copying it.

    python -m scripts.research.teacher_combinations --dataset_dir ../shared/data/monuseg

Combinations (each pipeline with its stored, tuned post-processing, TTA off):

- ``A + lonely B``: A's instances plus those of B of which at most 10 % lies on A's foreground;
- ``foreground union`` / ``intersection``: the two foregrounds joined or intersected, then split by
  the hematoxylin pipeline's watershed (its post-processing steps 2-6).

Prints the mean AJI per split (validation, training) as a markdown table.
"""

from __future__ import annotations

import fire
import numpy as np
from monai.bundle import ConfigParser

from custom.evaluation.metrics import aji
from custom.inference.postprocess import PostprocessParams, attention_to_instances, foreground_to_instances
from scripts.tune_postprocess import attention_maps

BASELINE = ["bundle/configs/baselines/hematoxylin_local.json", "bundle/configs/baselines/hematoxylin_local_tuned.json"]


def instances(dataset_dir: str, split: str, extra: list[str]) -> tuple[list[np.ndarray], list[np.ndarray], dict]:
    """The evaluation workflow's instances of ``split`` (its own preprocessing, network, inferer and
    stored post-processing; ``extra``: override files), the labels, and the post-processing parameters."""
    parser = ConfigParser()
    parser.read_config(["bundle/configs/train.json", "bundle/configs/evaluate.json", *extra])
    parser.update({"bundle_root": "bundle", "dataset_dir": dataset_dir, "eval_split": split})
    params = parser.get_parsed_content("eval#postprocess_params")
    maps, _ = attention_maps(parser)
    return [attention_to_instances(a, **params) for a, _ in maps], [label for _, label in maps], params


def add_lonely(base: np.ndarray, other: np.ndarray, max_overlap: float = 0.1) -> np.ndarray:
    """``base`` plus the instances of ``other`` of which at most ``max_overlap`` lies on ``base``'s foreground."""
    out, n, foreground = base.copy(), int(base.max()), base > 0
    ids, areas = np.unique(other[other > 0], return_counts=True)
    shared = np.bincount(other[foreground].ravel(), minlength=int(other.max()) + 1)
    for i, area in zip(ids, areas):
        if shared[i] <= max_overlap * area:
            n += 1
            out[(other == i) & ~foreground] = n
    return out


def main(dataset_dir: str = "../shared/data/monuseg") -> None:
    names = ["student", "hematoxylin local", "student + lonely hematoxylin", "hematoxylin + lonely student",
             "foreground union", "foreground intersection"]
    table = {}
    for split in ("val", "train"):
        student, labels, _ = instances(dataset_dir, split, [])
        hematoxylin, _, hematoxylin_params = instances(dataset_dir, split, BASELINE)
        split_params = PostprocessParams.from_mapping(hematoxylin_params)
        scores = {name: [] for name in names}
        for s, h, label in zip(student, hematoxylin, labels, strict=True):
            for name, pred in zip(names, (s, h, add_lonely(s, h), add_lonely(h, s), foreground_to_instances((s > 0) | (h > 0), split_params),
                                          foreground_to_instances((s > 0) & (h > 0), split_params))):
                scores[name].append(aji(label, pred))
        table[split] = {name: float(np.mean(v)) for name, v in scores.items()}
    print("| combination | val AJI | training-split AJI |\n| --- | --- | --- |")
    for name in names:
        print(f"| {name} | {table['val'][name]:.4f} | {table['train'][name]:.4f} |")


if __name__ == "__main__":
    fire.Fire(main)
