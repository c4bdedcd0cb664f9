"""Would a second output, a distance map learned from the pseudo-instances, split nuclei better? (issue 29)

    python -m scripts.research.distance_student --dataset_dir ../shared/data/monuseg [--seeds "[0, 1, 2]"] [--paste 6] [--stride 2]
        [--rounds 2] [--save_dir DIR]

The shipped model's foreground (its attention, its stored threshold steps and hole filling) is kept;
only the landscape of the watershed that splits it into nuclei changes. Rows, AJI on the validation
labels and on the training split's labels (mean per image):

- ``shipped``: the stored post-processing (distance transform of the mask, its markers);
- ``bound``: the landscape is the true per-nucleus distance (each labelled nucleus's distance to its own
  outline): what a perfect distance output could give on this foreground. It reads the labels;
- ``learned``: the landscape a distance student predicts, markers its h-maxima (``h`` px); ``mixed``: the
  mean of that and the mask's distance transform.

The distance student is a ``CompactAttentionNet`` body (``stain_prior`` "none": the shipped student's
U-Net at 1/4 resolution; ``--stride 2`` at 1/2) with a sigmoid output, trained with a smooth L1 loss to predict
``min(d, 12) / 12``, ``d`` the distance of a pixel to the outline of its pseudo-instance (0 on
background), on the weight-1 pixels of the pseudo-instance targets of ``selftrain.json`` (stage 1's
confident instances on the training images; no label is read in training). Crops of 256 px with
dihedral flips and a per-channel gain and offset. With ``--paste N`` each crop also gets N of the
image's own pseudo-instances pasted against its nuclei (:func:`paste_touching`): touching nuclei whose
boundary is known. With ``--rounds 2`` the student is the next teacher: its ``mixed`` split (h = 1) of the
shipped foreground on the training images, filtered by ``selftrain.json``'s area and solidity bounds
(rejected instances and the teacher's uncertain background ignored), makes the targets of a second
student of the same seed (:func:`student_targets`; no label read). ``h`` is chosen on the validation
labels; the training split's labels score the choice. docs/self_training.md has the figures.
"""

from __future__ import annotations

import time
from pathlib import Path

import fire
import numpy as np
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser
from monai.transforms import Compose
from scipy import ndimage
from skimage.morphology import disk, h_maxima
from skimage.segmentation import watershed

from custom.evaluation.metrics import aji
from custom.inference.postprocess import (PostprocessParams, _relabel_sequential, attention_foreground, fill_small_holes,
                                          foreground_to_instances)
from custom.model.networks import CompactAttentionNet
from custom.training.pseudo_instances import instance_confidence
from scripts.research.analysis_magnification import _evaluation

CLIP = 12.0  # px: the distance target saturates there (a nucleus's radius at 40x is about 8-15 px)
HEIGHTS = (1.0, 2.0)


def _selftrain_parser(dataset_dir: str, pseudo_cache_dir: str | None) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(["bundle/configs/train.json", "bundle/configs/distill.json", "bundle/configs/selftrain.json"])
    parser.update({"bundle_root": "bundle", "dataset_dir": dataset_dir, "download": False, "pseudo_cache_dir": pseudo_cache_dir})
    return parser


def pseudo_targets(dataset_dir: str, pseudo_cache_dir: str | None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(image ImageNet-normalised ``(3, H, W)``, pseudo-instances ``(H, W)`` int32, weight ``(H, W)``) for each
    training image, from ``selftrain.json``'s targets of stage 1 (cached in ``pseudo_cache_dir``)."""
    parser = _selftrain_parser(dataset_dir, pseudo_cache_dir)
    images = parser.get_parsed_content("selftrain#images")
    steps = Compose([parser.get_parsed_content(k) for k in ("tile_to_float", "stain_normalisation", "selftrain#teacher_input",
                                                              "selftrain#teacher_normalisation", "selftrain#pseudo_labels")])
    out = []
    for i in range(len(images)):
        d = steps(images[i])
        target = np.asarray(d["label"], np.float32)
        instances = ndimage.label(target[0] > 0)[0].astype(np.int32)  # the kept instances, apart by their carved gaps
        out.append((np.asarray(d["teacher_image"], np.float32), instances, target[1].astype(np.float32)))
    return out


def _shipped(parser: ConfigParser):
    """The shipped model, its inferer and stored post-processing, from an evaluation config."""
    model = parser.get_parsed_content("eval#network").eval()
    return model, parser.get_parsed_content("eval#inferer"), PostprocessParams.from_stored(model.postprocess)


def _foreground(x: torch.Tensor, model, inferer, p: PostprocessParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The shipped model's mask, its hole-filled foreground and the smoothed distance transform of that."""
    with torch.no_grad():
        attention = np.asarray(inferer(x, model)[0, 0], np.float32)
    mask = attention_foreground(attention, p)[0]
    fg = fill_small_holes(mask, p.fill_holes) if p.fill_holes else mask
    return mask, fg, ndimage.gaussian_filter(ndimage.distance_transform_edt(fg), 1.0)


def _learned(x: torch.Tensor, net: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return ndimage.gaussian_filter(torch.sigmoid(net.logits(x))[0, 0].numpy() * CLIP, 1.0)


def student_targets(dataset_dir: str, data: list[tuple[np.ndarray, np.ndarray, np.ndarray]], net: torch.nn.Module,
                    pseudo_cache_dir: str | None) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The next round's targets for ``data``'s images: the shipped foreground split by the mean of ``net``'s distance and
    the mask's (h = 1); an instance is kept when its area and solidity are within ``selftrain.json``'s bounds. Weight 0 on
    the rejected instances (dilated as there) and where ``data``'s weight ignored the background; no label is read."""
    parser = _selftrain_parser(dataset_dir, pseudo_cache_dir)
    low, high, solid, dilation = (parser.get_parsed_content(k) for k in ("pseudo_min_area", "pseudo_max_area", "pseudo_min_solidity",
                                                                            "pseudo_ignore_dilation"))
    model, inferer, p = _shipped(_evaluation(dataset_dir, "train"))
    out, kept, total = [], 0, 0
    for image, _, weight in data:
        x = torch.from_numpy(image)[None]
        _, fg, edt = _foreground(x, model, inferer, p)
        labels = _split(0.5 * (_learned(x, net) + edt), fg, 1.0, p.min_size)
        c = instance_confidence([labels], fg, 0.0)  # its area and solidity (the margin, of the mask, is not used)
        good = np.concatenate([[False], (c["area"] >= low) & (c["area"] <= high) & (c["solidity"] >= solid)])
        rejected = (labels > 0) & ~good[labels]
        w = np.where((weight == 0) & ~fg, 0.0, 1.0).astype(np.float32)
        w[ndimage.binary_dilation(rejected, disk(int(dilation)).astype(bool))] = 0.0
        instances = np.where(good[labels], labels, 0)
        out.append((image, _relabel_sequential(instances), w))
        kept, total = kept + int(good.sum()), total + int(labels.max())
    print(f"next round's targets: {kept} of {total} instances kept", flush=True)
    return out


def nucleus_bank(image: np.ndarray, instances: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pixels ``(3, h, w)``, mask ``(h, w)``) of each pseudo-instance of one image, for pasting."""
    return [(image[(slice(None), *box)], instances[box] == k) for k, box in enumerate(ndimage.find_objects(instances), 1) if box is not None]


def beside(anchor: np.ndarray, mask: np.ndarray, factor: float, angle: float) -> np.ndarray:
    """The ``(y, x)`` centre at which ``mask`` lies against the instance ``anchor`` (a boolean map of the crop):
    ``factor`` times the sum of their equivalent radii from the anchor's centroid, in the direction ``angle``."""
    reach = (np.sqrt(anchor.sum() / np.pi) + np.sqrt(mask.sum() / np.pi)) * factor
    return np.argwhere(anchor).mean(0) + reach * np.array([np.sin(angle), np.cos(angle)])


def placement(size: tuple[int, int], shape: tuple[int, int], centre) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """Where a patch of ``shape`` centred at ``centre`` lies in a crop of ``size``, clipped to it: (the crop's
    slices, the patch's slices), or None when it falls outside the crop."""
    y0, x0 = (int(round(c - m / 2)) for c, m in zip(centre, shape))
    ys, xs = slice(max(y0, 0), min(y0 + shape[0], size[0])), slice(max(x0, 0), min(x0 + shape[1], size[1]))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return None
    return (ys, xs), (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))


def paste_touching(image: np.ndarray, instances: np.ndarray, weight: np.ndarray, bank, n: int, rng) -> None:
    """Paste ``n`` nuclei of ``bank`` (rotated by a random multiple of 90 degrees) in place, each against a nucleus of the crop, so that
    they touch or overlap it: pseudo-instances with a known boundary between touching nuclei."""
    for _ in range(n):
        pixels, mask = bank[rng.integers(len(bank))]
        k = int(rng.integers(4))
        pixels, mask = np.rot90(pixels, k, (1, 2)), np.rot90(mask, k)
        ids = np.unique(instances[instances > 0])
        if len(ids):
            centre = beside(instances == rng.choice(ids), mask, rng.uniform(0.7, 1.0), rng.uniform(0, 2 * np.pi))
        else:
            centre = rng.uniform(0, instances.shape)
        where = placement(instances.shape, mask.shape, centre)
        if where is None:
            continue
        crop, patch = where
        m = mask[patch]
        image[(slice(None), *crop)][:, m] = pixels[(slice(None), *patch)][:, m]
        instances[crop][m] = instances.max() + 1
        weight[crop][m] = 1.0


def train(data: list[tuple[np.ndarray, np.ndarray, np.ndarray]], seed: int, iterations: int, paste: int = 0, crop: int = 256,
          batch: int = 8, stride: int = 4) -> torch.nn.Module:
    """The distance student, trained on ``data`` (see the module docstring); ``paste`` nuclei pasted per crop;
    ``stride`` its pixel-unshuffle factor (4: the shipped student's 1/4 resolution)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    banks = [nucleus_bank(image, instances) for image, instances, _ in data]
    distances = [np.minimum(_own_distance(instances, outline_on_background=False), CLIP) / CLIP for _, instances, _ in data]
    net = CompactAttentionNet(stain_prior="none", stride=stride)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iterations)
    start = time.time()
    for it in range(1, iterations + 1):
        xs, ys = [], []
        for _ in range(batch):
            i = int(rng.integers(len(data)))
            image, instances, weight = data[i]
            y0, x0 = (int(rng.integers(0, s - crop + 1)) for s in image.shape[1:])
            x = image[:, y0:y0 + crop, x0:x0 + crop].copy()
            labels, w = instances[y0:y0 + crop, x0:x0 + crop].copy(), weight[y0:y0 + crop, x0:x0 + crop].copy()
            if paste and banks[i]:  # the distance of the crop with its pasted nuclei (a nucleus cut by its edge looks smaller)
                paste_touching(x, labels, w, banks[i], paste, rng)
                y = np.stack([np.minimum(_own_distance(labels, outline_on_background=False), CLIP) / CLIP, w])
            else:
                y = np.stack([distances[i][y0:y0 + crop, x0:x0 + crop], w])
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
    return _relabel_sequential(np.where(orphans > 0, orphans + labels.max(), labels), min_size)  # as mask_to_instances ends


def _own_distance(labels: np.ndarray, outline_on_background: bool = True) -> np.ndarray:
    """Each instance's pixels' distance to its own outline: the pixels next to another instance are its
    outline, and (``outline_on_background``) those next to the background too; without, apart instances
    get the distance transform of the foreground."""
    edge = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        a, b = [slice(None)] * 2, [slice(None)] * 2
        a[axis], b[axis] = slice(None, -1), slice(1, None)
        first, second = labels[tuple(a)], labels[tuple(b)]
        change = first != second
        if not outline_on_background:
            change &= (first > 0) & (second > 0)
        edge[tuple(a)] |= change
        edge[tuple(b)] |= change
    return ndimage.distance_transform_edt((labels > 0) & ~edge)


def score(dataset_dir: str, split: str, students: dict[str, torch.nn.Module]) -> dict[str, float]:
    """Mean AJI per row (see the module docstring) on ``split``'s labels."""
    parser = _evaluation(dataset_dir, split)
    (model, inferer, p), dataset = _shipped(parser), parser.get_parsed_content("eval#dataset")
    rows: dict[str, list[float]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        x = torch.as_tensor(item["image"])[None]
        gt = np.asarray(item["label"])[0].astype(np.int64)
        mask, fg, edt = _foreground(x, model, inferer, p)
        found = {"shipped": foreground_to_instances(mask, p)}
        bound = ndimage.gaussian_filter(_own_distance(gt), 1.0)
        for h in HEIGHTS:
            found[f"bound h={h:g}"] = _split(bound, fg, h, p.min_size)
        for name, net in students.items():
            learned = _learned(x, net)
            for h in HEIGHTS:
                found[f"learned {name} h={h:g}"] = _split(learned, fg, h, p.min_size)
                found[f"mixed {name} h={h:g}"] = _split(0.5 * (learned + edt), fg, h, p.min_size)
        for k, labels in found.items():
            rows.setdefault(k, []).append(aji(gt, labels))
    return {k: float(np.mean(v)) for k, v in rows.items()}


def main(dataset_dir: str, seeds=(0, 1, 2), iterations: int = 2000, paste: int = 0,
         pseudo_cache_dir: str | None = "bundle/runs/pseudo_cache", stride: int = 4, crop: int = 256, rounds: int = 1,
         save_dir: str | None = None) -> None:
    """Train a distance student per seed (``paste``: nuclei pasted per crop; ``stride``: its resolution, 4 the
    shipped student's 1/4; ``crop``: the training crops' size; ``rounds``: each round's student makes the next
    one's targets; ``save_dir``: where each student's weights go) and print the AJI table (markdown)."""
    if int(rounds) < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    data = pseudo_targets(dataset_dir, pseudo_cache_dir)
    students = {}
    for s in seeds:
        targets = data
        for r in range(1, int(rounds) + 1):
            if r > 1:
                targets = student_targets(dataset_dir, data, net, pseudo_cache_dir)
            net = train(targets, int(s), iterations, paste, crop=int(crop), stride=int(stride))
            name = f"s{s}" + (f" round {r}" if int(rounds) > 1 else "")
            students[name] = net
            if save_dir:
                Path(save_dir).mkdir(parents=True, exist_ok=True)
                torch.save(net.state_dict(), Path(save_dir) / f"{name.replace(' ', '_')}.pt")
    tables = {split: score(dataset_dir, split, students) for split in ("val", "train")}
    print("| landscape | val AJI | training-split AJI |\n| --- | --- | --- |")
    for k in tables["val"]:
        print(f"| {k} | {tables['val'][k]:.4f} | {tables['train'][k]:.4f} |")


if __name__ == "__main__":
    fire.Fire(main)
