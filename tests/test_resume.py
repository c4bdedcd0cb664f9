"""Interruptions and numerics of the training workflow (``bundle/configs/train.json``), end to end.

Every run is ``python -m monai.bundle run training`` in a subprocess on CPU, tiny: F of width 4,
G a narrow ResNet (the ResNet-34 of the bundle makes 255 MB checkpoints and slow steps; what is
tested here, the state around the networks, does not depend on G's size), 48-pixel crops,
batches of 6, 2 iterations per epoch, a 2-image validation set.

- an uninterrupted run and a run killed (SIGKILL, at a fixed iteration) then resumed from its last
  epoch checkpoint end with identical weights, buffers (running tau), optimiser and scheduler
  state, iteration and best validation metric;
- two runs with the same seed have the same losses;
- after a resume, a worse validation does not replace the exported best model;
- a non-finite loss stops the run with an error naming the iteration, and leaves finite
  checkpoints and model.pt; a checkpoint with non-finite values is refused by ``--resume_from``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from custom.training.handlers import non_finite_entries as non_finite
from tests.conftest import REPO, make_prepared_dataset

CONFIG = REPO / "bundle" / "configs" / "train.json"
TINY = ["--iterations_per_epoch", "2", "--batch_size", "6", "--val_crops_per_image", "1", "--width", "4",
        "--crop_size", "48", "--amp_dtype", "$None", "--channels_last", "false"]
# G: a ResNet with one basic block per stage and 8..64 channels (MONAI's ResNet, as the bundle's resnet34)
SMALL_G = {
    "classifier_def": {
        "_target_": "monai.networks.nets.ResNet", "block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64],
        "spatial_dims": 2, "n_input_channels": "@in_channels", "num_classes": "$len(@magnifications)",
        "conv1_t_size": 7, "conv1_t_stride": 2,
    }
}
KILL_AT = 5  # iteration (epoch 3 of 3, after checkpoint_epoch=2.pt) at which a run is killed with SIGKILL
NAN_AT = 3  # iteration (first of epoch 2, after the first validation exported model.pt) whose tile gets NaN pixels


def _override(tmp: Path, name: str, **extra) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({**SMALL_G, **extra}))
    return path


def train(root: Path, dataset: Path, override: Path, *args: str) -> subprocess.CompletedProcess:
    """Run the bundle's training workflow with ``bundle_root=root``; returns the finished process."""
    config = f"['{CONFIG}','{override}']"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config, "--dataset_dir", str(dataset),
           "--bundle_root", str(root), *TINY, *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _log(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]).strip()


def ckpt_dir(root: Path) -> Path:
    return root / "runs" / "train" / "checkpoints"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same(a, b, where: str = "") -> None:
    """Recursive exact equality of checkpoint contents (tensors with torch.equal, same dtype)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def losses(root: Path) -> dict[int, float]:
    """``train/loss`` per iteration from the run's TensorBoard events (float32 values, exact)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(root / "runs" / "train")).Reload()
    return {e.step: e.value for e in acc.Scalars("train/loss")}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("resume") / "data", n_images=4, size=192)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, dataset) -> dict:
    """Three runs of 3 epochs (num_workers 0): ``full`` uninterrupted; ``killed``, SIGKILLed after
    iteration ``KILL_AT``; the same folder resumed from its ``checkpoint_epoch=2.pt``."""
    tmp = tmp_path_factory.mktemp("interrupted")
    plain = _override(tmp, "plain")
    kill = _override(tmp, "kill", training=[
        f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once={KILL_AT}), "
        "lambda e: os.kill(os.getpid(), 9))",
        "$@train#trainer.run()",
    ])
    full, killed = tmp / "full", tmp / "killed"
    out = {"full": full, "killed": killed}
    out["full_proc"] = train(full, dataset, plain, "--epochs", "3", "--num_workers", "0")
    out["killed_proc"] = train(killed, dataset, kill, "--epochs", "3", "--num_workers", "0")
    out["killed_files"] = sorted(p.name for p in ckpt_dir(killed).glob("*.pt"))
    out["killed_losses"] = losses(killed)
    out["killed_epoch2"] = load(ckpt_dir(killed) / "checkpoint_epoch=2.pt") if (ckpt_dir(killed) / "checkpoint_epoch=2.pt").is_file() else None
    out["resumed_proc"] = train(killed, dataset, plain, "--epochs", "3", "--num_workers", "0",
                                "--resume_from", str(ckpt_dir(killed) / "checkpoint_epoch=2.pt"))
    return out


def test_killed_run_resumes_to_the_uninterrupted_result(interrupted):
    full, killed = interrupted["full"], interrupted["killed"]
    assert interrupted["full_proc"].returncode == 0, _log(interrupted["full_proc"])
    assert interrupted["killed_proc"].returncode == -9, _log(interrupted["killed_proc"])  # SIGKILL: no handler ran
    assert "checkpoint_final.pt" not in interrupted["killed_files"] and "checkpoint_epoch=2.pt" in interrupted["killed_files"]
    assert interrupted["resumed_proc"].returncode == 0, _log(interrupted["resumed_proc"])

    a, b = load(ckpt_dir(full) / "checkpoint_final.pt"), load(ckpt_dir(killed) / "checkpoint_final.pt")
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 6
    assert "attention.activation.running_tau" in a["network"]
    assert a["network"]["attention.activation.running_tau"].item() != 0.0
    assert_same(a, b, "checkpoint_final")  # network (weights, BN statistics, running tau), optimiser, scheduler, trainer, evaluators
    # the exported best model and the best-metric checkpoint are the same too
    assert_same(load(full / "models" / "model.pt"), load(killed / "models" / "model.pt"), "model.pt")
    assert_same(load(ckpt_dir(full) / "best_val_attention_dice.pt"), load(ckpt_dir(killed) / "best_val_attention_dice.pt"), "best")


def test_same_seed_same_losses(interrupted):
    """Two independent processes with the same seed: the same losses, bit for bit, and the same epoch-2 checkpoint."""
    first, second = losses(interrupted["full"]), interrupted["killed_losses"]
    assert len(first) == 6 and len(second) >= 3, (first, second)
    for step in sorted(second):
        assert first[step] == second[step], (step, first, second)
    assert interrupted["killed_epoch2"] is not None
    assert_same(load(ckpt_dir(interrupted["full"]) / "checkpoint_epoch=2.pt"), interrupted["killed_epoch2"], "checkpoint_epoch=2")


def test_worse_validation_after_resume_keeps_the_best_model(interrupted, dataset, tmp_path):
    """A resumed run whose validation Dice is 0 (selection threshold above any attention value)
    keeps model.pt and best_val_attention_dice.pt, and the best metric of before the interruption."""
    root = tmp_path / "worse"
    shutil.copytree(interrupted["full"], root)
    model, best = root / "models" / "model.pt", ckpt_dir(root) / "best_val_attention_dice.pt"
    before = {p: sha(p) for p in (model, best)}
    previous = load(ckpt_dir(root) / "checkpoint_final.pt")["evaluators"]["select"]
    assert previous["best_metric"] > 0 and previous["best_metric_epoch"] >= 1
    proc = train(root, dataset, _override(tmp_path, "plain"), "--epochs", "4", "--num_workers", "0", "--selection_threshold", "1.01",
                 "--resume_from", str(ckpt_dir(root) / "checkpoint_final.pt"))
    assert proc.returncode == 0, _log(proc)
    assert "val_attention_dice: 0.0000" in proc.stdout + proc.stderr  # the new validation is worse
    assert {p: sha(p) for p in (model, best)} == before
    after = load(ckpt_dir(root) / "checkpoint_final.pt")
    assert after["trainer"]["iteration"] == 8
    assert after["evaluators"]["select"]["best_metric"] == previous["best_metric"]
    assert after["evaluators"]["select"]["best_metric_epoch"] == previous["best_metric_epoch"]


def test_resume_with_a_worker_process(dataset, tmp_path):
    """num_workers=1: the worker's seed is drawn when the epoch's loader iterator is made, after
    the epoch's reseeding, so a run resumed from its epoch-1 checkpoint ends as the uninterrupted one."""
    plain = _override(tmp_path, "plain")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    no_validation = ("--val_interval", "100")  # the comparison is of training: skip the validations
    proc = train(full, dataset, plain, "--epochs", "2", "--num_workers", "1", *no_validation)
    assert proc.returncode == 0, _log(proc)
    proc = train(resumed, dataset, plain, "--epochs", "2", "--num_workers", "1", *no_validation,
                 "--resume_from", str(ckpt_dir(full) / "checkpoint_epoch=1.pt"))
    assert proc.returncode == 0, _log(proc)
    a, b = load(ckpt_dir(full) / "checkpoint_final.pt"), load(ckpt_dir(resumed) / "checkpoint_final.pt")
    assert b["trainer"]["iteration"] == 4
    assert_same(a, b, "checkpoint_final")


def test_non_finite_loss_stops_and_leaves_finite_files(dataset, tmp_path):
    """NaN pixels in the tile batch of iteration NAN_AT (a corrupt input): the run stops with a
    non-zero exit naming the iteration; checkpoint_final.pt (written on the exception) is the
    finite state before that iteration (BatchNorm statistics and running tau included);
    model.pt is still the epoch-1 export. Resuming from a checkpoint with a NaN weight is refused
    before anything is written."""
    root = tmp_path / "nan"
    corrupt = _override(tmp_path, "corrupt", training=[
        f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED(once={NAN_AT}), "
        "lambda e: e.state.batch['image'][0, :, :4, :4].fill_(float('nan')))",
        "$@train#trainer.run()",
    ])
    proc = train(root, dataset, corrupt, "--epochs", "3", "--num_workers", "0")
    assert proc.returncode != 0
    assert f"non-finite training loss at iteration {NAN_AT}" in proc.stdout + proc.stderr, _log(proc)

    final, epoch1 = load(ckpt_dir(root) / "checkpoint_final.pt"), load(ckpt_dir(root) / "checkpoint_epoch=1.pt")
    assert not non_finite(final["network"], "network") and not non_finite(final["optimizer"], "optimizer")
    assert final["trainer"]["iteration"] == NAN_AT
    assert_same(final["network"], epoch1["network"], "network")  # iteration NAN_AT changed nothing, not even buffers
    model = load(root / "models" / "model.pt")
    assert not non_finite(model, "model.pt")
    assert_same(model, {k[len("attention."):]: v for k, v in epoch1["network"].items() if k.startswith("attention.")}, "model.pt")

    # a checkpoint with a NaN weight: --resume_from refuses it, naming the file and the entry, and writes nothing
    bad = tmp_path / "nan_weight.pt"
    epoch1["network"]["attention.head.weight"].view(-1)[0] = float("nan")
    torch.save(epoch1, bad)
    files = {p.name: sha(p) for p in ckpt_dir(root).glob("*.pt")}
    proc = train(root, dataset, _override(tmp_path, "plain"), "--epochs", "3", "--num_workers", "0", "--resume_from", str(bad))
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert str(bad) in text and "attention.head.weight" in text and "non-finite" in text, _log(proc)
    assert {p.name: sha(p) for p in ckpt_dir(root).glob("*.pt")} == files
