"""Would a second output, a distance map learned from the pseudo-instances, split nuclei better? (issue 29)

    python -m scripts.research.distance_student --dataset_dir ../shared/data/monuseg [--seeds "[0, 1, 2]"]

The shipped model's foreground (its attention, its stored threshold steps and hole filling) is kept;
only the landscape of the watershed that splits it into nuclei changes. Rows, AJI on the validation
labels and on the training split's labels (mean per image):

- ``shipped``: the stored post-processing (distance transform of the mask, its markers);
- ``bound``: the landscape is the true per-nucleus distance (each labelled nucleus's distance to its own
  outline): what a perfect distance output could give on this foreground. It reads the labels;
- ``learned``: the landscape a distance student predicts, markers its h-maxima (``h`` px); ``mixed``: the
  mean of that and the mask's distance transform.

The distance student is a ``CompactAttentionNet`` body (``stain_prior`` "none": the shipped student's
U-Net at 1/4 resolution) with a sigmoid output, trained with a smooth L1 loss to predict
``min(d, 12) / 12``, ``d`` the distance of a pixel to the outline of its pseudo-instance (0 on
background), on the weight-1 pixels of the pseudo-instance targets of ``selftrain.json`` (stage 1's
confident instances on the training images; no label is read in training). Crops of 256 px with
dihedral flips and a per-channel gain and offset. ``h`` is chosen on the validation labels; the
training split's labels score the choice.
"""

from __future__ import annotations

import time

import fire
import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.transforms import Compose
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import watershed

from custom.evaluation.metrics import aji
from custom.inference.postprocess import PostprocessParams, attention_foreground, fill_small_holes, foreground_to_instances
from custom.model.networks import CompactAttentionNet
from scripts.research.analysis_magnification import _evaluation

CLIP = 12.0  # px: the distance target saturates there (a nucleus's radius at 40x is about 8-15 px)
HEIGHTS = (1.0, 2.0)


def pseudo_targets(dataset_dir: str, pseudo_cache_dir: str | None) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image ImageNet-normalised ``(3, H, W)``, distance target and weight ``(2, H, W)``) for each training
    image, from ``selftrain.json``'s pseudo-instances of stage 1 (cached in ``pseudo_cache_dir``)."""
    parser = ConfigParser()
    parser.read_config(["bundle/configs/train.json", "bundle/configs/distill.json", "bundle/configs/selftrain.json"])
    parser.update({"bundle_root": "bundle", "dataset_dir": dataset_dir, "download": False, "pseudo_cache_dir": pseudo_cache_dir})
    images = parser.get_parsed_content("selftrain#images")
    steps = Compose([parser.get_parsed_content(k) for k in ("tile_to_float", "stain_normalisation", "selftrain#teacher_input",
                                                              "selftrain#teacher_normalisation", "selftrain#pseudo_labels")])
    out = []
    for i in range(len(images)):
        d = steps(images[i])
        target = np.asarray(d["label"], np.float32)
        distance = np.minimum(ndimage.distance_transform_edt(target[0] > 0), CLIP) / CLIP
        out.append((np.asarray(d["teacher_image"], np.float32), np.stack([distance, target[1]]).astype(np.float32)))
    return out


def train(data: list[tuple[np.ndarray, np.ndarray]], seed: int, iterations: int, crop: int = 256, batch: int = 8) -> torch.nn.Module:
    """The distance student, trained on ``data`` (see the module docstring)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = CompactAttentionNet(stain_prior="none")
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
    start = time.time()
    for it in range(1, iterations + 1):
        xs, ys = [], []
        for _ in range(batch):
            image, target = data[rng.integers(len(data))]
            y0, x0 = (int(rng.integers(0, s - crop + 1)) for s in image.shape[1:])
            x, y = image[:, y0:y0 + crop, x0:x0 + crop], target[:, y0:y0 + crop, x0:x0 + crop]
            k = int(rng.integers(4))
            x, y = np.rot90(x, k, (1, 2)), np.rot90(y, k, (1, 2))
            if rng.random() < 0.5:
                x, y = x[:, :, ::-1], y[:, :, ::-1]
            xs.append(np.ascontiguousarray(x * rng.uniform(0.85, 1.15, (3, 1, 1)) + rng.uniform(-0.2, 0.2, (3, 1, 1))))
            ys.append(np.ascontiguousarray(y))
        y = torch.from_numpy(np.stack(ys)).float()
        pred = torch.sigmoid(net.logits(torch.from_numpy(np.stack(xs)).float()))
        weight = y[:, 1:]
        loss = (weight * F.smooth_l1_loss(pred, y[:, :1], reduction="none", beta=0.1)).sum() / weight.sum().clamp_min(1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        if it % 250 == 0:
            print(f"seed {seed} iteration {it}/{iterations}: loss {loss.item():.4f}, {time.time() - start:.0f} s", flush=True)
    return net.eval()


def _split(landscape: np.ndarray, fg: np.ndarray, h: float, min_size: int) -> np.ndarray:
    markers, _ = ndimage.label(h_maxima(landscape.astype(np.float32), h) & fg)
    labels = watershed(-landscape, markers, mask=fg)
    orphans, _ = ndimage.label(fg & (labels == 0))
    labels = np.where(orphans > 0, orphans + labels.max(), labels)
    sizes = np.bincount(labels.ravel())
    labels[(sizes < min_size)[labels]] = 0
    return labels


def _true_distance(gt: np.ndarray) -> np.ndarray:
    """Each labelled nucleus's pixels' distance to its own outline (pixels next to another id are its outline)."""
    edge = np.zeros(gt.shape, bool)
    for axis in (0, 1):
        change = np.diff(gt, axis=axis) != 0
        lo = [slice(None)] * 2
        hi = [slice(None)] * 2
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        edge[tuple(lo)] |= change
        edge[tuple(hi)] |= change
    return ndimage.distance_transform_edt((gt > 0) & ~edge)


def score(dataset_dir: str, split: str, students: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Mean AJI per row (see the module docstring) on ``split``'s labels."""
    parser = _evaluation(dataset_dir, split)
    model = parser.get_parsed_content("eval#network").eval()
    inferer, dataset = parser.get_parsed_content("eval#inferer"), parser.get_parsed_content("eval#dataset")
    p = PostprocessParams.from_stored(model.postprocess)
    rows: dict[str, list[float]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        x = torch.as_tensor(item["image"])[None]
        gt = np.asarray(item["label"])[0].astype(np.int64)
        with torch.no_grad():
            attention = np.asarray(inferer(x, model)[0, 0], np.float32)
        mask = attention_foreground(attention, p)[0]
        fg = fill_small_holes(mask, p.fill_holes) if p.fill_holes else mask
        edt = ndimage.gaussian_filter(ndimage.distance_transform_edt(fg), 1.0)
        found = {"shipped": foreground_to_instances(mask, p)}
        for h in HEIGHTS:
            found[f"bound h={h:g}"] = _split(ndimage.gaussian_filter(_true_distance(gt), 1.0), fg, h, p.min_size)
        for name, net in students.items():
            with torch.no_grad():
                learned = ndimage.gaussian_filter(torch.sigmoid(net.logits(x))[0, 0].numpy() * CLIP, 1.0)
            for h in HEIGHTS:
                found[f"learned {name} h={h:g}"] = _split(learned, fg, h, p.min_size)
                found[f"mixed {name} h={h:g}"] = _split(0.5 * (learned + edt), fg, h, p.min_size)
        for k, labels in found.items():
            rows.setdefault(k, []).append(aji(gt, labels))
    return {k: float(np.mean(v)) for k, v in rows.items()}


def main(dataset_dir: str, seeds=(0, 1, 2), iterations: int = 2000, pseudo_cache_dir: str | None = "bundle/runs/pseudo_cache") -> None:
    """Train a distance student per seed and print the AJI table (markdown)."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = pseudo_targets(dataset_dir, pseudo_cache_dir)
    students = {f"s{s}": train(data, int(s), iterations) for s in seeds}
    tables = {split: score(dataset_dir, split, students) for split in ("val", "train")}
    print("| landscape | val AJI | training-split AJI |\n| --- | --- | --- |")
    for k in tables["val"]:
        print(f"| {k} | {tables['val'][k]:.4f} | {tables['train'][k]:.4f} |")


if __name__ == "__main__":
    fire.Fire(main)
