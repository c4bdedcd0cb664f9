"""Inference throughput of the attention network on this machine, in megapixels per second.

    python scripts/bench/infer.py                       # shipped model, 1000x1000 input, 2 repeats
    python scripts/bench/infer.py --size 2000 --roi 512 --repeats 1
    python scripts/bench/infer.py --device cuda --size 4000 --roi 2048   # on a GPU

For each precision (fp32 with and without channels-last, bf16 autocast + channels-last) and with / without
test-time augmentation (identity + 6 flips/rotations), it times (a) the network alone through the exact
tiled inferer and (b) the network plus the paper's post-processing (watershed) on a
synthetic H&E-coloured image of ``size`` x ``size`` pixels. Weights come from
``--model`` (default: the shipped ``bundle/models/model.pt``), architecture from
train.json's keys (``--width`` etc. must match the weights).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import fire
import numpy as np
import torch

from custom.inference.inferer import TiledAttentionInferer
from custom.inference.postprocess import PostprocessParams, attention_to_instances
from custom.model.checkpoint import load_attention_weights
from custom.model.precision import AUTO_AMP, PRECISION_MODES, benchmark_modes, resolve_amp_dtype

REPO = Path(__file__).resolve().parents[2]


def _image(size: int, seed: int = 0) -> torch.Tensor:
    """ImageNet-normalised (1, 3, size, size): pink background with dark purple blobs."""
    rng = np.random.default_rng(seed)
    rgb = np.empty((size, size, 3), np.float32)
    rgb[:] = (0.85, 0.6, 0.75)
    for cy, cx, r in zip(rng.uniform(0, size, size // 8), rng.uniform(0, size, size // 8), rng.uniform(4, 10, size // 8)):
        y0, y1, x0, x1 = max(int(cy - r), 0), min(int(cy + r) + 1, size), max(int(cx - r), 0), min(int(cx + r) + 1, size)
        yy, xx = np.mgrid[y0:y1, x0:x1]  # each blob drawn in its own box: O(size) blobs cost O(size), not O(size^3)
        rgb[y0:y1, x0:x1][(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (0.3, 0.2, 0.45)
    rgb += rng.normal(0, 0.03, rgb.shape).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return torch.from_numpy(((np.clip(rgb, 0, 1) - mean) / std).transpose(2, 0, 1).copy())[None]


def main(model: str = str(REPO / "bundle/models/model.pt"), size: int = 1000, roi: int = 1024, repeats: int = 2,
         threads: int | None = None, device: str = "cpu", modes=tuple(PRECISION_MODES), **overrides) -> None:
    """Print a table of seconds per image and megapixels per second.

    Args:
        model: F's weights.
        size: side of the square test image (pixels).
        roi: tile side of the inferer (images larger than this are tiled exactly).
        repeats: timed runs per setting (after one warm-up); the best is reported.
        threads: torch threads (default: torch's choice).
        device: "cpu" or "cuda" (the network and image go there; post-processing stays on the CPU).
        modes: which of ``custom.model.precision.PRECISION_MODES`` to time (bf16 on a CPU without native bf16 is slow: leave it out there).
        overrides: train.json keys for the architecture, e.g. ``--width 64``.
    """
    chosen = benchmark_modes(modes, threads)
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle/configs/train.json"))
    parser.update({"network_def#stain_target": None, **overrides})
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here.")
    net = load_attention_weights(parser.get_parsed_content("network_def"), model).eval().to(device)
    stored = dict(getattr(net, "postprocess", {}) or {})
    r = stored.get("r")
    pp = PostprocessParams.from_stored(stored).as_dict()  # the stored set over the defaults (r and tuned_on left out)
    x = _image(size).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    mp = size * size / 1e6
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"model {model}: {type(net).__name__}, {where}, image {size}x{size} ({mp:.2f} MP), "
          f"roi {roi}, sigmoid slope r {r or 'of the network'}, post-processing {pp}")
    print(f"amp_dtype {AUTO_AMP!r} picks {resolve_amp_dtype(device, AUTO_AMP) or 'float32'} on this device")
    print("| precision | TTA | network s/image | network MP/s | + post-processing s/image | + post-processing MP/s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, amp, cl in chosen:
        for tta in (False, True):
            inferer = TiledAttentionInferer(roi_size=roi, tta=tta, amp_dtype=amp, channels_last=cl, r=r)
            inferer(x, net)  # warm-up
            sync()
            t_net, t_all = [], []
            for _ in range(repeats):
                t0 = time.perf_counter()
                a = inferer(x, net)
                sync()
                t1 = time.perf_counter()
                attention_to_instances(a[0].cpu(), **pp)
                t2 = time.perf_counter()
                t_net.append(t1 - t0)
                t_all.append(t2 - t0)
            n, t = min(t_net), min(t_all)
            print(f"| {name} | {'7 views' if tta else 'off'} | {n:.2f} | {mp / n:.3f} | {t:.2f} | {mp / t:.3f} |", flush=True)


if __name__ == "__main__":
    # **overrides would take --help for a train.json key and start the benchmark: show the help instead
    _args = sys.argv[1:]
    fire.Fire(main, command=["--", "--help"] if any(a in ("--help", "-h") for a in _args) else _args)
