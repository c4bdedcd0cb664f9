"""Ignite handlers: attention maps in TensorBoard, F-only model export, sampler epochs,
per-epoch reseeding, evaluator best-metric state and a checked resume loader for training
checkpoints, evaluation reports (per-image CSV, summary), error analysis and overlay images."""

from __future__ import annotations

import csv
import inspect
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.data.utils import set_rnd
from monai.handlers import CheckpointLoader
from monai.utils import set_determinism
from PIL import Image
from skimage.segmentation import find_boundaries

from custom.config import flag
from custom.data import IMAGENET_MEAN, IMAGENET_STD
from custom.diagnostics import ERROR_NAMES, oracle_split, segmentation_errors
from custom.files import write_atomic
from custom.metrics import COUNT_NAMES, METRIC_NAMES, aji, cached_instance_metrics
from custom.networks import save_attention_network
from custom.postprocess import mask_to_instances

__all__ = [
    "AttentionMapTensorBoardHandler",
    "BatchSamplerEpochHandler",
    "EpochSeedHandler",
    "ErrorAnalysisReport",
    "EvaluationReport",
    "EvaluatorState",
    "ExportAttentionNetwork",
    "NonFiniteStopBarrier",
    "OverlayWriter",
    "ResumeCheckpointLoader",
    "attach_checkpoint_saver",
    "epoch_seed",
    "non_finite_entries",
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
    resumed run draws the same batches as an uninterrupted one.

    A run resumed in the middle of an epoch (from a checkpoint written at an exception:
    Ignite then runs only the rest of that epoch) is also told the first batch to yield
    (``set_epoch(epoch, start=k)``) when the sampler takes one, so it goes on with the epoch's
    remaining batches instead of its first ones again."""

    def __init__(self, batch_sampler):
        if not hasattr(batch_sampler, "set_epoch"):
            raise TypeError(f"{type(batch_sampler).__name__} has no set_epoch().")
        self.batch_sampler = batch_sampler
        self._takes_start = "start" in inspect.signature(batch_sampler.set_epoch).parameters

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        length = engine.state.epoch_length
        done = engine.state.iteration - (engine.state.epoch - 1) * length if length else 0
        if done and self._takes_start:
            self.batch_sampler.set_epoch(engine.state.epoch - 1, start=done)
        else:
            self.batch_sampler.set_epoch(engine.state.epoch - 1)


def _move_exception_handlers(engine: Engine, handlers) -> list:
    """Detach the ``exception_raised`` callbacks of ``handlers`` that are attached to ``engine``; return them."""
    moved = [h for h in handlers if callable(getattr(h, "exception_raised", None))
             and engine.has_event_handler(h.exception_raised, Events.EXCEPTION_RAISED)]
    for h in moved:
        engine.remove_event_handler(h.exception_raised, Events.EXCEPTION_RAISED)
    return moved


def attach_checkpoint_saver(saver, engine: Engine, handlers=()) -> None:
    """Attach a MONAI ``CheckpointSaver`` to ``engine`` so that, with ``save_final``, it writes its
    final checkpoint when the run stops on an exception (NaN loss, Ctrl-C, a failing handler).

    Its files are written atomically (to a temporary file in the same folder, then renamed): MONAI's
    saver writes them in place, so a process killed while saving (Ctrl-C twice, torchrun stopping
    the other ranks, a scheduler's time limit) left a truncated checkpoint that resuming cannot read.

    Ignite stops calling ``EXCEPTION_RAISED`` handlers at the first one that re-raises, and MONAI's
    ``StatsHandler`` (one of the trainer's ``train_handlers``, attached when the trainer is built)
    re-raises: a saver attached after it never saves on an exception. The ``exception_raised``
    callbacks of ``handlers`` (the trainer's handler list) are therefore moved behind the saver's.

    Args:
        saver: the trainer's ``CheckpointSaver``.
        engine: the trainer.
        handlers: the handlers already attached to it (e.g. ``@train#handlers``).
    """
    for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
        checkpoint = getattr(saver, name, None)
        if checkpoint is not None:
            if not hasattr(checkpoint.save_handler, "_atomic"):
                raise TypeError(f"attach_checkpoint_saver: {type(checkpoint.save_handler).__name__} has no atomic mode "
                                "(an Ignite DiskSaver was expected); checkpoints would be written in place.")
            checkpoint.save_handler._atomic = True
    moved = _move_exception_handlers(engine, handlers)
    saver.attach(engine)
    for h in moved:
        engine.add_event_handler(Events.EXCEPTION_RAISED, h.exception_raised)


class NonFiniteStopBarrier:
    """Under DDP, keeps every rank alive when training stops on a non-finite loss or gradient
    until rank 0 has written its final checkpoint.

    :class:`custom.engine.NonFiniteTrainingError` is raised on every rank at the same iteration.
    The ranks other than 0 have no checkpoint to write and used to exit at once; torchrun then
    stopped rank 0, sometimes in the middle of writing ``checkpoint_final.pt``. This handler takes
    over the engine's exception callbacks: those of ``saver`` (rank 0's ``CheckpointSaver``, which
    saves and re-raises) and of ``handlers`` (MONAI's ``StatsHandler`` logs and re-raises). It runs
    them in that order until one raises, as Ignite would, then, on that error only, meets the other
    ranks at a barrier (any other exception may be on one rank alone, where a barrier would wait
    forever), and raises.

    Args:
        engine: the trainer.
        handlers: its handler list (e.g. ``@train#handlers``).
        saver: the ``CheckpointSaver`` attached to it (rank 0), or None (the other ranks).
    """

    def __init__(self, engine: Engine, handlers=(), saver=None):
        owners = ([saver] if saver is not None else []) + list(handlers)
        self._callbacks = [h.exception_raised for h in _move_exception_handlers(engine, owners)]
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, e: BaseException) -> None:
        import torch.distributed as dist

        from custom.engine import NonFiniteTrainingError

        raised = e
        try:
            for callback in self._callbacks:
                callback(engine, e)
        except BaseException as first:  # noqa: BLE001 - re-raised below, after the barrier
            raised = first
        if isinstance(e, NonFiniteTrainingError) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        raise raised


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of epoch ``epoch`` (Ignite's 1-based count) of a run seeded with ``seed``:
    32 bits of NumPy's ``SeedSequence((seed, epoch[, rank]))``, so that neighbouring epochs,
    seeds and ranks get unrelated streams. An int in ``[0, 2**32)``."""
    entropy = [int(seed), int(epoch)] + ([int(rank)] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


class EpochSeedHandler:
    """Makes each training epoch a function of ``(seed, epoch)`` alone, so that a run resumed
    from an epoch checkpoint draws exactly what the uninterrupted run drew.

    At ``EPOCH_STARTED``, before Ignite makes the epoch's data loader iterator, it reseeds from
    :func:`epoch_seed`:

    - Python's, NumPy's and torch's global generators (:func:`monai.utils.set_determinism`):
      the equivariance transform drawn per batch, and the base seed torch's ``DataLoader``
      draws for its worker processes when the iterator is made (MONAI's ``worker_init_fn`` then
      seeds each worker's copy of the transforms from it, so ``num_workers > 0`` is covered);
    - the random transforms of ``dataset`` in this process (:func:`monai.data.utils.set_rnd`:
      crops, dihedral flips, stain jitter when ``num_workers=0``).

    The batch order has its own ``(seed, epoch)`` generator (:class:`BatchSamplerEpochHandler`).

    Args:
        seed: the run's seed; None turns the handler off (a run that is not reproducible).
        dataset: the training dataset whose transforms are reseeded, or None.
        rank: the distributed rank, mixed into the seed so that ranks draw different augmentations.
    """

    def __init__(self, seed: int | None, dataset=None, rank: int = 0):
        self.seed, self.dataset, self.rank = (None if seed is None else int(seed)), dataset, int(rank)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        if self.seed is None:
            return
        seed = epoch_seed(self.seed, engine.state.epoch, self.rank)
        set_determinism(seed=seed)
        if self.dataset is not None:
            set_rnd(self.dataset, seed)


class EvaluatorState:
    """The best metric of the evaluators that run during training, as a state dict for the
    trainer's checkpoint, so that it survives an interruption.

    MONAI keeps ``state.best_metric`` and ``state.best_metric_epoch`` in the evaluator, and the
    key-metric ``CheckpointSaver`` the score of the file it wrote, in memory only: a resumed run
    starts both from "nothing yet", and its first validation would replace the best model
    (``best_val_attention_dice.pt``, and ``model.pt`` via :class:`ExportAttentionNetwork` with
    ``best_only``) even when it is worse. Put this object in the trainer's
    ``CheckpointSaver.save_dict`` and ``CheckpointLoader.load_dict``.

    ``state_dict()`` is ``{name: {"best_metric": float, "best_metric_epoch": int (-1: none yet),
    "saved": [[score, filename], ...]}}`` (``saved``: the key-metric files of that evaluator's saver).

    Args:
        evaluators: name -> MONAI evaluator.
        checkpoint_savers: name (a key of ``evaluators``) -> the MONAI ``CheckpointSaver`` with
            ``save_key_metric`` attached to that evaluator.
    """

    def __init__(self, evaluators: dict, checkpoint_savers: dict | None = None):
        self.evaluators = dict(evaluators)
        self.checkpoint_savers = dict(checkpoint_savers or {})
        unknown = sorted(set(self.checkpoint_savers) - set(self.evaluators))
        if unknown:
            raise ValueError(f"EvaluatorState: checkpoint_savers {unknown} name no evaluator (have {sorted(self.evaluators)}).")
        for name, saver in self.checkpoint_savers.items():
            if getattr(saver, "_key_metric_checkpoint", None) is None:
                raise ValueError(f"EvaluatorState: the CheckpointSaver of {name!r} does not save a key metric (save_key_metric=True).")

    def state_dict(self) -> dict:
        out = {}
        for name, evaluator in self.evaluators.items():
            saver = self.checkpoint_savers.get(name)
            saved = [] if saver is None else saver._key_metric_checkpoint.state_dict()["_saved"]
            out[name] = {
                "best_metric": float(evaluator.state.best_metric),
                "best_metric_epoch": int(evaluator.state.best_metric_epoch),
                "saved": [[float(score), str(filename)] for score, filename in saved],
            }
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        for name, evaluator in self.evaluators.items():
            if name not in state_dict:
                continue  # an evaluator added since the checkpoint was written: its best restarts
            entry = state_dict[name]
            evaluator.state.best_metric = float(entry["best_metric"])
            evaluator.state.best_metric_epoch = int(entry["best_metric_epoch"])
            if name in self.checkpoint_savers:
                saver = self.checkpoint_savers[name]
                saved = [(float(s), str(f)) for s, f in entry["saved"] if _saved_file(saver, str(f)).is_file()]
                if len(saved) < len(entry["saved"]):  # resumed into another folder: the next validation writes the file here
                    logging.getLogger(__name__).warning(
                        f"{name}: the best-metric checkpoint is not in {_saved_file(saver, '').parent}; the next validation writes one."
                    )
                saver.load_state_dict({"_saved": saved})


def _saved_file(saver, filename: str) -> Path:
    """Where a MONAI CheckpointSaver's key-metric checkpoint ``filename`` lies (its fixed name if it has one)."""
    handler = saver._key_metric_checkpoint.save_handler
    return Path(handler.dirname) / (getattr(handler, "filename", None) or filename)


def non_finite_entries(state, prefix: str = "") -> list[str]:
    """Dotted names of the floating-point tensors holding a NaN or Inf in a nested checkpoint
    (dicts, lists, tensors), e.g. ``["network.attention.head.weight", "optimizer.state.3.exp_avg"]``."""
    if isinstance(state, torch.Tensor):
        return [prefix] if state.is_floating_point() and not bool(torch.isfinite(state).all()) else []
    if isinstance(state, dict):
        return [n for k, v in state.items() for n in non_finite_entries(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(state, (list, tuple)):
        return [n for i, v in enumerate(state) for n in non_finite_entries(v, f"{prefix}[{i}]")]
    return []


class ResumeCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for ``--resume_from``, which checks the file before training.

    At ``attach`` (in the workflow's ``initialize``: before the trainer runs, so before any
    handler can write a checkpoint or export a model) the file is read (``weights_only``) and
    refused, with an error naming it, when it cannot be read, lacks a required entry of
    ``load_dict``, or holds a NaN/Inf in any floating tensor (weights, BatchNorm statistics,
    running tau, optimiser moments). Loading happens at the trainer's ``STARTED``, as in MONAI.

    Args:
        load_path: the checkpoint (``checkpoint_epoch=N.pt`` or ``checkpoint_final.pt``).
        load_dict: name -> object with ``load_state_dict``.
        optional: names of ``load_dict`` that older checkpoints lack (e.g. the evaluators' best
            metric): skipped with a warning.
        map_location, name, strict: as for MONAI's ``CheckpointLoader``.
    """

    def __init__(self, load_path: str, load_dict: dict, optional=(), map_location=None, name: str | None = None, strict: bool = True):
        super().__init__(load_path=load_path, load_dict=load_dict, name=name, map_location=map_location, strict=strict)
        self.optional = set(optional)
        unknown = sorted(self.optional - set(self.load_dict))
        if unknown:
            raise ValueError(f"ResumeCheckpointLoader: optional names {unknown} are not in load_dict {sorted(self.load_dict)}.")
        self._checkpoint: dict | None = None

    def read(self) -> dict:
        """The checked checkpoint dict. Raises FileNotFoundError, ValueError or FloatingPointError naming the file."""
        path = str(self.load_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume_from={path}: no such file.")
        try:
            checkpoint = torch.load(path, map_location=self.map_location, weights_only=True)
        except Exception as e:  # truncated file, not a torch file, pickled objects
            raise ValueError(f"resume_from={path}: cannot be read as a training checkpoint ({type(e).__name__}: {e}).") from e
        if not isinstance(checkpoint, dict):
            raise ValueError(f"resume_from={path}: holds a {type(checkpoint).__name__}, not a training checkpoint dict.")
        missing = [k for k in self.load_dict if k not in checkpoint and k not in self.optional]
        if missing:
            raise ValueError(
                f"resume_from={path}: not a training checkpoint of this workflow: no {missing} (it has {sorted(map(str, checkpoint))}). "
                "Resume from runs/<name>/checkpoints/checkpoint_epoch=N.pt or checkpoint_final.pt (model.pt holds F alone)."
            )
        bad = non_finite_entries({k: checkpoint[k] for k in self.load_dict if k in checkpoint})
        if bad:
            raise FloatingPointError(
                f"resume_from={path}: refusing to resume from non-finite (NaN/Inf) values in {len(bad)} entries, e.g. {bad[:4]}. "
                "Resume from an earlier checkpoint (checkpoint_epoch=N.pt)."
            )
        return checkpoint

    def attach(self, engine: Engine) -> None:
        self._checkpoint = self.read()
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        checkpoint = self._checkpoint if self._checkpoint is not None else self.read()
        self._checkpoint = None  # the state dicts are copied into the objects: do not keep a second copy
        absent = [k for k in self.load_dict if k not in checkpoint]
        if absent:
            self.logger.warning(f"{self.load_path}: has no {absent} (written by an older version); that state restarts.")
        load_dict = {k: v for k, v in self.load_dict.items() if k in checkpoint}
        prior_max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=load_dict, checkpoint=checkpoint, strict=self.strict)
        if prior_max_epochs is not None and engine.state.epoch > prior_max_epochs:
            raise ValueError(
                f"resume_from={self.load_path}: it is at epoch {engine.state.epoch}, beyond --epochs {prior_max_epochs}; "
                "set --epochs to the total number of epochs wanted."
            )
        engine.state.max_epochs = prior_max_epochs
        self.logger.info(f"Restored {sorted(load_dict)} from {self.load_path}")


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
        for item, out in _items(engine):
            gt, pred = _numpy_2d(out[self.label_key]).astype(np.int64), _numpy_2d(out[self.pred_key]).astype(np.int64)
            self.rows.append({"id": str(item.get(self.id_key, len(self.rows))), **self.analyse(gt, pred)})

    def _write(self, engine: Engine) -> None:
        raise NotImplementedError


class EvaluationReport(_PerImageReport):
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

    FILES = ("summary.json", "summary.csv", "per_image.csv")

    def __init__(self, output_dir: str, method: str = "model", settings: dict | None = None, pred_key: str = "pred_instances",
                 label_key: str = "label", id_key: str = "id"):
        super().__init__(output_dir, method, pred_key, label_key, id_key)
        self.settings = dict(settings or {})

    def analyse(self, gt: np.ndarray, pred: np.ndarray) -> dict:
        """Every metric of ``custom.metrics.instance_metrics`` of one ``(H, W)`` pair."""
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
"""The keys of the post-processing that split a binary mask (``custom.postprocess.mask_to_instances``)."""
ERROR_SCORES = ("aji", "aji_oracle_split", "aji_true_foreground", "dice")
"""Per-image scores of :class:`ErrorAnalysisReport`, in [0, 1]."""


class ErrorAnalysisReport(_PerImageReport):
    """Where the AJI is lost, foreground or splitting: per image and on average, written when the
    evaluator completes (``error_analysis: true`` in ``evaluate.json``).

    For every image, against its labels (``output[label_key]``):

    - ``aji``: of the prediction (``output[pred_key]``), as :class:`EvaluationReport` scores it;
    - ``aji_oracle_split``: of the prediction's foreground split by the labels
      (:func:`custom.diagnostics.oracle_split`): the most any splitting of that foreground can reach;
    - ``aji_true_foreground``: of the true foreground ``label > 0`` split by the same mask step
      (:func:`custom.postprocess.mask_to_instances` with ``mask_params``): what that splitting
      reaches on a perfect foreground;
    - ``dice``: foreground Dice of the prediction;
    - the counts of :func:`custom.diagnostics.segmentation_errors` (merges, splits, misses, false nuclei).

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
