"""Full-image attention inference: exact tiling and dihedral test-time augmentation.

The attention network F is fully convolutional, zero-padded, and in evaluation
mode per-pixel everywhere except its convolutions (BatchNorm uses running
statistics, the percentile sigmoid a running tau). An output pixel therefore
depends only on input pixels within F's receptive-field radius
``R = 1 + 2 * sum(dilations)`` (stem 3x3 conv: 1 px; each residual block, two
3x3 convs of dilation d: 2d px; paper: 1 + 2 * 41 = 83 px). Computing each tile
on the tile plus a margin of R pixels on each side (clipped to the image, where
the network pads with zeros anyway) and keeping only the tile gives the
whole-image result exactly, up to float rounding, with memory bounded by the window.

Shapes: images ``(B, C, H, W)`` ImageNet-normalised; attention ``(B, 1, H, W)`` float32 in [0, 1].
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.utils import eval_mode
from monai.utils import convert_to_dst_type
from torch import nn

from custom.command_line import flag
from custom.model.networks import ScaleAttentionModel, check_sigmoid_slope
from custom.model.precision import autocast_context
from custom.transforms import EQUIVARIANCE_TRANSFORMS, dihedral, dihedral_inverse

__all__ = ['TiledAttentionInferer', 'cpu_cores', 'receptive_field_radius', 'set_cpu_threads']


MIN_ROI_SIZE = 16


def receptive_field_radius(network: nn.Module) -> int:
    """Receptive-field radius (pixels on each side) of an :class:`AttentionNet`:
    ``1 + 2 * sum(dilations)`` (stem 3x3 conv, two 3x3 convs per dilated block, 1x1 head);
    the network's own ``receptive_radius`` where it has one."""
    net = _attention_net(network)
    radius = getattr(net, "receptive_radius", None)
    if isinstance(radius, (int, np.integer)):
        return int(radius)
    dilations = getattr(net, "dilations", None)
    if dilations is None:
        raise ValueError(f"{type(net).__name__} has no `dilations`; pass the margin explicitly.")
    return 1 + 2 * sum(int(d) for d in dilations)


def _attention_net(network: nn.Module) -> nn.Module:
    """The AttentionNet inside a DDP wrapper or a ScaleAttentionModel."""
    net = network.module if isinstance(getattr(network, "module", None), nn.Module) else network
    return net.attention if isinstance(net, ScaleAttentionModel) else net


AUTO = "auto"  # cpu_threads, postprocess_workers: a count derived from cpu_cores()


def cpu_cores() -> int:
    """The CPU cores this process may use: those it may run on (``sched_getaffinity``, else all), divided
    among the ranks of this machine under torchrun (``LOCAL_WORLD_SIZE``), at least 1. The ``"auto"`` of
    inference.json's ``cpu_threads`` and ``postprocess_workers`` starts from it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def set_cpu_threads(threads: int | str, device: torch.device | str, worker_processes: int = 0) -> int:
    """Set torch's intra-op CPU threads for inference and return them (inference.json's ``cpu_threads``).

    ``"auto"``: on a CPU device, this process's share of the cores (:func:`cpu_cores`) minus one per
    worker process (the loader's ``num_workers`` and the ``postprocess_workers``), at least 1. Torch's
    own default, one thread per core, makes the network's threads compete with those processes: on 2
    cores the generated slide's window loop took about 10 % longer with it (docs/speed.md). On a CUDA
    device ``"auto"`` leaves torch as it is. An integer sets that many threads on any device.

    Raises:
        ValueError: ``threads`` is neither ``"auto"`` nor an integer >= 1, or ``worker_processes`` < 0.
    """
    if isinstance(worker_processes, bool) or not isinstance(worker_processes, (int, np.integer)) or worker_processes < 0:
        raise ValueError(f"worker_processes must be an integer >= 0, got {worker_processes!r}.")
    if threads == AUTO:
        if torch.device(device).type != "cpu":
            return torch.get_num_threads()
        threads = max(1, cpu_cores() - int(worker_processes))
    elif isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"cpu_threads must be {AUTO!r} or an integer >= 1, got {threads!r}.")
    torch.set_num_threads(int(threads))
    return int(threads)


def _splits(length: int, tile: int) -> list[tuple[int, int]]:
    """Split ``[0, length)`` into ``ceil(length / tile)`` contiguous, nearly equal parts."""
    n = max(1, math.ceil(length / tile))
    bounds = [round(i * length / n) for i in range(n + 1)]
    return list(itertools.pairwise(bounds))


class TiledAttentionInferer(Inferer):
    """Attention of whole images with the network F, tiled and with dihedral TTA.

    Images that fit in ``roi_size`` run in one pass. Larger ones are split into
    nearly equal tiles of at most ``roi_size``; each tile is computed on a window of
    the tile plus ``margin`` pixels of context on each side (clipped to the image)
    and only the tile is kept. With the default margin (F's receptive-field radius)
    the result equals whole-image inference up to float rounding.

    With ``tta`` the attention is the mean over the identity and the paper's six
    transforms t (flips, transpose, rotations) of ``t^-1(A(t(x)))``; the attention
    of each transformed image is computed (tiled) in full before being averaged.

    The network runs in evaluation mode (BatchNorm running statistics, running tau)
    without gradients; its previous mode is restored afterwards.

    Args:
        roi_size: maximum tile size, an int or (height, width), each >= 16 pixels.
        margin: context pixels on each side of a tile; None: F's receptive-field radius.
        tta: average over the 7 dihedral transforms (the authors' default).
        amp_dtype: autocast dtype: "auto" (bf16 where native on the device, else float32; see
            :func:`custom.model.precision.resolve_amp_dtype`), "bfloat16", "float16" or None for float32.
        channels_last: feed windows in channels-last memory format.
        r: slope of the percentile sigmoid at inference, ``A = sigmoid(r (a - tau))``;
            None: the network's own ``r`` (training's, 20 here, which saturates all but a thin rim
            of each nucleus to 0 or 1). A slope of about 1 gives a soft map whose histogram keeps
            the logits' spread, which a per-image threshold (``threshold="otsu"`` in
            :func:`custom.inference.postprocess.attention_to_instances`) needs.
    """

    def __init__(
        self,
        roi_size: int | Sequence[int] = 512,
        margin: int | None = None,
        tta: bool = True,
        amp_dtype: str | None = None,
        channels_last: bool = False,
        r: float | None = None,
    ):
        super().__init__()
        roi = (roi_size, roi_size) if isinstance(roi_size, (int, np.integer)) else tuple(roi_size)
        if len(roi) != 2 or not all(isinstance(r, (int, np.integer)) and not isinstance(r, bool) for r in roi):
            raise ValueError(f"roi_size must be an int or (height, width) ints, got {roi_size!r}.")
        if min(roi) < MIN_ROI_SIZE:
            raise ValueError(f"roi_size must be >= {MIN_ROI_SIZE} pixels, got {roi_size!r}.")
        if margin is not None and (not isinstance(margin, (int, np.integer)) or isinstance(margin, bool) or margin < 0):
            raise ValueError(f"margin must be an integer >= 0 (pixels) or None, got {margin!r}.")
        autocast_context("cpu", amp_dtype)  # validates the dtype name
        self.r = check_sigmoid_slope(r, "r")
        self.roi_size = (int(roi[0]), int(roi[1]))
        self.margin = None if margin is None else int(margin)
        self.tta, self.amp_dtype, self.channels_last = flag(tta, "tta"), amp_dtype, flag(channels_last, "channels_last")

    def _check_inputs(self, inputs, net: nn.Module) -> None:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"inputs must be a torch tensor (B, C, H, W), got {type(inputs).__name__}.")
        if inputs.ndim != 4:
            raise ValueError(f"inputs must have shape (B, C, H, W), got {tuple(inputs.shape)}.")
        if not inputs.is_floating_point():
            raise ValueError(f"inputs must be a float tensor (normalised image), got dtype {inputs.dtype}.")
        if min(inputs.shape) < 1:
            raise ValueError(f"inputs is empty: shape {tuple(inputs.shape)}.")
        expected = getattr(net, "in_channels", None)
        if expected is not None and inputs.shape[1] != expected:
            raise ValueError(f"inputs have {inputs.shape[1]} channels, the network expects {expected}.")

    def _logits(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(x.device, self.amp_dtype):
            return net.logits(x).float()

    def tiled_logits(self, net: nn.Module, x: torch.Tensor, margin: int) -> torch.Tensor:
        """F's logits ``(B, 1, H, W)`` float32 of ``x`` ``(B, C, H, W)``, tile by tile."""
        _, _, h, w = x.shape
        th, tw = self.roi_size
        if h <= th and w <= tw:
            return self._logits(net, x.contiguous())
        out = torch.empty((x.shape[0], 1, h, w), dtype=torch.float32, device=x.device)
        for y0, y1 in _splits(h, th):
            wy0, wy1 = max(0, y0 - margin), min(h, y1 + margin)
            for x0, x1 in _splits(w, tw):
                wx0, wx1 = max(0, x0 - margin), min(w, x1 + margin)
                window = self._logits(net, x[:, :, wy0:wy1, wx0:wx1].contiguous())
                out[:, :, y0:y1, x0:x1] = window[:, :, y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0]
        return out

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        """Attention ``(B, 1, H, W)`` float32 of ``inputs`` ``(B, C, H, W)`` with ``network``
        (an :class:`AttentionNet`, possibly inside a ScaleAttentionModel or DDP)."""
        net = _attention_net(network)
        if not (hasattr(net, "logits") and hasattr(net, "activation")):
            raise ValueError(f"network must be an AttentionNet (with .logits and .activation), got {type(net).__name__}.")
        self._check_inputs(inputs, net)
        margin = receptive_field_radius(net) if self.margin is None else self.margin
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        transforms = (0, *EQUIVARIANCE_TRANSFORMS) if self.tta else (0,)
        with eval_mode(net):
            total = None
            for t in transforms:
                attention = net.activation(self.tiled_logits(net, dihedral(x, t), margin), r=self.r)
                attention = dihedral_inverse(attention, t)
                total = attention.clone() if total is None else total.add_(attention)
            out = (total / len(transforms)).contiguous()
        if isinstance(inputs, MetaTensor):
            out = convert_to_dst_type(out, inputs, device=out.device)[0]
        return out
