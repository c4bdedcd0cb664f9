"""Figures for the README and model card, from a trained model and a training run.

    python scripts/figures.py attention --model bundle/models/model.pt --dataset_dir ../shared/data/monuseg \\
        --out bundle/docs/images/attention_val.png
    python scripts/figures.py curves --run_dir bundle/runs/train --out bundle/docs/images/training_curves.png

``attention`` builds the network and the stain normalisation from the bundle's
config (so overrides such as ``--width`` match the run), computes attention maps
of whole validation images, draws image / attention / binarised attention with
the ground-truth outlines, and prints the foreground Dice of ``A > 0.5`` (and of
the inverted map) per image. Labels are read only here, for the figure and the
printed check; training never reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from custom.data import downsample, list_ids, load_rgb
from custom.networks import autocast_context, load_attention_weights


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2.0 * np.logical_and(a, b).sum() / s) if s else 1.0


def attention(model: str, dataset_dir: str, split: str = "val", n: int = 3, out: str = "bundle/docs/images/attention_val.png",
              config_file: str = str(REPO / "bundle/configs/train.json"), magnification: float = 40, width: int | None = None,
              ids=None) -> None:
    """Attention maps of whole images of ``split``; draws the first ``n``, prints Dice for all.
    ``model`` is an exported ``model.pt`` or a training checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from monai.bundle import ConfigParser
    from monai.transforms import Compose
    from PIL import Image
    from skimage.segmentation import find_boundaries

    parser = ConfigParser()
    parser.read_config(config_file)
    parser["data_root"] = dataset_dir
    if width is not None:
        parser["width"] = int(width)
    net = load_attention_weights(parser.get_parsed_content("network_def"), model).eval()
    prep = Compose([parser.get_parsed_content(k) for k in ("tile_to_float", "stain_normalisation", "imagenet_normalisation")])
    base = float(parser.get_parsed_content("base_magnification"))
    amp = parser.get_parsed_content("amp_dtype")
    ids = list(ids) if ids else list_ids(dataset_dir, split=split)
    rows, dices = [], []
    for image_id in ids:
        rgb = np.moveaxis(load_rgb(Path(dataset_dir) / "images" / f"{image_id}.png"), -1, 0)
        rgb = downsample(rgb, base / magnification)
        x = torch.as_tensor(np.asarray(prep({"image": rgb})["image"]))[None].float()
        with torch.no_grad(), autocast_context("cpu", amp):
            a = net(x)[0, 0].float().numpy()
        with Image.open(Path(dataset_dir) / "labels" / f"{image_id}.png") as im:
            label = np.asarray(im)
        if label.shape != a.shape:
            label = np.asarray(Image.fromarray(label.astype(np.int32)).resize(a.shape[::-1], Image.NEAREST))
        fg = label > 0
        d, d_inv = _dice(a > 0.5, fg), _dice(a <= 0.5, fg)
        dices.append((d, d_inv))
        print(f"{image_id}: attended {100 * (a > 0.5).mean():.1f} % of pixels, nuclei {100 * fg.mean():.1f} %, "
              f"Dice(A>0.5, nuclei) {d:.3f}, Dice(A<=0.5, nuclei) {d_inv:.3f}")
        if len(rows) < n:
            rows.append((image_id, np.moveaxis(rgb, 0, -1), a, find_boundaries(label, mode="inner")))
    mean = np.mean(dices, axis=0)
    print(f"mean over {len(ids)} images: Dice(A>0.5) {mean[0]:.3f}, Dice(inverted) {mean[1]:.3f}")
    fig, axes = plt.subplots(len(rows), 3, figsize=(12, 4 * len(rows)), squeeze=False)
    for r, (image_id, rgb, a, edges) in enumerate(rows):
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_title(f"{image_id} ({magnification:g}x)", fontsize=9)
        axes[r, 1].imshow(a, cmap="magma", vmin=0, vmax=1)
        axes[r, 1].set_title("attention A", fontsize=9)
        overlay = rgb.copy()
        overlay[a > 0.5] = (0.5 * overlay[a > 0.5] + 0.5 * np.array([0, 255, 255])).astype(np.uint8)
        overlay[edges] = (255, 255, 0)
        axes[r, 2].imshow(overlay)
        axes[r, 2].set_title(f"A > 0.5 (cyan), true nuclei outlines (yellow); Dice {dices[r][0]:.2f}", fontsize=9)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def curves(run_dir: str, out: str = "bundle/docs/images/training_curves.png", smooth: int = 10) -> None:
    """Training losses, scale accuracy (train batches, moving average of ``smooth``), tau and
    validation scale accuracy from the TensorBoard events in ``run_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
    tags = acc.Tags()["scalars"]
    if "train/loss" not in tags:
        raise SystemExit(f"{run_dir}: no training scalars (train/loss) in its TensorBoard events.")

    def series(tag):
        ev = acc.Scalars(tag)
        return np.array([e.step for e in ev]), np.array([e.value for e in ev])

    def moving(v):
        k = max(1, min(int(smooth), len(v)))
        return np.convolve(v, np.ones(k) / k, mode="valid")

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for tag in ("train/loss", "train/loss_scale", "train/loss_smooth", "train/loss_equiv"):
        if tag in tags:
            s, v = series(tag)
            axes[0].plot(s[len(s) - len(moving(v)):], moving(v), label=tag.split("/")[1])
    axes[0].set_xlabel("iteration")
    axes[0].set_title("losses")
    axes[0].legend()
    s, v = series("train/accuracy")
    axes[1].plot(s[len(s) - len(moving(v)):], moving(v), label="train batches")
    if "val_scale_accuracy" in tags:
        vs, vv = series("val_scale_accuracy")
        per_epoch = len(s) / max(1, vs.max()) if len(vs) else 1
        axes[1].plot(vs * per_epoch, vv, "o-", label="validation (per epoch)")
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("iteration")
    axes[1].set_title("scale accuracy (chance 1/3)")
    axes[1].legend()
    if "train/tau" in tags:
        s, v = series("train/tau")
        axes[2].plot(s, v)
    axes[2].set_xlabel("iteration")
    axes[2].set_title("tau (93rd-percentile logit, batch mean)")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    fire.Fire({"attention": attention, "curves": curves})
