"""Interruptions and numerics of the training workflow (``bundle/configs/train.json``), end to end.

Every run is ``python -m monai.bundle run training`` in a subprocess on CPU, tiny: F of width 4,
G a narrow ResNet (the ResNet-34 of the bundle makes 255 MB checkpoints and slow steps; what is
tested here, the state around the networks, does not depend on G's size), 48-pixel crops,
batches of 6, 2 iterations per epoch, a 2-image validation set.

- the run keeps one resumable checkpoint, ``runs/train/checkpoints/checkpoint_latest.pt``, written every
  ``checkpoint_interval`` iterations and at the end of each epoch;
- an uninterrupted run and a run killed (SIGKILL, at a fixed iteration) then resumed from that
  checkpoint end with identical weights, buffers (running tau), optimiser and scheduler
  state, iteration and best validation metric;
- Ctrl-C in the middle of an epoch (the default recipe is one epoch), then ``--resume_from`` that
  checkpoint: the iterations after it have the uninterrupted run's losses, bit for bit, with a data
  loader worker process;
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
import signal
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
KILL_AT = 5  # iteration (epoch 3 of 3, after the end-of-epoch-2 checkpoint) at which a run is killed with SIGKILL
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
    # SIGINT as in a terminal, where Ctrl-C raises KeyboardInterrupt: a background job (as CI may run) inherits it ignored
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _log(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout[-4000:] + "\n" + proc.stderr[-4000:]).strip()


def run_dir(root: Path) -> Path:
    return root / "runs" / "train"


def ckpt_dir(root: Path) -> Path:
    return run_dir(root) / "checkpoints"


def latest(root: Path) -> Path:
    return ckpt_dir(root) / "checkpoint_latest.pt"


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
    """Three runs of 3 epochs of 2 iterations (num_workers 0): ``full`` uninterrupted; ``killed``, SIGKILLed
    after iteration ``KILL_AT``; the same folder resumed from its ``checkpoint_latest.pt`` (the end of epoch 2)."""
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
    out["killed_latest"] = load(latest(killed)) if latest(killed).is_file() else None
    out["resumed_proc"] = train(killed, dataset, plain, "--epochs", "3", "--num_workers", "0", "--resume_from", str(latest(killed)))
    return out


def test_killed_run_resumes_to_the_uninterrupted_result(interrupted):
    full, killed = interrupted["full"], interrupted["killed"]
    assert interrupted["full_proc"].returncode == 0, _log(interrupted["full_proc"])
    assert interrupted["killed_proc"].returncode == -9, _log(interrupted["killed_proc"])  # SIGKILL: no handler ran
    assert interrupted["killed_files"] == ["checkpoint_latest.pt"]  # one resumable checkpoint, at the end of epoch 2
    assert interrupted["killed_latest"]["trainer"]["iteration"] == 4
    assert interrupted["resumed_proc"].returncode == 0, _log(interrupted["resumed_proc"])

    a, b = load(latest(full)), load(latest(killed))
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] == 6
    assert "attention.activation.running_tau" in a["network"]
    assert a["network"]["attention.activation.running_tau"].item() != 0.0
    # network (weights, BN statistics, running tau), optimiser, scheduler, trainer, evaluators, random state
    assert_same(a, b, "checkpoint_latest")
    assert_same(load(run_dir(full) / "model.pt"), load(run_dir(killed) / "model.pt"), "model.pt")  # the exported best model
    assert sorted(p.name for p in ckpt_dir(full).iterdir()) == ["checkpoint_latest.pt"]


def test_same_seed_same_losses(interrupted):
    """Two independent processes with the same seed: the same losses, bit for bit."""
    first, second = losses(interrupted["full"]), interrupted["killed_losses"]
    assert len(first) == 6 and len(second) >= 3, (first, second)
    for step in sorted(second):
        assert first[step] == second[step], (step, first, second)


CTRL_C_AT = 5  # Ctrl-C (SIGINT) at the start of iteration 5 of the one epoch of 6, after the checkpoint of iteration 4
MID_EPOCH = ("--epochs", "1", "--iterations_per_epoch", "6", "--checkpoint_interval", "2", "--num_workers", "1")


def test_ctrl_c_in_the_middle_of_the_epoch_resumes_exactly(dataset, tmp_path):
    """The default recipe's shape (one epoch, a data loader worker), small: Ctrl-C during iteration 5,
    then the documented command, ``--resume_from runs/train/checkpoints/checkpoint_latest.pt``: iterations
    5 and 6 have the uninterrupted run's losses bit for bit (the same tiles, augmentations and equivariance
    draws), and the run ends with the uninterrupted run's checkpoint and model."""
    plain = _override(tmp_path, "plain")
    ctrl_c = _override(tmp_path, "ctrl_c", training=[
        f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED(once={CTRL_C_AT}), "
        "lambda e: os.kill(os.getpid(), 2))",  # SIGINT, as Ctrl-C in a terminal
        "$@train#trainer.run()",
    ])
    full, run = tmp_path / "full", tmp_path / "run"
    proc = train(full, dataset, plain, *MID_EPOCH)
    assert proc.returncode == 0, _log(proc)

    stopped = train(run, dataset, ctrl_c, *MID_EPOCH)
    assert stopped.returncode != 0, _log(stopped)
    assert stopped.stderr.strip().splitlines()[-1] == "KeyboardInterrupt", _log(stopped)
    assert f"holds iteration 4: go on from there with --resume_from {latest(run)}" in stopped.stdout + stopped.stderr, _log(stopped)
    assert load(latest(run))["trainer"]["iteration"] == 4 and not (run_dir(run) / "model.pt").exists()

    resumed = train(run, dataset, plain, *MID_EPOCH, "--resume_from", str(latest(run)))
    assert resumed.returncode == 0, _log(resumed)
    assert "loading its first 4 batches again" in resumed.stdout + resumed.stderr
    expected, got = losses(full), losses(run)  # steps 1-4 from the stopped run, 5-6 from the resumed one
    assert sorted(expected) == sorted(got) == list(range(1, 7)) and got == expected, (expected, got)
    assert_same(load(latest(full)), load(latest(run)), "checkpoint_latest")
    assert_same(load(run_dir(full) / "model.pt"), load(run_dir(run) / "model.pt"), "model.pt")


def test_worse_validation_after_resume_keeps_the_best_model(interrupted, dataset, tmp_path):
    """A resumed run whose validation Dice is 0 (selection threshold above any attention value)
    keeps model.pt, and the best metric of before the interruption."""
    root = tmp_path / "worse"
    shutil.copytree(interrupted["full"], root)
    model = run_dir(root) / "model.pt"
    before = sha(model)
    previous = load(latest(root))["evaluators"]["select"]
    assert previous["best_metric"] > 0 and previous["best_metric_epoch"] >= 1
    proc = train(root, dataset, _override(tmp_path, "plain"), "--epochs", "4", "--num_workers", "0", "--selection_threshold", "1.01",
                 "--resume_from", str(latest(root)))
    assert proc.returncode == 0, _log(proc)
    assert "val_attention_dice: 0.0000" in proc.stdout + proc.stderr  # the new validation is worse
    assert sha(model) == before
    after = load(latest(root))
    assert after["trainer"]["iteration"] == 8
    assert after["evaluators"]["select"]["best_metric"] == previous["best_metric"]
    assert after["evaluators"]["select"]["best_metric_epoch"] == previous["best_metric_epoch"]


def test_resume_with_a_worker_process(dataset, tmp_path):
    """num_workers=1: the worker's seed is drawn when the epoch's loader iterator is made, after
    the epoch's reseeding, so a 1-epoch run resumed with --epochs 2 ends as a 2-epoch run."""
    plain = _override(tmp_path, "plain")
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    no_validation = ("--val_interval", "100")  # the comparison is of training: skip the validations
    proc = train(full, dataset, plain, "--epochs", "2", "--num_workers", "1", *no_validation)
    assert proc.returncode == 0, _log(proc)
    proc = train(resumed, dataset, plain, "--epochs", "1", "--num_workers", "1", *no_validation)
    assert proc.returncode == 0, _log(proc)
    proc = train(resumed, dataset, plain, "--epochs", "2", "--num_workers", "1", *no_validation, "--resume_from", str(latest(resumed)))
    assert proc.returncode == 0, _log(proc)
    a, b = load(latest(full)), load(latest(resumed))
    assert b["trainer"]["iteration"] == 4
    assert_same(a, b, "checkpoint_latest")


def test_non_finite_loss_stops_and_leaves_finite_files(dataset, tmp_path):
    """NaN pixels in the tile batch of iteration NAN_AT (a corrupt input): the run stops with a
    non-zero exit naming the iteration; checkpoint_latest.pt is still the finite end of epoch 1
    (nothing is written on the exception) and model.pt the epoch-1 export. Resuming from a
    checkpoint with a NaN weight is refused before anything is written."""
    root = tmp_path / "nan"
    corrupt = _override(tmp_path, "corrupt", training=[
        f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_STARTED(once={NAN_AT}), "
        "lambda e: e.state.batch['image'][0, :, :4, :4].fill_(float('nan')))",
        "$@train#trainer.run()",
    ])
    proc = train(root, dataset, corrupt, "--epochs", "3", "--num_workers", "0")
    assert proc.returncode != 0
    assert f"non-finite training loss at iteration {NAN_AT}" in proc.stdout + proc.stderr, _log(proc)
    assert proc.stderr.strip().splitlines()[-1].startswith(f"NonFiniteTrainingError: non-finite training loss at iteration {NAN_AT}")

    epoch1 = load(latest(root))
    assert not non_finite(epoch1["network"], "network") and not non_finite(epoch1["optimizer"], "optimizer")
    assert epoch1["trainer"]["iteration"] == NAN_AT - 1
    model = load(run_dir(root) / "model.pt")
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
