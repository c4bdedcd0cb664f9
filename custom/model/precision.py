"""Mixed precision and memory format: which autocast dtype a device runs fast, and the context that applies it."""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

__all__ = ['autocast_context', 'benchmark_modes', 'fast_bf16', 'PRECISION_MODES', 'precision_modes', 'resolve_amp_dtype']


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
AUTO_AMP = "auto"
_FP32_NAMES = ("float32", "fp32", "none", "")


def fast_bf16(device: torch.device | str) -> bool:
    """Whether bfloat16 autocast runs on native kernels on ``device``.

    CUDA: the GPU supports bf16 (Ampere and newer). CPU: oneDNN has bf16 kernels for this
    processor (AVX512-BF16, AMX or AVX512 core). Elsewhere, e.g. an AVX2-only CPU, bf16 is
    emulated: a training step of the width-32 model took 181 s there against 23 s in fp32 with channels-last
    (``scripts/bench/train.py``).
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


# benchmark settings by name: (amp_dtype, channels_last), as scripts/bench/train.py and scripts/bench/infer.py time them
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


def benchmark_modes(modes, threads: int | None = None) -> list[tuple[str, str | None, bool]]:
    """:func:`precision_modes` for a benchmark's command line (``scripts/bench/train.py``, ``infer.py``):
    an unknown name exits with a message naming ``--modes``; ``threads`` (if given) sets torch's CPU threads."""
    try:
        chosen = precision_modes(modes)
    except ValueError as e:
        raise SystemExit(f"--{e}") from None
    if threads:
        torch.set_num_threads(int(threads))
    return chosen


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
