"""Ignite handlers: attention maps in TensorBoard, F-only model export, sampler epochs,
evaluation reports (per-image CSV, summary) and overlay images."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image
from skimage.segmentation import find_boundaries

from custom.config import flag
from custom.data import IMAGENET_MEAN, IMAGENET_STD
from custom.metrics import COUNT_NAMES, METRIC_NAMES, cached_instance_metrics
from custom.networks import save_attention_network

__all__ = [
    "AttentionMapTensorBoardHandler",
    "BatchSamplerEpochHandler",
    "EvaluationReport",
    "ExportAttentionNetwork",
    "OverlayWriter",
    "unwrap",
    "write_atomic",
]


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DataParallel/DistributedDataParallel wrapper (or the module itself)."""
    return network.module if hasattr(network, "module") else network


def denormalise(images: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalised RGB ``(B, 3, H, W)`` back to [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp(0, 1)


class AttentionMapTensorBoardHandler:
    """Writes tiles, their attention maps and ``A * I`` to TensorBoard as image grids.

    Attach to the validation evaluator: on its first iteration of each run it takes
    up to ``max_images`` tiles of the batch (``output["image"]``, ImageNet-normalised)
    and their attention (``output["pred"]["attention"]``, ``(B, 1, H, W)`` in [0, 1])
    and writes ``<tag>/image``, ``<tag>/attention`` and ``<tag>/attended``
    at global step = the evaluator's epoch (= the trainer's epoch under ValidationHandler).

    Args:
        summary_writer: a ``torch.utils.tensorboard.SummaryWriter``.
        max_images: tiles per grid.
        tag: TensorBoard tag prefix.
    """

    def __init__(self, summary_writer, max_images: int = 12, tag: str = "val_attention"):
        self.writer, self.max_images, self.tag = summary_writer, int(max_images), tag
        self._pending = False

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._arm)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _arm(self, engine: Engine) -> None:
        self._pending = True

    def __call__(self, engine: Engine) -> None:
        if not self._pending:
            return
        self._pending = False
        out = engine.state.output
        images = out["image"][: self.max_images].detach()
        attention = out["pred"]["attention"][: self.max_images].detach().float().cpu()
        rgb = denormalise(images).cpu()
        step = engine.state.epoch
        self.writer.add_images(f"{self.tag}/image", rgb, step)
        self.writer.add_images(f"{self.tag}/attention", attention, step)
        self.writer.add_images(f"{self.tag}/attended", rgb * attention, step)
        self.writer.flush()


class ExportAttentionNetwork:
    """Saves the attention network F alone (weights, BatchNorm statistics and the
    running tau of its percentile sigmoid: all that inference needs) as a state dict.

    The file is written under a temporary name and renamed, so an interrupted save
    never leaves a file that looks complete.

    Args:
        network: the :class:`custom.networks.ScaleAttentionModel` (or DDP-wrapped) or an AttentionNet.
        filepath: where to write, e.g. ``bundle/models/model.pt``.
        epoch_level: also save at the end of every epoch (always at completion).
        best_only: attach to the model-selection evaluator instead: save when a run of it
            ends and its key metric is the best so far (``best_metric_epoch == epoch``).
    """

    def __init__(self, network: torch.nn.Module, filepath: str, epoch_level: bool = False, best_only: bool = False):
        self.network, self.filepath = network, str(filepath)
        self.epoch_level, self.best_only = flag(epoch_level, "epoch_level"), flag(best_only, "best_only")

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)
        if self.epoch_level and not self.best_only:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if self.best_only and engine is not None and engine.state.best_metric_epoch != engine.state.epoch:
            return
        net = unwrap(self.network)
        save_attention_network(getattr(net, "attention", net), self.filepath)


class BatchSamplerEpochHandler:
    """Tells a batch sampler with ``set_epoch`` which epoch starts (0-based), so a
    resumed run draws the same batches as an uninterrupted one."""

    def __init__(self, batch_sampler):
        if not hasattr(batch_sampler, "set_epoch"):
            raise TypeError(f"{type(batch_sampler).__name__} has no set_epoch().")
        self.batch_sampler = batch_sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        self.batch_sampler.set_epoch(engine.state.epoch - 1)


def write_atomic(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _items(engine: Engine) -> list[tuple[dict, dict]]:
    """(batch item, output item) pairs of the last iteration, decollated or not."""
    batch, output = engine.state.batch, engine.state.output
    if isinstance(output, dict):  # not decollated: split along the batch dimension
        n = len(output["pred"]) if "pred" in output else len(next(iter(output.values())))
        output = [{k: v[i] for k, v in output.items() if hasattr(v, "__getitem__")} for i in range(n)]
    if isinstance(batch, dict):
        batch = [{k: v[i] for k, v in batch.items() if hasattr(v, "__getitem__")} for i in range(len(output))]
    return list(zip(batch, output))


def _numpy_2d(x) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return arr[0] if arr.ndim == 3 else arr


class EvaluationReport:
    """Per-image nucleus metrics and their summary, written when the evaluator completes.

    Each iteration, for every image: :func:`custom.metrics.instance_metrics` (memoised) between the
    ground-truth instance map (``output[label_key]``, ``(1, H, W)``) and the predicted
    one (``output[pred_key]``). At completion it writes, each atomically, in ``output_dir``:

    - ``per_image.csv``: id and every metric (AJI, AJI+, Dice/ADC, AHD in pixels, PQ, DQ, SQ,
      precision, recall, F1, nuclei counted ``n_pred`` vs true ``n_true``);
    - ``summary.csv`` and ``summary.json``: the mean over images (AHD: over images where
      it is defined) and the total nuclei counts, with ``method`` and ``settings``.
      ``summary.json`` is written last: its presence means the evaluation is complete.

    Args:
        output_dir: folder for the files.
        method: the row name in comparison tables (e.g. "model", "hematoxylin_otsu").
        settings: anything worth keeping next to the numbers (checkpoint, post-processing).
        pred_key, label_key: keys of the instance maps in the engine output.
        id_key: key of the image id in the batch.
    """

    def __init__(self, output_dir: str, method: str = "model", settings: dict | None = None, pred_key: str = "pred_instances",
                 label_key: str = "label", id_key: str = "id"):
        self.output_dir, self.method, self.settings = Path(output_dir), str(method), dict(settings or {})
        self.pred_key, self.label_key, self.id_key = pred_key, label_key, id_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []
        for name in ("summary.json", "summary.csv", "per_image.csv"):  # a previous run's result must not look current
            (self.output_dir / name).unlink(missing_ok=True)

    def _collect(self, engine: Engine) -> None:
        for item, out in _items(engine):
            gt, pred = _numpy_2d(out[self.label_key]).astype(np.int64), _numpy_2d(out[self.pred_key]).astype(np.int64)
            # cached: the evaluator's metric handlers have usually computed the same pair this iteration
            self.rows.append({"id": str(item.get(self.id_key, len(self.rows))), **cached_instance_metrics(gt, pred)})

    def summary(self) -> dict:
        """Mean of each metric over the images, total counts, method and settings."""
        if not self.rows:
            raise RuntimeError("EvaluationReport: no image was evaluated.")
        means = {}
        for k in METRIC_NAMES:
            vals = np.array([r[k] for r in self.rows], dtype=float)
            means[k] = float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan")
        counts = {k: int(sum(r[k] for r in self.rows)) for k in COUNT_NAMES}
        return {"method": self.method, "n_images": len(self.rows), **means, **counts, "settings": self.settings}

    def _write(self, engine: Engine) -> None:
        summary = self.summary()
        keys = ["id", *METRIC_NAMES, *COUNT_NAMES]

        def per_image(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=keys)
                w.writeheader()
                w.writerows({k: r[k] for k in keys} for r in self.rows)

        def summary_csv(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["method", "n_images", *METRIC_NAMES, *COUNT_NAMES])
                w.writerow([summary[k] for k in ["method", "n_images", *METRIC_NAMES, *COUNT_NAMES]])

        write_atomic(self.output_dir / "per_image.csv", per_image)
        write_atomic(self.output_dir / "summary.csv", summary_csv)
        strict = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in summary.items()}  # JSON has no NaN
        write_atomic(self.output_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(strict, indent=2, default=str)))


class OverlayWriter:
    """Writes ``<id>.png`` per image: the H&E image with ground-truth nucleus outlines in
    green and predicted outlines in yellow (pixels where both agree look yellow-green).

    Args:
        output_dir: folder for the PNGs.
        image_key: batch key of the unnormalised RGB image, uint8 ``(3, H, W)``.
        pred_key, label_key: output keys of the predicted and true instance maps.
        id_key: batch key of the image id.
    """

    def __init__(self, output_dir: str, image_key: str = "rgb", pred_key: str = "pred_instances", label_key: str = "label",
                 id_key: str = "id"):
        self.output_dir = Path(output_dir)
        self.image_key, self.pred_key, self.label_key, self.id_key = image_key, pred_key, label_key, id_key

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._clear)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _clear(self, engine: Engine) -> None:
        for old in self.output_dir.glob("*.png"):  # overlays of a previous run must not mix with this one's
            old.unlink()

    def __call__(self, engine: Engine) -> None:
        for k, (item, out) in enumerate(_items(engine)):
            rgb = item[self.image_key]
            rgb = rgb.detach().cpu().numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb)
            canvas = np.moveaxis(rgb, 0, -1).astype(np.uint8).copy()
            if self.label_key in out:
                canvas[find_boundaries(_numpy_2d(out[self.label_key]), mode="inner")] = (0, 200, 0)
            canvas[find_boundaries(_numpy_2d(out[self.pred_key]), mode="inner")] = (255, 230, 0)
            name = str(item.get(self.id_key, f"image_{engine.state.iteration}_{k}"))
            image = Image.fromarray(canvas)
            write_atomic(self.output_dir / f"{name}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
