"""Validation scale accuracy and attended fraction of a training checkpoint, with
its running tau or another tau (to see how far the running tau lags the batch tau).

    python scripts/research/val_scale_accuracy.py bundle/runs/train30/checkpoints/checkpoint_latest.pt \\
        --dataset_dir ../shared/data/monuseg --run_dir bundle/runs/train30

Prints one line for the running tau and, with ``--run_dir``, one for the last
training batch's tau read from the run's TensorBoard events (``train/tau``);
``--tau X`` adds a line for any value. Config overrides (e.g. ``--width 64``)
must match the run's.
"""

from __future__ import annotations

from pathlib import Path

import fire
import torch

REPO = Path(__file__).resolve().parents[2]


def main(checkpoint: str, dataset_dir: str, run_dir: str | None = None, tau: float | None = None,
         config_file: str = str(REPO / "bundle/configs/train.json"), width: int | None = None) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(config_file)
    parser["data_root"] = dataset_dir
    if width is not None:
        parser["width"] = int(width)
    model = parser.get_parsed_content("model_def")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    if not isinstance(state, dict) or "network" not in state:
        raise SystemExit(f"{checkpoint}: not a training checkpoint (no 'network' entry).")
    model.load_state_dict(state["network"])
    model.eval()
    loader = parser.get_parsed_content("validate#dataloader")
    act = model.attention.activation
    taus = [("running tau", act.running_tau.item())]
    if run_dir:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(run_dir, size_guidance={"scalars": 0}).Reload()
        taus.append(("last training batch tau", events.Scalars("train/tau")[-1].value))
    if tau is not None:
        taus.append(("given tau", float(tau)))
    for name, value in taus:
        act.running_tau.fill_(value)
        correct = total = 0
        attended = 0.0
        with torch.no_grad():
            for batch in loader:
                out = model(batch["image"])
                correct += (out["scale_logits"].argmax(1) == batch["label"]).sum().item()
                total += len(batch["label"])
                attended += (out["attention"] > 0.5).float().mean().item() * len(batch["label"])
        print(f"{name} {value:.3f}: validation scale accuracy {correct / total:.3f} on {total} tiles, "
              f"attended {100 * attended / total:.1f} % of pixels")


if __name__ == "__main__":
    fire.Fire(main)
