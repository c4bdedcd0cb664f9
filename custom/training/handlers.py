"""Ignite handlers of the training workflow: attention maps in TensorBoard, F-only model export,
progress bars, sampler epochs and per-epoch reseeding (both resumable in the middle of an epoch),
the one resumable training checkpoint, evaluator best-metric state and a checked resume loader."""

from __future__ import annotations

import logging
import os
import random
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
from custom.training.engine import NonFiniteTrainingError, world_size
from custom.transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = ['AttentionMapTensorBoardHandler', 'BatchSamplerEpochHandler', 'at_epoch_end', 'EpochSeedHandler', 'EvaluatorState', 'ExportAttentionNetwork',
           'LatestCheckpointSaver', 'NonFiniteStopBarrier', 'ProgressBar', 'ResumeCheckpointLoader', 'attach_checkpoint_saver', 'epoch_seed',
           'global_rng_state', 'non_finite_entries', 'set_global_rng_state', 'unwrap']


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
        filepath: where to write, e.g. ``bundle/runs/train/model.pt`` (``model_path`` of ``train.json``).
        epoch_level: also save at the end of every epoch (always at completion).
        best_only: attach to the model-selection evaluator instead: save when a run of it
            ends and its key metric is the best so far (``best_metric_epoch == epoch``).
    """

    def __init__(self, network: torch.nn.Module, filepath: str, epoch_level: bool = False, best_only: bool = False):
        self.network, self.filepath = network, str(filepath)
        self.epoch_level, self.best_only = flag(epoch_level, "epoch_level"), flag(best_only, "best_only")

    def attach(self, engine: Engine) -> None:
        logging.getLogger(__name__).info(f"{'The best model' if self.best_only else 'The model'} goes to {os.path.abspath(self.filepath)}")
        engine.add_event_handler(Events.COMPLETED, self)
        if self.epoch_level and not self.best_only:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        if self.best_only and engine is not None and engine.state.best_metric_epoch != engine.state.epoch:
            return
        net = unwrap(self.network)
        save_attention_network(getattr(net, "attention", net), self.filepath)


def done_in_epoch(engine: Engine) -> int:
    """Iterations of the current epoch already done when it starts: 0, or ``k`` for a run resumed from a
    checkpoint written after iteration ``k`` of that epoch (Ignite then runs only the epoch's other iterations)."""
    length = engine.state.epoch_length
    return engine.state.iteration - (engine.state.epoch - 1) * length if length else 0


def at_epoch_end(engine: Engine) -> bool:
    """Whether the iteration just completed is the last of its epoch."""
    length = engine.state.epoch_length
    return bool(length) and engine.state.iteration % length == 0


class BatchSamplerEpochHandler:
    """Tells a batch sampler with ``set_epoch`` which epoch starts (0-based), so a
    resumed run draws the same batches as an uninterrupted one.

    A run resumed in the middle of an epoch (from a checkpoint written after iteration ``k`` of it:
    Ignite then runs only the epoch's remaining iterations) draws the epoch's first ``k`` batches
    again through the data loader and drops them, before its first iteration. The data loader's
    random transforms, in this process or in its worker processes (whose state cannot be saved), then
    stand where they stood in the uninterrupted run after ``k`` batches, and so do the batches that
    follow: order, crops, flips and stain jitter. Costs the loading of ``k`` batches.

    Args:
        batch_sampler: e.g. :class:`custom.training.tiles.BalancedMagnificationBatchSampler`.
    """

    def __init__(self, batch_sampler):
        if not hasattr(batch_sampler, "set_epoch"):
            raise TypeError(f"{type(batch_sampler).__name__} has no set_epoch().")
        self.batch_sampler = batch_sampler
        self._replay = 0
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        engine.add_event_handler(Events.GET_BATCH_STARTED, self.replay)

    def __call__(self, engine: Engine) -> None:
        self.batch_sampler.set_epoch(engine.state.epoch - 1)
        self._replay = done_in_epoch(engine)

    def replay(self, engine: Engine) -> None:
        """Before the first batch of a resumed epoch: draw and drop the batches its done iterations used."""
        if not self._replay:
            return
        count, self._replay = self._replay, 0
        iterator = getattr(engine, "_dataloader_iter", None)  # Ignite's iterator over the epoch's data, made after EPOCH_STARTED
        if iterator is None:
            raise RuntimeError("BatchSamplerEpochHandler: the engine has no data iterator to resume in the middle of an epoch "
                               "(ignite.engine.Engine._dataloader_iter); this Ignite version is not supported.")
        self.logger.info(f"Resuming in the middle of epoch {engine.state.epoch}: loading its first {count} batches again "
                         "(dropped) so the batches that follow are those of the uninterrupted run.")
        for _ in range(count):
            next(iterator)


class LatestCheckpointSaver:
    """The run's one resumable training checkpoint, ``<save_dir>/checkpoint_latest.pt``, overwritten
    every ``interval`` iterations and at the end of every epoch (after its validation, so a resumed
    run never skips one), written atomically (a temporary file renamed), so it is always whole.

    It is written only where the run can go on exactly: after an iteration, never when the run stops
    on an exception (Ctrl-C, a NaN loss): an interrupted iteration may have moved BatchNorm
    statistics, the optimiser or the random generators half-way. The last iteration of an epoch is
    saved at ``EPOCH_COMPLETED`` instead of ``ITERATION_COMPLETED``: a run stopped during the
    epoch's validation then resumes from the previous save and validates. When the run stops on an
    exception, the handler logs the iteration that ``--resume_from`` goes on from, and re-raises.

    The file is ``{name: object.state_dict()}`` for ``save_dict`` (DDP/DataParallel modules
    unwrapped), the layout of Ignite's ``Checkpoint`` that :class:`ResumeCheckpointLoader` reads.

    Args:
        save_dir: the folder (created when missing).
        save_dict: name -> object with ``state_dict()``: network, optimizer, lr_scheduler, trainer, ...
        interval: iterations between saves within an epoch; 0 saves at the end of each epoch only.
        filename: the file name in ``save_dir``.
    """

    def __init__(self, save_dir: str, save_dict: dict, interval: int = 0, filename: str = "checkpoint_latest.pt"):
        if int(interval) < 0:
            raise ValueError(f"checkpoint_interval must be >= 0 (0: at the end of each epoch only), got {interval}.")
        self.path = Path(save_dir) / filename
        self.save_dict, self.interval = dict(save_dict), int(interval)
        self.saved_iteration: int | None = None
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        every = f"every {self.interval} iterations and " if self.interval else ""
        self.logger.info(f"The resumable training checkpoint ({every}at the end of each epoch) goes to {self.path.resolve()}")
        if self.interval:
            engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.interval), self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.save)
        engine.add_event_handler(Events.COMPLETED, self.save)  # a run terminated in the middle of an epoch
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)

    def _iteration_completed(self, engine: Engine) -> None:
        if at_epoch_end(engine):
            return  # the epoch's last iteration: saved at EPOCH_COMPLETED, after the validation
        self.save(engine)

    def save(self, engine: Engine) -> None:
        """Write the checkpoint (once per iteration)."""
        if self.saved_iteration == engine.state.iteration:
            return
        checkpoint = {name: (unwrap(obj) if isinstance(obj, torch.nn.Module) else obj).state_dict() for name, obj in self.save_dict.items()}
        write_atomic(self.path, lambda tmp: torch.save(checkpoint, tmp))
        self.saved_iteration = engine.state.iteration

    def exception_raised(self, engine: Engine, e: BaseException) -> None:
        if self.saved_iteration is not None:
            self.logger.warning(
                f"Training stopped at iteration {engine.state.iteration} ({type(e).__name__}). {self.path} holds iteration "
                f"{self.saved_iteration}: go on from there with --resume_from {self.path} (the same other options)."
            )
        else:
            self.logger.warning(f"Training stopped at iteration {engine.state.iteration} ({type(e).__name__}) before its first checkpoint.")
        raise e


class ProgressBar:
    """Ignite's progress bar (tqdm: done/total, rate, elapsed and remaining time) for one engine,
    as an item of a MONAI handler list (``attach(engine)``). The bar is closed after the epoch's last
    iteration, so the epoch's log lines (metrics, new best) and the validation's bars come after it.

    Args:
        desc: the bar's label (Ignite's default: "Epoch [e/n]" or "Iteration").
        output_transform: engine output -> ``{name: number}`` shown after the bar (e.g. the loss).
        persist: keep the finished bar on screen.
        enabled: False attaches nothing (a config's ``progress`` key, e.g. ``--progress false`` in logs and batch jobs).
    """

    def __init__(self, desc: str | None = None, output_transform=None, persist: bool = True, enabled: bool = True):
        self.desc, self.output_transform, self.persist = desc, output_transform, flag(persist, "persist")
        self.enabled = flag(enabled, "enabled")

    def attach(self, engine: Engine) -> None:
        if not self.enabled:
            return
        from ignite.handlers import ProgressBar as IgniteProgressBar

        kwargs = {"desc": self.desc} if self.desc else {}
        bar = IgniteProgressBar(persist=self.persist, **kwargs)
        bar.attach(engine, output_transform=self.output_transform)

        def close_after_last_iteration(engine: Engine) -> None:  # before EPOCH_COMPLETED's log lines and validation
            if at_epoch_end(engine):
                bar._close(engine)

        engine.add_event_handler(Events.ITERATION_COMPLETED, close_after_last_iteration)


def _move_exception_handlers(engine: Engine, handlers) -> list:
    """Detach the ``exception_raised`` callbacks of ``handlers`` that are attached to ``engine``; return them."""
    moved = [h for h in handlers if callable(getattr(h, "exception_raised", None))
             and engine.has_event_handler(h.exception_raised, Events.EXCEPTION_RAISED)]
    for h in moved:
        engine.remove_event_handler(h.exception_raised, Events.EXCEPTION_RAISED)
    return moved


def attach_checkpoint_saver(saver, engine: Engine, handlers=()) -> None:
    """Attach the trainer's checkpoint saver (:class:`LatestCheckpointSaver`, or a MONAI ``CheckpointSaver``)
    to ``engine`` so that its ``exception_raised`` callback runs when the run stops on an exception
    (NaN loss, Ctrl-C, a failing handler): LatestCheckpointSaver logs where to resume from, MONAI's
    saver with ``save_final`` writes its final checkpoint.

    A MONAI saver's files are made to be written atomically (to a temporary file in the same folder,
    then renamed): MONAI writes them in place, so a process killed while saving (Ctrl-C twice,
    torchrun stopping the other ranks, a scheduler's time limit) left a truncated checkpoint that
    resuming cannot read. LatestCheckpointSaver writes atomically itself.

    Ignite stops calling ``EXCEPTION_RAISED`` handlers at the first one that re-raises, and MONAI's
    ``StatsHandler`` (one of the trainer's ``train_handlers``, attached when the trainer is built)
    re-raises: a saver attached after it never sees an exception. The ``exception_raised``
    callbacks of ``handlers`` (the trainer's handler list) are therefore moved behind the saver's.

    Args:
        saver: the trainer's checkpoint saver.
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
    until rank 0 has run its exception callbacks.

    :class:`custom.training.engine.NonFiniteTrainingError` is raised on every rank at the same iteration.
    The ranks other than 0 have no checkpoint and used to exit at once; torchrun then stopped rank 0
    before its callbacks had run (a MONAI ``CheckpointSaver`` with ``save_final`` was stopped in the
    middle of writing its final checkpoint). This handler takes over the engine's exception callbacks:
    those of ``saver`` (rank 0's :class:`LatestCheckpointSaver`, which logs where to resume, or a MONAI
    ``CheckpointSaver``, which saves; both re-raise) and of ``handlers`` (MONAI's ``StatsHandler`` logs and re-raises). It runs
    them in that order until one raises, as Ignite would, then, on that error only, meets the other
    ranks at a barrier (any other exception may be on one rank alone, where a barrier would wait
    forever), and raises.

    Args:
        engine: the trainer.
        handlers: its handler list (e.g. ``@train#handlers``).
        saver: the checkpoint saver attached to it (rank 0), or None (the other ranks).
    """

    def __init__(self, engine: Engine, handlers=(), saver=None):
        owners = ([saver] if saver is not None else []) + list(handlers)
        self._callbacks = [h.exception_raised for h in _move_exception_handlers(engine, owners)]
        engine.add_event_handler(Events.EXCEPTION_RAISED, self)

    def __call__(self, engine: Engine, e: BaseException) -> None:
        raised = e
        try:
            for callback in self._callbacks:
                callback(engine, e)
        except BaseException as first:  # noqa: BLE001 - re-raised below, after the barrier
            raised = first
        if isinstance(e, NonFiniteTrainingError) and world_size() > 1:
            torch.distributed.barrier()
        raise raised


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of epoch ``epoch`` (Ignite's 1-based count) of a run seeded with ``seed``:
    32 bits of NumPy's ``SeedSequence((seed, epoch[, rank]))``, so that neighbouring epochs,
    seeds and ranks get unrelated streams. An int in ``[0, 2**32)``."""
    entropy = [int(seed), int(epoch)] + ([int(rank)] if rank else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def global_rng_state() -> dict:
    """The state of Python's, NumPy's and torch's global generators (CPU, and CUDA once initialised),
    as plain lists, numbers and tensors (a ``weights_only`` checkpoint holds it)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict) -> None:
    """Restore what :func:`global_rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochSeedHandler:
    """Makes each training epoch a function of ``(seed, epoch)`` alone, so that a run resumed
    from a checkpoint draws exactly what the uninterrupted run drew.

    At ``EPOCH_STARTED``, before Ignite makes the epoch's data loader iterator, it reseeds from
    :func:`epoch_seed`:

    - Python's, NumPy's and torch's global generators (:func:`monai.utils.set_determinism`):
      the equivariance transform drawn per batch, and the base seed torch's ``DataLoader``
      draws for its worker processes when the iterator is made (MONAI's ``worker_init_fn`` then
      seeds each worker's copy of the transforms from it, so ``num_workers > 0`` is covered);
    - the random transforms of ``dataset`` in this process (:func:`monai.data.utils.set_rnd`:
      crops, dihedral flips, stain jitter when ``num_workers=0``).

    The batch order has its own ``(seed, epoch)`` generator (:class:`BatchSamplerEpochHandler`).

    In the middle of an epoch the global generators have moved on (one equivariance draw per
    iteration). Put this handler in the checkpoint's ``save_dict``/``load_dict``: its state is the
    global generators' state when the checkpoint is written, and a run resumed from a checkpoint
    written after iteration ``k`` of an epoch reseeds at the epoch's start as usual (so its data
    loader gets the same worker seeds; :class:`BatchSamplerEpochHandler` replays the data), then
    restores that state before its first iteration. Under DDP (a process group of several ranks) the
    ranks' states are gathered after every iteration, so the checkpoint that rank 0 writes holds each
    rank's (``rng_by_rank``) and each rank restores its own; resumed with another number of ranks, only
    rank 0 restores its state (with a warning).

    Args:
        seed: the run's seed; None turns the handler off (a run that is not reproducible).
        dataset: the training dataset whose transforms are reseeded, or None.
        rank: the distributed rank, mixed into the seed so that ranks draw different augmentations.
    """

    def __init__(self, seed: int | None, dataset=None, rank: int = 0):
        self.seed, self.dataset, self.rank = (None if seed is None else int(seed)), dataset, int(rank)
        self._loaded: dict | None = None
        self._restore: dict | None = None
        self._rank_states: list | None = None  # under DDP: every rank's generators after the latest iteration

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        engine.add_event_handler(Events.ITERATION_STARTED, self._restore_mid_epoch)
        if self.seed is not None and world_size() > 1:  # before the checkpoint saver, attached later (attach_checkpoint_saver)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._gather)

    def __call__(self, engine: Engine) -> None:
        loaded, self._loaded = self._loaded, None
        if self.seed is None:
            return
        seed = epoch_seed(self.seed, engine.state.epoch, self.rank)
        set_determinism(seed=seed)
        if self.dataset is not None:
            set_rnd(self.dataset, seed)
        if done_in_epoch(engine):
            if loaded is None:
                logging.getLogger(__name__).warning(
                    f"Resuming after iteration {done_in_epoch(engine)} of epoch {engine.state.epoch} from a checkpoint without the "
                    f"random generators' state{'' if self.rank == 0 else f' of rank {self.rank}'}: the rest of the epoch draws other "
                    "equivariance transforms than the uninterrupted run."
                )
            self._restore = loaded

    def _restore_mid_epoch(self, engine: Engine) -> None:
        if self._restore is not None:
            set_global_rng_state(self._restore)
            self._restore = None

    def _gather(self, engine: Engine) -> None:
        states: list = [None] * world_size()
        torch.distributed.all_gather_object(states, global_rng_state())
        self._rank_states = states

    def state_dict(self) -> dict:
        state = {"rng": global_rng_state()}
        if self._rank_states is not None:
            state["rng_by_rank"] = self._rank_states
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        by_rank = state_dict.get("rng_by_rank")
        if by_rank is not None and len(by_rank) == world_size():
            self._loaded = by_rank[self.rank]
        else:  # a single-process checkpoint, or another number of ranks: rank 0's state is rank 0's
            self._loaded = state_dict["rng"] if self.rank == 0 else None


class EvaluatorState:
    """The best metric of the evaluators that run during training, as a state dict for the
    trainer's checkpoint, so that it survives an interruption.

    MONAI keeps ``state.best_metric`` and ``state.best_metric_epoch`` in the evaluator, and the
    key-metric ``CheckpointSaver`` the score of the file it wrote, in memory only: a resumed run
    starts both from "nothing yet", and its first validation would replace the best model
    (``model.pt`` via :class:`ExportAttentionNetwork` with ``best_only``, and the file of a key-metric
    ``CheckpointSaver``) even when it is worse. Put this object in the trainer's checkpoint
    ``save_dict`` and the ``load_dict`` of :class:`ResumeCheckpointLoader`.

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
        load_path: the checkpoint (``runs/<name>/checkpoints/checkpoint_latest.pt``).
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
                "Resume from runs/<name>/checkpoints/checkpoint_latest.pt (model.pt holds F alone)."
            )
        bad = non_finite_entries({k: checkpoint[k] for k in self.load_dict if k in checkpoint})
        if bad:
            raise FloatingPointError(
                f"resume_from={path}: refusing to resume from non-finite (NaN/Inf) values in {len(bad)} entries, e.g. {bad[:4]}. "
                "Train from the start (without --resume_from) or resume from another checkpoint."
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
