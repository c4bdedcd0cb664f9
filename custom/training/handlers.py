"""Ignite handlers: attention maps in TensorBoard, F-only model export, sampler epochs,
per-epoch reseeding, evaluator best-metric state and a checked resume loader for training
checkpoints, evaluation reports (per-image CSV, summary), error analysis and overlay images."""

from __future__ import annotations

import inspect
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

from custom.atomic_write import write_atomic
from custom.command_line import flag
from custom.model.checkpoint import save_attention_network
from custom.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ['AttentionMapTensorBoardHandler', 'BatchSamplerEpochHandler', 'EpochSeedHandler', 'EvaluatorState', 'ExportAttentionNetwork', 'NonFiniteStopBarrier', 'ResumeCheckpointLoader', 'attach_checkpoint_saver', 'epoch_seed', 'non_finite_entries', 'unwrap', 'write_atomic']


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
        network: the :class:`custom.model.networks.ScaleAttentionModel` (or DDP-wrapped) or an AttentionNet.
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

    :class:`custom.training.engine.NonFiniteTrainingError` is raised on every rank at the same iteration.
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

        from custom.training.engine import NonFiniteTrainingError

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


"""The keys of the post-processing that split a binary mask (``custom.inference.postprocess.mask_to_instances``)."""


"""Per-image scores of :class:`ErrorAnalysisReport`, in [0, 1]."""
