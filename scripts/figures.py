"""Figures for the README and model card, from a trained model and a training run.

    python scripts/figures.py attention --dataset_dir ../shared/data/monuseg    # bundle/runs/figures/attention_val.png
    python scripts/figures.py curves --run_dir bundle/runs/train                # bundle/runs/train/training_curves.png

Nothing under ``bundle/docs`` changes unless ``--out`` names it. The model card's figures are these two
outputs (``bundle/docs/images/attention_val.jpg`` is the PNG re-saved as JPEG, quality 85, to stay under
400 KB; ``training_curves.png`` as drawn).

``attention`` builds the network and the stain normalisation from the bundle's
config (so overrides such as ``--width`` match the run), computes attention maps
of whole validation images, draws image / attention / binarised attention with
the ground-truth outlines, and prints the foreground Dice of ``A > 0.5`` (and of
the inverted map) per image. Labels are read only here, for the figure and the
printed check; training never reads them.
"""

from __future__ import annotations

from pathlib import Path

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def attention(model: str = str(REPO / "bundle/models/model.pt"), dataset_dir: str = "data/monuseg", split: str = "val", n: int = 3,
              out: str = "bundle/runs/figures/attention_val.png", config: str | None = None, tta: bool = True, ids=None,
              crop: int = 400) -> None:
    """Attention maps and nucleus instances of whole images of ``split``, through the
    evaluation workflow's own preprocessing, inferer and (tuned) post-processing;
    draws the first ``n`` (a ``crop`` x ``crop`` corner of each), prints Dice for all.

    Args:
        model: an exported ``model.pt`` (or training checkpoint) carrying its stain target.
        config: an override the model was trained with (e.g. an ablation file).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from monai.bundle import ConfigParser
    from skimage.segmentation import find_boundaries

    from custom.command_line import flag
    from custom.evaluation.metrics import dice_foreground, instance_metrics

    parser = ConfigParser()
    parser.read_config([str(REPO / "bundle/configs/train.json"), *([config] if config else []), str(REPO / "bundle/configs/evaluate.json")])
    parser.update({"dataset_dir": dataset_dir, "download": False, "checkpoint": model, "eval_split": split, "tta": flag(tta, "--tta")})
    if ids:
        parser["eval_ids"] = list(ids)
    dataset, network, inferer = (parser.get_parsed_content(k) for k in ("eval#dataset", "eval#network", "eval#inferer"))
    post = parser.get_parsed_content("eval#postprocessing")
    rows, dices = [], []
    for i in range(len(dataset)):
        item = dataset[i]
        with torch.no_grad():
            a = inferer(torch.as_tensor(item["image"])[None], network)[0]
        inst = np.asarray(post({"pred": a})["pred_instances"])[0]
        a = a[0].float().numpy()
        label = np.asarray(item["label"])[0]
        fg = label > 0
        d, d_inv = (dice_foreground(fg.astype(np.int32), mask.astype(np.int32)) for mask in (a > 0.5, a <= 0.5))
        m = instance_metrics(label.astype(np.int64), inst.astype(np.int64))
        dices.append((d, d_inv))
        print(f"{dataset.ids[i]}: attended {100 * (a > 0.5).mean():.1f} % of pixels, nuclei {100 * fg.mean():.1f} %, "
              f"Dice(A>0.5) {d:.3f}, Dice(A<=0.5) {d_inv:.3f}; instances {int(inst.max())} vs {int(label.max())} true, "
              f"AJI {m['aji']:.3f}")
        if len(rows) < n:
            rgb = np.moveaxis(np.asarray(item["rgb"]), 0, -1).astype(np.uint8)
            rows.append((dataset.ids[i], rgb, a, inst, label, d, m["aji"]))
    mean = np.mean(dices, axis=0)
    print(f"mean over {len(dices)} images: Dice(A>0.5) {mean[0]:.3f}, Dice(inverted) {mean[1]:.3f}")
    c = slice(0, crop)
    fig, axes = plt.subplots(len(rows), 3, figsize=(13.5, 4.6 * len(rows)), squeeze=False)
    for r, (image_id, rgb, a, inst, label, d, aji) in enumerate(rows):
        rgb, a, inst, label = rgb[c, c], a[c, c], inst[c, c], label[c, c]
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_title(f"{image_id} (40x, {crop}x{crop} corner)", fontsize=9)
        axes[r, 1].imshow(a, cmap="magma", vmin=0, vmax=1)
        axes[r, 1].set_title(f"attention A (Dice of A > 0.5 on the whole image: {d:.2f})", fontsize=9)
        overlay = rgb.copy()
        overlay[find_boundaries(label, mode="inner")] = (0, 200, 0)
        overlay[find_boundaries(inst, mode="inner")] = (255, 230, 0)
        axes[r, 2].imshow(overlay)
        axes[r, 2].set_title(f"instances (yellow) vs true outlines (green); image AJI {aji:.2f}", fontsize=9)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


def curves(run_dir: str, out: str | None = None, smooth: int = 10) -> None:
    """Training losses, scale accuracy (train batches, moving average of ``smooth``), tau and
    validation scale accuracy from the TensorBoard events in ``run_dir``, drawn to ``out``
    (default ``<run_dir>/training_curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data: dict[str, dict[int, float]] = {}
    csv_file = Path(run_dir) / "scalars.csv"
    if csv_file.is_file():  # tag,step,value rows (a TensorBoard export); a later row for a step wins
        for line in csv_file.read_text().splitlines()[1:]:
            tag, step, value = line.rsplit(",", 2)
            data.setdefault(tag, {})[int(step)] = float(value)
    else:
        acc = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
        for tag in acc.Tags()["scalars"]:
            data[tag] = {e.step: e.value for e in acc.Scalars(tag)}
    tags = set(data)
    if "train/loss" not in tags:
        raise SystemExit(f"{run_dir}: no training scalars (train/loss) in its TensorBoard events or scalars.csv.")

    def series(tag):
        steps = np.array(sorted(data[tag]))
        return steps, np.array([data[tag][k] for k in steps])

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
        axes[1].plot(vs * per_epoch, vv, "o-", label="validation scale accuracy (per epoch)")
    if "val_attention_dice" in tags:
        vs, vv = series("val_attention_dice")
        per_epoch = len(s) / max(1, vs.max()) if len(vs) else 1
        axes[1].plot(vs * per_epoch, vv, "s-", label="validation attention Dice (model selection)")
    axes[1].set_ylim(0, 1)
    axes[1].set_xlabel("iteration")
    axes[1].set_title("scale accuracy (chance 1/3), attention Dice")
    axes[1].legend()
    if "train/tau" in tags:
        s, v = series("train/tau")
        axes[2].plot(s, v)
    axes[2].set_xlabel("iteration")
    axes[2].set_title("tau (batch (100 - eta)-th percentile logit)")
    fig.tight_layout()
    out = out or str(Path(run_dir) / "training_curves.png")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    print(f"wrote {out}")


if __name__ == "__main__":
    fire.Fire({"attention": attention, "curves": curves})
