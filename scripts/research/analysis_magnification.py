"""The network and post-processing at 20x for 40x images (issue 28's candidate): validation and
training-split AJI against the 40x labels, and the seconds of network + post-processing.

    python -m scripts.research.analysis_magnification --dataset_dir ../shared/data/monuseg

Each MoNuSeg image (40x) is halved by 2x2 means, normalised and passed through the shipped model as in
the bundle's evaluation (TTA off), and post-processed at 20x; the instances come back to 40x by
repeating each pixel 2x2 ("nearest"), or, "sub-pixel", with the foreground's outline redrawn at 40x
from the bilinearly enlarged threshold margin (the smaller of the blurred attention minus the Otsu
threshold and minus the local mean; pixels of a 20x instance's interior stay). Post-processing sets:

- ``scaled``: the stored 40x parameters with lengths halved and areas quartered (odd block size);
- ``tuned``: the best of a grid around it (:data:`GRID`) on the validation images (sub-pixel), then
  scored on the training split's labels, which no choice used.

The 40x row is the shipped path on the same images. Prints a markdown table.
"""

from __future__ import annotations

import itertools
import time

import fire
import numpy as np
import torch
from monai.bundle import ConfigParser
from scipy import ndimage

from custom.evaluation.metrics import aji
from custom.inference.postprocess import PostprocessParams, attention_foreground, attention_to_instances, foreground_to_instances, local_threshold

GRID = {"footprint_radius": [2, 3], "marker_h": [0.25, 0.5], "min_size": [20, 30, 40], "local_block_size": [29, 39, 51],
        "attention_sigma": [0.5, 1.0], "sigma": [0.5, 1.0]}


def _evaluation(dataset_dir: str, split: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(["bundle/configs/train.json", "bundle/configs/evaluate.json"])
    parser.update({"bundle_root": "bundle", "dataset_dir": dataset_dir, "eval_split": split})
    return parser


def _halve(image: np.ndarray) -> np.ndarray:
    c, h, w = image.shape
    return np.round(image[:, : h // 2 * 2, : w // 2 * 2].astype(np.float32).reshape(c, h // 2, 2, w // 2, 2).mean((2, 4))).astype(np.uint8)


def _fit(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``x`` cropped or zero-padded (bottom, right) to ``shape``."""
    out = np.zeros(shape, x.dtype)
    out[: min(shape[0], x.shape[0]), : min(shape[1], x.shape[1])] = x[: shape[0], : shape[1]]
    return out


def _enlarge(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Each pixel repeated 2x2, fitted to ``shape``."""
    return _fit(np.repeat(np.repeat(labels, 2, 0), 2, 1), shape)


def instances_at_20x(attention: np.ndarray, params: PostprocessParams, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``(nearest, sub_pixel)`` 40x instance maps of ``shape`` from a 20x attention map."""
    mask, threshold, blurred = attention_foreground(attention, params)
    labels = foreground_to_instances(mask, params)
    margin = blurred - threshold
    if params.local_block_size:
        local = local_threshold(blurred, params.local_block_size, params.local_offset)
        margin = np.minimum(margin, blurred - local)
    outline = _fit(ndimage.zoom(margin.astype(np.float32), 2, order=1, grid_mode=True, mode="nearest") > 0, shape)
    interior = _enlarge(ndimage.binary_erosion(labels > 0, border_value=1), shape)
    nearest = _enlarge(labels, shape)
    return nearest, np.where(outline | interior, nearest, 0)


def _maps(dataset_dir: str, split: str) -> tuple[list, dict]:
    """Per image ``(attention at 40x, attention at 20x, label)``, and the stored post-processing parameters."""
    parser = _evaluation(dataset_dir, split)
    preprocessing, network = parser.get_parsed_content("eval#preprocessing"), parser.get_parsed_content("eval#network").eval()
    inferer, dataset = parser.get_parsed_content("eval#inferer"), parser.get_parsed_content("eval#dataset")
    dataset.transform = None
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        maps = []
        for image in (item["image"], _halve(item["image"])):
            x = preprocessing({"image": image, "label": np.zeros((1, *image.shape[1:]), np.int32)})["image"]
            with torch.no_grad():
                maps.append(np.asarray(inferer(x[None], network)[0, 0], np.float32))
        out.append((*maps, item["label"][0]))
    return out, parser.get_parsed_content("eval#postprocess_params")


def _halved_params(stored: dict) -> dict:
    p = dict(stored)
    p.update(sigma=stored["sigma"] / 2, footprint_radius=max(1, round(stored["footprint_radius"] / 2)),
             min_size=stored["min_size"] // 4, attention_sigma=stored["attention_sigma"] / 2, marker_h=stored["marker_h"] / 2,
             fill_holes=stored["fill_holes"] // 4)
    block = round(stored["local_block_size"] / 2)
    p["local_block_size"] = block + (1 - block % 2) if block else 0
    return p


def _score(data: list, params: dict) -> tuple[float, float, float]:
    """Mean AJI (nearest, sub-pixel) at 20x and the seconds of its post-processing."""
    p = PostprocessParams.from_mapping(params)
    nearest, sub, seconds = [], [], 0.0
    for _, a20, label in data:
        t0 = time.perf_counter()
        n, s = instances_at_20x(a20, p, label.shape)
        seconds += time.perf_counter() - t0
        nearest.append(aji(label, n))
        sub.append(aji(label, s))
    return float(np.mean(nearest)), float(np.mean(sub)), seconds


def main(dataset_dir: str = "../shared/data/monuseg") -> None:
    val, stored = _maps(dataset_dir, "val")
    train, _ = _maps(dataset_dir, "train")
    rows = []
    for name, data in (("val", val), ("train", train)):
        t0 = time.perf_counter()
        full = [aji(label, attention_to_instances(a40, **stored)) for a40, _, label in data]
        rows.append((f"40x (shipped), {name}", float(np.mean(full)), None, time.perf_counter() - t0))
    scaled = _halved_params(stored)
    best, best_params = -1.0, None
    for values in itertools.product(*GRID.values()):
        params = dict(scaled, **dict(zip(GRID, values)))
        sub = _score(val, params)[1]
        if sub > best:
            best, best_params = sub, params
    for label, params in (("scaled", scaled), ("tuned on val", best_params)):
        for name, data in (("val", val), ("train", train)):
            n, s, seconds = _score(data, params)
            rows.append((f"20x {label}, {name}", n, s, seconds))
    print("tuned parameters:", {k: best_params[k] for k in GRID})
    print("| analysis | AJI (nearest) | AJI (sub-pixel) | post-processing s |\n| --- | --- | --- | --- |")
    for name, n, s, seconds in rows:
        print(f"| {name} | {n:.4f} | {'' if s is None else f'{s:.4f}'} | {seconds:.1f} |")


if __name__ == "__main__":
    fire.Fire(main)
