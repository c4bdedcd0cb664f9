"""Ignite handlers: attention maps in TensorBoard, F-only model export, sampler epochs."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from custom.data import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["AttentionMapTensorBoardHandler", "BatchSamplerEpochHandler", "ExportAttentionNetwork", "unwrap"]


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
    """

    def __init__(self, network: torch.nn.Module, filepath: str, epoch_level: bool = False):
        self.network, self.filepath, self.epoch_level = network, str(filepath), bool(epoch_level)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)
        if self.epoch_level:
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine | None = None) -> None:
        net = unwrap(self.network)
        net = getattr(net, "attention", net)
        state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise FloatingPointError(f"not exporting {self.filepath}: non-finite values in {bad[:3]}.")
        path = Path(self.filepath)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)


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
