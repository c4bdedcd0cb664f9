"""Networks: the attention network F, its percentile sigmoid, and the F+G scale model.

Shapes: images ``(B, C, H, W)`` (ImageNet-normalised RGB for C=3); attention
logits and maps ``(B, 1, H, W)``; scale logits ``(B, num_magnifications)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from monai.networks.nets import BasicUNet, resnet34
from torch import nn
from torch.nn import functional as F

from custom.command_line import flag
from custom.model.precision import AUTO_AMP, autocast_context
from custom.transforms import (
    EQUIVARIANCE_TRANSFORMS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    dihedral,
    dihedral_inverse,
)

__all__ = ['ATTENTION_NETWORKS', 'AttentionNet', 'CompactAttentionNet', 'DilatedResidualBlock', 'HematoxylinDensity', 'PercentileSigmoid', 'ScaleAttentionModel', 'scale_classifier']


# Ruifrok & Johnston colour deconvolution: optical density (RGB) -> hematoxylin (skimage's hed_from_rgb[:, 0])
_HEMATOXYLIN_FROM_OD = (1.87798274, -0.06590806, -0.60190736)
STAIN_PRIORS = ("none", "input", "logit")
PAPER_DILATIONS = (1, 2, 3, 5, 10, 20)


def check_sigmoid_slope(value, name: str = "r") -> float | None:
    """``value`` as a float if it is a usable sigmoid slope (a finite number > 0), None for None.

    Raises:
        ValueError: naming ``name`` (the argument or config key) and the value.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} (sigmoid slope) must be a finite number > 0 or None, got {value!r}.")
    return float(value)


class PercentileSigmoid(nn.Module):
    """The paper's compressed, biased sigmoid ``A = sigmoid(r (a - tau))`` (eq. 1).

    In training, ``tau`` is the batch mean of each image's ``(100 - eta)``-th
    percentile of its logits (the value its top ``eta`` % of pixels exceed),
    detached from the graph. A running estimate (the first batch sets it, then
    ``tau <- (1 - momentum) tau + momentum tau_batch``) is kept as the buffer
    ``running_tau`` and used in evaluation, so it is saved with the weights.
    Before any training step the running tau is 0, as BatchNorm's running mean
    starts at 0.

    Args:
        eta: percentage of pixels (0 < eta < 100) that should lie above tau (paper: 7).
        r: compression of the sigmoid (> 0; paper: 20).
        momentum: weight of the new batch in the running tau (0 < momentum <= 1).
        sparse: False gives the plain ``sigmoid(a)`` of the M_-sparse ablation.
    """

    def __init__(self, eta: float = 7.0, r: float = 20.0, momentum: float = 0.1, sparse: bool = True):
        super().__init__()
        if not 0.0 < eta < 100.0:
            raise ValueError(f"eta (percentage of attended pixels) must be in (0, 100), got {eta}.")
        if r <= 0:
            raise ValueError(f"r (sigmoid compression) must be > 0, got {r}.")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}.")
        self.eta, self.r, self.momentum, self.sparse = float(eta), float(r), float(momentum), flag(sparse, "sparse")
        self.register_buffer("running_tau", torch.zeros(()))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.long))
        self.last_tau: torch.Tensor | None = None  # the tau of the latest call (None for plain sigmoid)

    def batch_tau(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean over the batch of each image's (100 - eta)-th percentile of ``logits``
        ``(B, 1, H, W)`` (linear interpolation, as numpy.percentile). Returns a detached scalar."""
        flat = logits.detach().float().flatten(1)
        return torch.quantile(flat, 1.0 - self.eta / 100.0, dim=1).mean()

    def forward(self, logits: torch.Tensor, use_running_tau: bool = False, r: float | None = None) -> torch.Tensor:
        """Map logits ``(B, 1, H, W)`` to attention in [0, 1], same shape, float32.

        Args:
            logits: the attention network's output ``a``.
            use_running_tau: in training, use the running tau instead of the batch's own
                (the equivariance target branch does this); evaluation always uses it.
            r: slope used instead of ``self.r`` (> 0); for a plain sigmoid (``sparse=False``),
                ``sigmoid(r a)``. Inference uses a small slope for a soft map that keeps the
                logits' ordering where the training slope saturates; ``A > 0.5`` is the same
                set of pixels (``a > tau``) for every slope.
        """
        r = check_sigmoid_slope(r, "r")
        logits = logits.float()
        if not self.sparse:
            self.last_tau = None
            return torch.sigmoid(logits if r is None else r * logits)
        if self.training and not use_running_tau:
            tau = self.batch_tau(logits)
            with torch.no_grad():
                if int(self.num_batches_tracked) == 0:
                    self.running_tau.copy_(tau)
                else:
                    self.running_tau.mul_(1.0 - self.momentum).add_(self.momentum * tau)
                self.num_batches_tracked.add_(1)
        else:
            tau = self.running_tau
        self.last_tau = tau.detach()
        return torch.sigmoid((self.r if r is None else r) * (logits - tau))

    def extra_repr(self) -> str:
        return f"eta={self.eta}, r={self.r}, momentum={self.momentum}, sparse={self.sparse}"


class DilatedResidualBlock(nn.Module):
    """conv3x3(d) -> BN -> ReLU -> conv3x3(d) -> BN, plus the input, then ReLU.
    Stride 1 and padding d keep ``(B, width, H, W)``."""

    def __init__(self, width: int, dilation: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation, bias=False),
            nn.BatchNorm2d(width),
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.body(x) + x)


class HematoxylinDensity(nn.Module):
    """Hematoxylin optical density (colour deconvolution, Ruifrok & Johnston) of an
    ImageNet-normalised RGB batch: ``(B, 3, H, W)`` -> ``(B, 1, H, W)``, in OD units
    (about 0.2-0.8 on nuclei, below 0.3 elsewhere on stain-normalised H&E). Per pixel,
    no learnable parameters, so it tiles exactly.

    Args:
        mean, std: the normalisation applied to the input (undone here to get RGB in [0, 1]).
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("weights", torch.tensor(_HEMATOXYLIN_FROM_OD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rgb = (x.float() * self.std + self.mean).clamp(1e-6, 1.0)
        # the weighted sum over the three channels as a 1x1 convolution: one pass in either memory layout
        # (the sum over dim 1 of a channels-last batch strides), the same values as the sum of products;
        # in float32 under autocast too, as the elementwise sum was
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.conv2d(torch.log(rgb), -self.weights)


class _PriorAttentionBase(nn.Module):
    """What every attention network shares: the stain prior, the percentile sigmoid and the state a
    model file carries besides its weights (see :class:`AttentionNet`). A subclass builds ``self.body``
    (``(B, in_channels [+1 for the "input" prior], H, W)`` -> ``(B, 1, H, W)``) and ``receptive_radius``."""

    def __init__(self, in_channels: int, eta: float, r: float, momentum: float, sparse: bool, stain_prior: str,
                 stain_prior_gain: float, stain_target: Sequence[Sequence[float]] | None, stain_settings: Mapping | None):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}.")
        if stain_prior not in STAIN_PRIORS:
            raise ValueError(f"stain_prior must be one of {STAIN_PRIORS}, got {stain_prior!r}.")
        if stain_prior != "none" and in_channels != 3:
            raise ValueError(f"stain_prior={stain_prior!r} needs RGB input (in_channels=3), got in_channels={in_channels}.")
        self.in_channels = in_channels
        self.stain_prior, self.stain_prior_gain = stain_prior, float(stain_prior_gain)
        self.hematoxylin = HematoxylinDensity() if stain_prior != "none" else None
        self.activation = PercentileSigmoid(eta=eta, r=r, momentum=momentum, sparse=sparse)
        self.stain_target = None if stain_target is None else [[float(v) for v in stain_target[0]], [float(v) for v in stain_target[1]]]
        self.stain_settings = None if stain_settings is None else dict(stain_settings)
        self.postprocess: dict = {}

    @property
    def body_in_channels(self) -> int:
        """Channels the body takes: the image's, plus the hematoxylin map for the "input" prior."""
        return self.in_channels + (1 if self.stain_prior == "input" else 0)

    def get_extra_state(self) -> dict:
        return {"stain_target": self.stain_target, "stain_settings": self.stain_settings, "postprocess": dict(self.postprocess),
                "stain_prior": self.stain_prior, "stain_prior_gain": self.stain_prior_gain, "architecture": self.architecture()}

    def set_extra_state(self, state: dict) -> None:
        self.stain_target = state.get("stain_target")
        self.stain_settings = state.get("stain_settings")
        self.postprocess = dict(state.get("postprocess") or {})
        if "stain_prior_gain" in state:  # the gain the weights were trained with
            self.stain_prior_gain = float(state["stain_prior_gain"])

    def architecture(self) -> dict:
        """The network's class and constructor arguments, stored in its model file so that
        :func:`custom.model.checkpoint.load_attention_weights` rebuilds it from the file alone."""
        raise NotImplementedError

    def _shared_args(self) -> dict:
        act = self.activation
        return {"eta": act.eta, "r": act.r, "momentum": act.momentum, "sparse": act.sparse,
                "stain_prior": self.stain_prior, "stain_prior_gain": self.stain_prior_gain, "in_channels": self.in_channels}

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Attention logits ``a``: ``(B, in_channels, H, W)`` -> ``(B, 1, H, W)``."""
        if self.stain_prior == "input":
            return self.body(torch.cat([x, self.hematoxylin(x).to(x.dtype)], dim=1))
        a = self.body(x)
        if self.stain_prior == "logit":
            a = a + self.stain_prior_gain * self.hematoxylin(x).to(a.dtype)
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention map ``A`` in [0, 1]: ``(B, in_channels, H, W)`` -> ``(B, 1, H, W)``."""
        return self.activation(self.logits(x))


class AttentionNet(_PriorAttentionBase):
    """The attention network F: a full-resolution dilated residual FCN.

    conv3x3 (in -> width, no bias) -> BN -> ReLU; one :class:`DilatedResidualBlock`
    per dilation (paper: 1, 2, 3, 5, 10, 20, receptive field ~170 px); conv1x1
    (width -> 1, bias) gives the logit map ``a``; :class:`PercentileSigmoid` gives ``A``.

    An optional stain prior (not in the paper; no labels involved) tells F where the
    hematoxylin is (:class:`HematoxylinDensity` ``h``, needs ``in_channels=3`` RGB):

    - ``"input"``: ``h`` is a fourth input channel of the stem;
    - ``"logit"``: ``a = F(I) + stain_prior_gain * h``, and F's head starts at zero, so
      training starts from the hematoxylin map and learns a correction to it.

    Args:
        in_channels: input channels (3 for RGB).
        width: feature channels (paper: 64).
        dilations: one residual block per entry.
        eta, r, momentum, sparse: see :class:`PercentileSigmoid`.
        stain_prior: "none" (the paper), "input" or "logit".
        stain_prior_gain: weight of ``h`` in the logits for ``"logit"`` (logit units per OD unit).
        stain_target: the Reinhard target ``(LAB means, LAB stds)`` the network was trained
            with, kept in its state dict so inference normalises new images the same way.
        stain_settings: the rest of that normalisation, ``{"brightness_percentile": float
            or None, "max_std_ratio": float or None}`` (see
            :class:`custom.transforms.ReinhardNormalize`), kept likewise.

    Besides weights and BatchNorm statistics, the state dict carries (as ``_extra_state``)
    ``stain_target``, ``stain_settings``, ``postprocess`` (the post-processing parameters
    tuned on the validation images by ``scripts/tune_postprocess.py``, empty until tuned),
    ``stain_prior`` / ``stain_prior_gain`` (loading adopts the stored gain: the weights
    only make sense with it, and :func:`load_attention_weights` refuses another prior)
    and ``architecture`` (class and arguments, from bundle 0.14.0).
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: int = 64,
        dilations: Sequence[int] = PAPER_DILATIONS,
        eta: float = 7.0,
        r: float = 20.0,
        momentum: float = 0.1,
        sparse: bool = True,
        stain_prior: str = "none",
        stain_prior_gain: float = 1.0,
        stain_target: Sequence[Sequence[float]] | None = None,
        stain_settings: Mapping | None = None,
    ):
        super().__init__(in_channels, eta, r, momentum, sparse, stain_prior, stain_prior_gain, stain_target, stain_settings)
        if width < 1:
            raise ValueError(f"width must be >= 1, got width={width}.")
        self.width, self.dilations = width, tuple(int(d) for d in dilations)
        self.stem = nn.Sequential(
            nn.Conv2d(self.body_in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(*[DilatedResidualBlock(width, d) for d in self.dilations])
        self.head = nn.Conv2d(width, 1, 1, bias=True)
        if stain_prior == "logit":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))

    def architecture(self) -> dict:
        return {"_target_": "custom.model.networks.AttentionNet", "width": self.width, "dilations": list(self.dilations),
                **self._shared_args()}

    @property
    def receptive_radius(self) -> int:
        """Pixels of context each output pixel sees on each side (stem 1, each block 2 d)."""
        return 1 + 2 * sum(self.dilations)


class CompactAttentionNet(_PriorAttentionBase):
    """A fast attention network with F's interface, for inference on CPUs: MONAI's ``BasicUNet``
    run at 1/``stride`` of the resolution on the pixels folded into channels.

    ``PixelUnshuffle(stride)`` (``(B, C, H, W)`` -> ``(B, C stride^2, H/stride, W/stride)``: no pixel is
    dropped) -> ``BasicUNet`` (BatchNorm, ``features``) -> ``stride^2`` outputs -> ``PixelShuffle(stride)``
    gives full-resolution logits, to which the ``"logit"`` stain prior adds the full-resolution
    hematoxylin map. Its cost is a few thousand multiply-adds per pixel against F's ~115,000 at
    width 32. It is trained to reproduce a trained F (``bundle/configs/distill.json``), whose
    running tau, stain target and post-processing it carries.

    Inputs of any size are padded (replicating the border) to a multiple of :attr:`size_multiple`
    and the output is cropped back. The U-Net's pooling makes the result depend slightly on where a
    window starts, so tiled inference (:class:`custom.inference.inferer.TiledAttentionInferer`) is
    close to, not equal to, whole-image inference; ``context`` is the margin of image it takes around a tile.

    Args:
        in_channels, eta, r, momentum, sparse, stain_prior, stain_prior_gain, stain_target, stain_settings:
            as :class:`AttentionNet` (``stain_prior`` "none" or "logit").
        stride: pixel-unshuffle factor (4: the U-Net's first level works on 4x4 blocks of pixels).
        features: ``BasicUNet`` features (six numbers: five levels and the last decoder's).
        context: pixels of context on each side of a tile in tiled inference.
    """

    def __init__(
        self,
        in_channels: int = 3,
        stride: int = 4,
        features: Sequence[int] = (16, 16, 32, 64, 128, 16),
        context: int = 64,
        eta: float = 7.0,
        r: float = 20.0,
        momentum: float = 0.1,
        sparse: bool = True,
        stain_prior: str = "logit",
        stain_prior_gain: float = 1.0,
        stain_target: Sequence[Sequence[float]] | None = None,
        stain_settings: Mapping | None = None,
    ):
        super().__init__(in_channels, eta, r, momentum, sparse, stain_prior, stain_prior_gain, stain_target, stain_settings)
        if stain_prior == "input":
            raise ValueError("CompactAttentionNet takes stain_prior 'none' or 'logit', not 'input'.")
        if not isinstance(stride, (int, np.integer)) or isinstance(stride, bool) or stride < 1:
            raise ValueError(f"stride must be an integer >= 1, got {stride!r}.")
        if len(features) != 6 or min(int(f) for f in features) < 1:
            raise ValueError(f"features must be six positive numbers (BasicUNet), got {features!r}.")
        if not isinstance(context, (int, np.integer)) or isinstance(context, bool) or context < 0:
            raise ValueError(f"context must be an integer >= 0 (pixels), got {context!r}.")
        self.stride, self.features, self.context = int(stride), tuple(int(f) for f in features), int(context)
        self.unet = BasicUNet(spatial_dims=2, in_channels=in_channels * self.stride**2, out_channels=self.stride**2,
                              features=self.features, norm=("batch", {"affine": True}), act=("relu", {"inplace": True}))
        if stain_prior == "logit":  # start from the hematoxylin map, as F does
            last = self.unet.final_conv
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    @property
    def size_multiple(self) -> int:
        """Heights and widths the U-Net takes without padding: ``stride * 2**4`` (four poolings)."""
        return self.stride * 16

    @property
    def receptive_radius(self) -> int:
        """The context (pixels on each side) tiled inference takes around each tile."""
        return self.context

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        m = self.size_multiple
        ph, pw = -h % m, -w % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="replicate")
        out = F.pixel_shuffle(self.unet(F.pixel_unshuffle(x, self.stride)), self.stride)
        return out[..., :h, :w]

    def architecture(self) -> dict:
        return {"_target_": "custom.model.networks.CompactAttentionNet", "stride": self.stride,
                "features": list(self.features), "context": self.context, **self._shared_args()}


ATTENTION_NETWORKS = {"AttentionNet": AttentionNet, "CompactAttentionNet": CompactAttentionNet}


def scale_classifier(num_classes: int = 3, in_channels: int = 3, pretrained_path: str | None = None) -> nn.Module:
    """The scale classifier G: ResNet-34 (7x7 stride-2 stem, max-pool, 4 stages,
    global average pool, linear 512 -> ``num_classes``), MONAI's implementation.

    Args:
        num_classes: number of magnifications.
        in_channels: channels of ``J = A * I``.
        pretrained_path: optional state dict (e.g. ImageNet weights converted to MONAI's
            ResNet key names) to start from; a final layer of another size is skipped.
            Nothing is downloaded.
    """
    net = resnet34(spatial_dims=2, n_input_channels=in_channels, num_classes=num_classes, conv1_t_size=7, conv1_t_stride=2)
    if pretrained_path:
        state = torch.load(pretrained_path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        own = net.state_dict()
        unknown = [k for k in state if k not in own]
        if unknown:
            raise ValueError(f"{pretrained_path}: {len(unknown)} keys are not in MONAI's resnet34, e.g. {unknown[:3]}.")
        kept = {k: v for k, v in state.items() if own[k].shape == v.shape}
        net.load_state_dict(kept, strict=False)
    return net


class ScaleAttentionModel(nn.Module):
    """F and G trained together: ``A = F(I)``, ``J = A * I``, scale logits ``G(J)``.

    ``I`` is ImageNet-normalised, so masked pixels become the mean colour.
    In training with ``equivariance=True`` it also computes, without gradient and
    with the running tau, the equivariance target ``t^-1(A(t(I)))`` for one
    transform ``t`` drawn per batch from the paper's set (flips, transpose, rotations).

    Args:
        attention: the attention network F (:class:`AttentionNet`).
        classifier: the scale classifier G.
        equivariance: compute the equivariance target in training.
        equivariance_transforms: indices into ``custom.transforms.DIHEDRAL_NAMES``.
        amp_dtype: autocast dtype: "auto" (bf16 where native, else float32; :func:`resolve_amp_dtype`),
            "bfloat16", "float16" or None for float32.
        channels_last: run convolutions in channels-last memory format.

    ``forward(x)`` returns a dict: ``scale_logits (B, K)``, ``attention (B, 1, H, W)``
    (float32), ``logits (B, 1, H, W)``, ``tau`` (scalar used; absent for a plain sigmoid), and in training with
    equivariance ``equiv_target (B, 1, H, W)`` and ``equiv_transform`` (int).
    """

    def __init__(
        self,
        attention: AttentionNet,
        classifier: nn.Module,
        equivariance: bool = True,
        equivariance_transforms: Sequence[int] = EQUIVARIANCE_TRANSFORMS,
        amp_dtype: str | None = AUTO_AMP,
        channels_last: bool = True,
    ):
        super().__init__()
        self.attention, self.classifier = attention, classifier
        self.equivariance = flag(equivariance, "equivariance")
        self.equivariance_transforms = tuple(int(t) for t in equivariance_transforms)
        if self.equivariance and not self.equivariance_transforms:
            raise ValueError("equivariance is on but equivariance_transforms is empty.")
        autocast_context("cpu", amp_dtype)  # validates the name early
        self.amp_dtype, self.channels_last = amp_dtype, flag(channels_last, "channels_last")
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> dict:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        act = self.attention.activation
        with autocast_context(x.device, self.amp_dtype):
            logits = self.attention.logits(x)
            attention = act(logits)
            scale_logits = self.classifier(attention.to(x.dtype) * x)
            out = {"scale_logits": scale_logits.float(), "attention": attention, "logits": logits.float()}
            if act.last_tau is not None:
                out["tau"] = act.last_tau
            if self.training and self.equivariance:
                idx = torch.randint(len(self.equivariance_transforms), (1,)).item()
                t = self.equivariance_transforms[idx]
                with torch.no_grad():
                    xt = dihedral(x, t)
                    if self.channels_last:
                        xt = xt.contiguous(memory_format=torch.channels_last)
                    target = act(self.attention.logits(xt), use_running_tau=True)
                out["equiv_target"] = dihedral_inverse(target, t).contiguous()
                out["equiv_transform"] = t
        return out
