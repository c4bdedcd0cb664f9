"""Ignite handlers of the evaluation workflow: per-image metrics (CSV + summary JSON), error analysis
(where the AJI is lost) and overlays."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from PIL import Image
from skimage.segmentation import find_boundaries

from custom.atomic_write import write_atomic
from custom.evaluation.error_analysis import (
    ERROR_NAMES,
    oracle_split,
    segmentation_errors,
)
from custom.evaluation.metrics import (
    COUNT_NAMES,
    METRIC_NAMES,
    aji,
    cached_instance_metrics,
)
from custom.inference.postprocess import mask_to_instances

__all__ = ['ErrorAnalysisReport', 'EvaluationReport', 'OverlayWriter', 'OUTLINE_WIDTH', 'engine_items', 'outlines']


def engine_items(engine: Engine) -> list[tuple[dict, dict]]:
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


def _write_rows(path: Path, keys: list[str], rows: list[dict]) -> None:
    """``rows`` (dicts holding at least ``keys``) as a CSV with a header, written atomically."""

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows({k: r[k] for k in keys} for r in rows)

    write_atomic(path, write)


class _PerImageReport:
    """Rows of per-image results collected each iteration (``analyse`` of each (label, prediction)
    pair) and written at completion (``_write``); ``FILES`` in ``output_dir`` are removed at the start, so
    that a failed run leaves none of a previous run's results looking current."""

    FILES: tuple[str, ...] = ()

    def __init__(self, output_dir: str, method: str, pred_key: str, label_key: str, id_key: str):
        self.output_dir, self.method = Path(output_dir), str(method)
        self.pred_key, self.label_key, self.id_key = pred_key, label_key, id_key
        self.rows: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _reset(self, engine: Engine) -> None:
        self.rows = []
        for name in self.FILES:
            (self.output_dir / name).unlink(missing_ok=True)

    def analyse(self, gt: np.ndarray, pred: np.ndarray) -> dict:
        raise NotImplementedError

    def _collect(self, engine: Engine) -> None:
        for item, out in engine_items(engine):
            gt, pred = _numpy_2d(out[self.label_key]).astype(np.int64), _numpy_2d(out[self.pred_key]).astype(np.int64)
            self.rows.append({"id": str(item.get(self.id_key, len(self.rows))), **self.analyse(gt, pred)})

    def _write(self, engine: Engine) -> None:
        raise NotImplementedError


class EvaluationReport(_PerImageReport):
    """Per-image nucleus metrics and their summary, written when the evaluator completes.

    Each iteration, for every image: :func:`custom.evaluation.metrics.instance_metrics` (memoised) between the
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

    FILES = ("summary.json", "summary.csv", "per_image.csv")

    def __init__(self, output_dir: str, method: str = "model", settings: dict | None = None, pred_key: str = "pred_instances",
                 label_key: str = "label", id_key: str = "id"):
        super().__init__(output_dir, method, pred_key, label_key, id_key)
        self.settings = dict(settings or {})

    def analyse(self, gt: np.ndarray, pred: np.ndarray) -> dict:
        """Every metric of ``custom.evaluation.metrics.instance_metrics`` of one ``(H, W)`` pair."""
        # cached: the evaluator's metric handlers have usually computed the same pair this iteration
        return cached_instance_metrics(gt, pred)

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

        def summary_csv(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(["method", "n_images", *METRIC_NAMES, *COUNT_NAMES])
                w.writerow([summary[k] for k in ["method", "n_images", *METRIC_NAMES, *COUNT_NAMES]])

        _write_rows(self.output_dir / "per_image.csv", keys, self.rows)
        write_atomic(self.output_dir / "summary.csv", summary_csv)
        strict = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in summary.items()}  # JSON has no NaN
        write_atomic(self.output_dir / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(strict, indent=2, default=str)))


MASK_PARAMS = ("morphology_radii", "sigma", "footprint_radius", "min_size", "marker_h", "fill_holes")
ERROR_SCORES = ("aji", "aji_oracle_split", "aji_true_foreground", "dice")


class ErrorAnalysisReport(_PerImageReport):
    """Where the AJI is lost, foreground or splitting: per image and on average, written when the
    evaluator completes (``error_analysis: true`` in ``evaluate.json``).

    For every image, against its labels (``output[label_key]``):

    - ``aji``: of the prediction (``output[pred_key]``), as :class:`EvaluationReport` scores it;
    - ``aji_oracle_split``: of the prediction's foreground split by the labels
      (:func:`custom.evaluation.error_analysis.oracle_split`): the most any splitting of that foreground can reach;
    - ``aji_true_foreground``: of the true foreground ``label > 0`` split by the same mask step
      (:func:`custom.inference.postprocess.mask_to_instances` with ``mask_params``): what that splitting
      reaches on a perfect foreground;
    - ``dice``: foreground Dice of the prediction;
    - the counts of :func:`custom.evaluation.error_analysis.segmentation_errors` (merges, splits, misses, false nuclei).

    At completion it writes, each atomically, in ``output_dir``: ``errors.csv`` (a row per image) and
    ``errors_summary.json`` (the mean of each score, the total of each count, ``method``); the summary is
    written last, so its presence means the analysis is complete.

    Args:
        output_dir: folder for the files (the evaluation's ``eval_dir``).
        mask_params: the post-processing parameters (``eval#postprocess_params``); the keys of
            ``MASK_PARAMS`` are used, the others (those of the map's threshold) ignored.
        method: the row name, as in :class:`EvaluationReport`.
        pred_key, label_key, id_key: as in :class:`EvaluationReport`.
    """

    FILES = ("errors_summary.json", "errors.csv")

    def __init__(self, output_dir: str, mask_params: dict, method: str = "model", pred_key: str = "pred_instances",
                 label_key: str = "label", id_key: str = "id"):
        missing = [k for k in MASK_PARAMS if k not in mask_params]
        if missing:
            raise ValueError(f"ErrorAnalysisReport: mask_params lacks {missing}; pass eval#postprocess_params.")
        super().__init__(output_dir, method, pred_key, label_key, id_key)
        self.mask_params = {k: mask_params[k] for k in MASK_PARAMS}

    def analyse(self, gt: np.ndarray, pred: np.ndarray) -> dict:
        """The scores of ``ERROR_SCORES`` and counts of ``ERROR_NAMES`` of one ``(H, W)`` pair."""
        scores = cached_instance_metrics(gt, pred)
        return {
            "aji": scores["aji"],
            "aji_oracle_split": aji(gt, oracle_split(gt, pred)),
            "aji_true_foreground": aji(gt, mask_to_instances(gt > 0, **self.mask_params).astype(np.int64)),
            "dice": scores["dice"],
            **segmentation_errors(gt, pred),
        }

    def summary(self) -> dict:
        """Mean of each score and total of each count over the images, with ``method``."""
        if not self.rows:
            raise RuntimeError("ErrorAnalysisReport: no image was evaluated.")
        means = {k: float(np.mean([r[k] for r in self.rows])) for k in ERROR_SCORES}
        totals = {k: int(sum(r[k] for r in self.rows)) for k in ERROR_NAMES}
        return {"method": self.method, "n_images": len(self.rows), **means, **totals, "mask_params": self.mask_params}

    def _write(self, engine: Engine) -> None:
        summary = self.summary()
        _write_rows(self.output_dir / "errors.csv", ["id", *ERROR_SCORES, *ERROR_NAMES], self.rows)
        write_atomic(self.output_dir / "errors_summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, default=str)))


# nucleus outlines of the overlay pictures (evaluation and whole slides), in pixels of the picture
OUTLINE_WIDTH = 2


def outlines(labels: np.ndarray, width: int = OUTLINE_WIDTH) -> np.ndarray:
    """Mask of the ``width`` outermost pixel rings of each instance of ``labels`` (inside the
    instance, so touching nuclei keep one outline each and the tissue around stays visible)."""
    mask = np.zeros(labels.shape, bool)
    rest = np.asarray(labels)
    for _ in range(int(width)):
        ring = find_boundaries(rest, mode="inner") & (rest > 0)
        if not ring.any():
            break
        mask |= ring
        rest = np.where(ring, 0, rest)
    return mask


class OverlayWriter:
    """Writes ``<id>.png`` per image: the H&E image with ground-truth nucleus outlines in
    green and predicted outlines in yellow, ``OUTLINE_WIDTH`` pixels wide, inside each
    nucleus (:func:`outlines`); the predicted ones are drawn last.

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
        for k, (item, out) in enumerate(engine_items(engine)):
            rgb = item[self.image_key]
            rgb = rgb.detach().cpu().numpy() if isinstance(rgb, torch.Tensor) else np.asarray(rgb)
            canvas = np.moveaxis(rgb, 0, -1).astype(np.uint8).copy()
            if self.label_key in out:
                canvas[outlines(_numpy_2d(out[self.label_key]))] = (0, 200, 0)
            canvas[outlines(_numpy_2d(out[self.pred_key]))] = (255, 230, 0)
            name = str(item.get(self.id_key, f"image_{engine.state.iteration}_{k}"))
            image = Image.fromarray(canvas)
            write_atomic(self.output_dir / f"{name}.png", lambda tmp, im=image: im.save(tmp, format="PNG"))
