"""Networks: the attention network F, its percentile sigmoid, and the F+G scale model.

Shapes: images ``(B, C, H, W)`` (ImageNet-normalised RGB for C=3); attention
logits and maps ``(B, 1, H, W)``; scale logits ``(B, num_magnifications)``.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import resnet34
from torch import nn

from custom.config import flag
from custom.data import IMAGENET_MEAN, IMAGENET_STD
from custom.transforms import EQUIVARIANCE_TRANSFORMS, dihedral, dihedral_inverse

# Ruifrok & Johnston colour deconvolution: optical density (RGB) -> hematoxylin (skimage's hed_from_rgb[:, 0])
_HEMATOXYLIN_FROM_OD = (1.87798274, -0.06590806, -0.60190736)
STAIN_PRIORS = ("none", "input", "logit")

__all__ = [
    "AttentionNet",
    "DilatedResidualBlock",
    "HematoxylinDensity",
    "PercentileSigmoid",
    "ScaleAttentionModel",
    "autocast_context",
    "fast_bf16",
    "PRECISION_MODES",
    "load_attention_weights",
    "precision_modes",
    "resolve_amp_dtype",
    "save_attention_network",
    "stored_postprocess",
    "scale_classifier",
]

PAPER_DILATIONS = (1, 2, 3, 5, 10, 20)
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


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


AUTO_AMP = "auto"
_FP32_NAMES = ("float32", "fp32", "none", "")


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 autocast runs on native kernels on ``device``.

    CUDA: the GPU supports bf16 (Ampere and newer). CPU: oneDNN has bf16 kernels for this
    processor (AVX512-BF16, AMX or AVX512 core). Elsewhere, e.g. an AVX2-only CPU, bf16 is
    emulated: a training step of the width-32 model took 181 s there against 23 s in fp32 with channels-last
    (``scripts/bench_train.py``).
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_bf16()
    return False


@functools.lru_cache(maxsize=1)
def _cpu_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# benchmark settings by name: (amp_dtype, channels_last), as scripts/bench_train.py and bench_infer.py time them
PRECISION_MODES = {"fp32": (None, False), "fp32 + channels_last": (None, True), "bf16 + channels_last": ("bfloat16", True)}


def precision_modes(modes) -> list[tuple[str, str | None, bool]]:
    """``[(name, amp_dtype, channels_last)]`` for names of :data:`PRECISION_MODES`, in the given order.

    Args:
        modes: one name or a sequence of names; spaces are ignored ("fp32+channels_last" works).

    Raises:
        ValueError: naming the unknown modes and the known ones.
    """
    names = [modes] if isinstance(modes, str) else list(modes)
    canonical = {k.replace(" ", ""): k for k in PRECISION_MODES}
    unknown = [m for m in names if not isinstance(m, str) or m.replace(" ", "") not in canonical]
    if unknown or not names:
        raise ValueError(f"modes {unknown or names}: unknown or none; choose from {list(PRECISION_MODES)}.")
    chosen = [canonical[m.replace(" ", "")] for m in names]
    return [(k, *PRECISION_MODES[k]) for k in chosen]


def resolve_amp_dtype(device: torch.device | str, amp_dtype: str | None) -> str | None:
    """The autocast dtype name that runs on ``device``: ``"auto"`` becomes "bfloat16" where
    :func:`fast_bf16` holds and None (float32) elsewhere; any other value is checked and
    returned as given, None for full precision.

    Raises:
        ValueError: ``amp_dtype`` is not "auto", a known dtype name or None.
    """
    if amp_dtype is None or str(amp_dtype).lower() in _FP32_NAMES:
        return None
    key = str(amp_dtype).lower()
    if key == AUTO_AMP:
        return "bfloat16" if fast_bf16(device) else None
    if key not in _DTYPES:
        raise ValueError(f"amp_dtype must be {AUTO_AMP!r}, one of {sorted(_DTYPES)} or None, got {amp_dtype!r}.")
    return amp_dtype


def autocast_context(device: torch.device | str, amp_dtype: str | None):
    """Mixed-precision context for ``device`` ("cpu" or "cuda").

    Args:
        device: where the computation runs.
        amp_dtype: "auto" (bf16 where it is native on ``device``, else float32; see
            :func:`resolve_amp_dtype`), "bfloat16"/"bf16", "float16"/"fp16", or None /
            "float32" for full precision. An explicit bf16 on a CPU without native bf16
            warns: it is several times slower than float32 there.
    """
    name = resolve_amp_dtype(device, amp_dtype)
    if name is None:
        return contextlib.nullcontext()
    device = torch.device(device)
    dtype = _DTYPES[name.lower()]
    if dtype is torch.bfloat16 and device.type == "cpu" and not fast_bf16(device):
        warnings.warn(f"amp_dtype={amp_dtype!r} on a CPU without native bfloat16 (no AVX512/AMX bf16 kernels): "
                      f"it runs several times slower than float32 here; amp_dtype 'auto' picks float32 on such CPUs.",
                      RuntimeWarning, stacklevel=2)
    return torch.autocast(device_type=device.type, dtype=dtype)


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
        return (-torch.log(rgb) * self.weights).sum(1, keepdim=True)


LEGACY_STAIN_PRIOR_GAIN = 2.0
"""The prior gain of every model exported before bundle 0.6.0, which stored none (the default then)."""


class AttentionNet(nn.Module):
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
    and ``stain_prior`` / ``stain_prior_gain``: loading adopts the stored gain (the weights
    only make sense with it; :data:`LEGACY_STAIN_PRIOR_GAIN` for files that store none) and
    :func:`load_attention_weights` refuses another prior.
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
        super().__init__()
        if width < 1 or in_channels < 1:
            raise ValueError(f"width and in_channels must be >= 1, got width={width}, in_channels={in_channels}.")
        if stain_prior not in STAIN_PRIORS:
            raise ValueError(f"stain_prior must be one of {STAIN_PRIORS}, got {stain_prior!r}.")
        if stain_prior != "none" and in_channels != 3:
            raise ValueError(f"stain_prior={stain_prior!r} needs RGB input (in_channels=3), got in_channels={in_channels}.")
        self.in_channels, self.width, self.dilations = in_channels, width, tuple(int(d) for d in dilations)
        self.stain_prior, self.stain_prior_gain = stain_prior, float(stain_prior_gain)
        self.hematoxylin = HematoxylinDensity() if stain_prior != "none" else None
        stem_in = in_channels + (1 if stain_prior == "input" else 0)
        self.stem = nn.Sequential(
            nn.Conv2d(stem_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(*[DilatedResidualBlock(width, d) for d in self.dilations])
        self.head = nn.Conv2d(width, 1, 1, bias=True)
        if stain_prior == "logit":
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.activation = PercentileSigmoid(eta=eta, r=r, momentum=momentum, sparse=sparse)
        self.stain_target = None if stain_target is None else [[float(v) for v in stain_target[0]], [float(v) for v in stain_target[1]]]
        self.stain_settings = None if stain_settings is None else dict(stain_settings)
        self.postprocess: dict = {}

    def get_extra_state(self) -> dict:
        return {"stain_target": self.stain_target, "stain_settings": self.stain_settings, "postprocess": dict(self.postprocess),
                "stain_prior": self.stain_prior, "stain_prior_gain": self.stain_prior_gain}

    def set_extra_state(self, state: dict) -> None:
        self.stain_target = state.get("stain_target")
        self.stain_settings = state.get("stain_settings")
        self.postprocess = dict(state.get("postprocess") or {})
        # the gain the weights were trained with; files exported before bundle 0.6.0 store none and all used 2.0
        self.stain_prior_gain = float(state.get("stain_prior_gain", LEGACY_STAIN_PRIOR_GAIN))

    @property
    def receptive_radius(self) -> int:
        """Pixels of context each output pixel sees on each side (stem 1, each block 2 d)."""
        return 1 + 2 * sum(self.dilations)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Attention logits ``a``: ``(B, in_channels, H, W)`` -> ``(B, 1, H, W)``."""
        if self.stain_prior == "input":
            h = self.hematoxylin(x).to(x.dtype)
            return self.head(self.blocks(self.stem(torch.cat([x, h], dim=1))))
        a = self.head(self.blocks(self.stem(x)))
        if self.stain_prior == "logit":
            a = a + self.stain_prior_gain * self.hematoxylin(x).to(a.dtype)
        return a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attention map ``A`` in [0, 1]: ``(B, in_channels, H, W)`` -> ``(B, 1, H, W)``."""
        return self.activation(self.logits(x))


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


def save_attention_network(net: AttentionNet, path: str | os.PathLike) -> Path:
    """Write F's state dict (weights, BatchNorm statistics, running tau, stain target and
    tuned post-processing) to ``path`` atomically (temporary name, then rename).

    Raises:
        FloatingPointError: when a weight or buffer is NaN/Inf (nothing is written).
    """
    state = {k: (v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v) for k, v in net.state_dict().items()}
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"not exporting {path}: non-finite values in {bad[:3]}.")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def _read_attention_state(path: str | os.PathLike) -> dict:
    """F's state dict from ``model.pt`` or a training checkpoint, with the errors of :func:`load_attention_weights`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model weights {path}: no such file. Pass --model_path (or --model) the model.pt to use.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (zip/pickle errors of torch.load come in many types)
        raise ValueError(
            f"model weights {path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "The file is truncated or not a model; copy or export it again."
        ) from None  # the first line of torch's message is kept above; its traceback adds nothing for the user
    if isinstance(state, dict) and isinstance(state.get("network"), dict):
        state = {k[len("attention."):]: v for k, v in state["network"].items() if k.startswith("attention.")}
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: holds no attention-network weights (expected model.pt or a training checkpoint).")
    return state


def stored_postprocess(path: str | os.PathLike) -> dict:
    """The tuned post-processing stored in a model file by ``scripts/tune_postprocess.py --write_model``.

    Returns:
        the keyword arguments of :func:`custom.postprocess.attention_to_instances` plus
        ``sharpness`` (the sigmoid slope the maps were tuned at) and ``tuned_on``, as stored.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_attention_weights`; ValueError also when
            the file stores no tuned post-processing (the message says how to tune it).
    """
    extra = _read_attention_state(path).get("_extra_state") or {}
    postprocess = dict(extra.get("postprocess") or {}) if isinstance(extra, dict) else {}
    if not postprocess:
        raise ValueError(f"{path}: stores no tuned post-processing; run scripts/tune_postprocess.py --checkpoint {path} --write_model.")
    return postprocess


def load_attention_weights(net: AttentionNet, path: str) -> AttentionNet:
    """Load F's weights and running tau from ``path`` into ``net`` (in place) and return it.

    Accepts the exported ``model.pt`` (F's state dict) or a training checkpoint
    (``{"network": state of ScaleAttentionModel, ...}``, F's keys under ``attention.``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a readable PyTorch checkpoint, holds no attention-network
            weights, or weights of another width/architecture (each message names the file).
        FloatingPointError: a weight or buffer in ``path`` is NaN or infinite.
    """
    state = _read_attention_state(path)
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"model weights {path}: NaN or infinite values in {bad[:3]}; use an earlier checkpoint.")
    if "_extra_state" not in state:  # saved before stain target / post-processing were stored: keep the net's own
        state = {**state, "_extra_state": net.get_extra_state()}
    stored_prior = (state["_extra_state"] or {}).get("stain_prior")
    if stored_prior is not None and stored_prior != net.stain_prior:  # "logit" and "none" have the same weights: check by name
        raise ValueError(f"{path}: was trained with stain_prior={stored_prior!r}, the network is built with "
                         f"stain_prior={net.stain_prior!r}. Set --stain_prior {stored_prior}.")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: does not fit this attention network (width={net.width}, dilations={net.dilations}, "
            f"stain_prior={net.stain_prior!r}): {str(e).splitlines()[0]} Set --width/--dilations/--stain_prior to the "
            "values it was trained with."
        ) from e
    return net
