"""Training throughput of F + G (forward, three losses, backward, Adam step).

    python scripts/bench/train.py                       # widths 64 and 32, fp32 (with and without channels_last) vs bf16+channels_last
    python scripts/bench/train.py --widths "[16]" --batch_size 32 --iterations 5

Prints images/s and seconds per batch for each width and precision, and which precision the
bundle's ``amp_dtype: "auto"`` picks on this device (bf16 only where it is native). Inputs are
random tensors of the training tile size, so this measures the model alone;
data loading runs in worker processes during training.
"""

from __future__ import annotations

import time

import fire
import torch

from custom.model.losses import ScaleAttentionLoss
from custom.model.precision import AUTO_AMP, PRECISION_MODES, benchmark_modes, resolve_amp_dtype
from custom.model.networks import AttentionNet, ScaleAttentionModel, scale_classifier


def bench(widths=(64, 32), batch_size: int = 32, crop_size: int = 160, iterations: int = 3, warmup: int = 1,
          device: str | None = None, threads: int | None = None, modes=tuple(PRECISION_MODES)) -> None:
    """Time training steps and print one row per (width, mode).

    Args:
        widths: attention network widths to time.
        batch_size: tiles per step.
        crop_size: tile side in pixels.
        iterations: timed steps per setting (after ``warmup`` untimed ones).
        device: "cpu" or "cuda" (default: cuda when present).
        threads: torch CPU threads (default: torch's choice).
        modes: which of ``custom.model.precision.PRECISION_MODES`` to time (bf16 on a CPU without native bf16 is slow: leave it out there).
    """
    chosen = benchmark_modes(modes, threads)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    widths = [widths] if isinstance(widths, int) else list(widths)
    print(f"device={dev} threads={torch.get_num_threads()} batch={batch_size} tile={crop_size}x{crop_size} torch={torch.__version__}")
    print(f"amp_dtype {AUTO_AMP!r} picks {resolve_amp_dtype(dev, AUTO_AMP) or 'float32'} on this device")
    print(f"{'width':>5}  {'mode':<20} {'s/batch':>8} {'images/s':>9}")
    for width in widths:
        for mode, amp, channels_last in chosen:
            torch.manual_seed(0)
            model = ScaleAttentionModel(AttentionNet(width=width), scale_classifier(), amp_dtype=amp, channels_last=channels_last)
            model = model.to(dev).train()
            opt = torch.optim.Adam(model.parameters(), lr=2e-4, weight_decay=1e-4)
            loss_fn = ScaleAttentionLoss()
            x = torch.randn(batch_size, 3, crop_size, crop_size, device=dev)
            y = torch.randint(0, 3, (batch_size,), device=dev)
            times = []
            for i in range(warmup + iterations):
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss_fn(model(x), y)["loss"].backward()
                opt.step()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            sec = sum(times) / len(times)
            print(f"{width:>5}  {mode:<20} {sec:>8.2f} {batch_size / sec:>9.2f}", flush=True)


if __name__ == "__main__":
    fire.Fire(bench)
