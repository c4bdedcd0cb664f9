"""How much nuclear contrast each stain normalisation leaves: hematoxylin + Otsu on
each normalised image, scored by foreground Dice against the true nuclei.

The hematoxylin optical density (colour deconvolution, as F's prior computes it) is
clipped to its 0.5-99.5 percentiles first, because a normalisation can saturate a few
chromatin pixels to black (optical density ~25 instead of ~1), and so many outliers
would decide Otsu's threshold; then Gaussian smoothing (sigma 1 px) and one Otsu
threshold per image, as the ``hematoxylin_otsu`` baseline does.

    python scripts/research/compare_stain_normalisation.py --dataset_dir ../shared/data/monuseg

Each setting is ``(brightness_percentile, max_std_ratio)`` as in ``train.json``
(``brightness_percentile`` / ``reinhard_max_std_ratio``); its Reinhard target is
computed from the ``target_split`` images with the same brightness setting, as
training does. ``raw`` is the image without normalisation. Prints one markdown row
per image and the mean; labels are read only to score. Needs no model.
"""

from __future__ import annotations

from pathlib import Path

import fire
import numpy as np
import torch

DEFAULT_SETTINGS = ((90, None), (None, 1.5), (None, 1.25), (None, 2.0))


def _name(setting) -> str:
    if setting is None:
        return "raw"
    percentile, ratio = setting
    return f"brightness {percentile}, cap {ratio}"


def compare(dataset_dir: str, split: str = "val", target_split: str = "train", settings=DEFAULT_SETTINGS) -> dict:
    """Print the table; return ``{setting name: mean Dice}``."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    from custom.model.networks import HematoxylinDensity
    from custom.transforms import IMAGENET_MEAN, IMAGENET_STD
    from custom.data.prepared import list_ids, load_label, load_rgb
    from custom.training.tiles import reinhard_target
    from custom.evaluation.metrics import dice_foreground
    from custom.transforms import ReinhardNormalize

    root = Path(dataset_dir)
    try:
        settings = [(None if p is None else float(p), None if r is None else float(r)) for p, r in settings]
    except (TypeError, ValueError):
        raise SystemExit(f"--settings must be a list of (brightness_percentile, max_std_ratio) pairs, got {settings!r}.") from None
    ids = list_ids(root, split=split)
    target_images = [load_rgb(root / "images" / f"{i}.png") for i in list_ids(root, split=target_split)]
    normalisers = [None]
    for percentile, ratio in settings:
        means, stds = reinhard_target(target_images, None, percentile)
        normalisers.append(ReinhardNormalize(means, stds, percentile, ratio))
    names = [_name(None)] + [_name(s) for s in settings]
    hematoxylin = HematoxylinDensity()
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)[:, None, None]
    std = np.asarray(IMAGENET_STD, dtype=np.float32)[:, None, None]
    scores = {name: [] for name in names}
    print("| image | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for image_id in ids:
        rgb = np.moveaxis(load_rgb(root / "images" / f"{image_id}.png"), -1, 0).astype(np.float32) / 255.0
        truth = load_label(root / "labels" / f"{image_id}.png")
        row = []
        for name, normalise in zip(names, normalisers):
            image = rgb if normalise is None else np.asarray(normalise(rgb), dtype=np.float32)
            x = torch.from_numpy((image - mean) / std)[None]
            with torch.no_grad():
                h = hematoxylin(x)[0, 0].numpy()
            h = ndimage.gaussian_filter(np.clip(h, *np.percentile(h, [0.5, 99.5])), 1.0)
            mask = h > threshold_otsu(h) if np.ptp(h) > 0 else np.zeros(h.shape, bool)
            scores[name].append(dice_foreground(truth, mask.astype(np.uint8)))
            row.append(f"{scores[name][-1]:.3f}")
        print(f"| {image_id} | " + " | ".join(row) + " |", flush=True)
    means = {name: float(np.mean(v)) for name, v in scores.items()}
    print("| **mean** | " + " | ".join(f"**{means[n]:.3f}**" for n in names) + " |")
    return means


def main(dataset_dir: str, split: str = "val", target_split: str = "train", settings=DEFAULT_SETTINGS) -> None:
    compare(dataset_dir, split, target_split, settings)


if __name__ == "__main__":
    fire.Fire(main)
