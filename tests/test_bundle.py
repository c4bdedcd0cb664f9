"""End-to-end: the bundle's training workflow for a couple of iterations, as a user runs it."""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from custom.model.networks import AttentionNet
from tests.conftest import REPO, make_prepared_dataset, require_monuseg

CONFIGS = REPO / "bundle" / "configs"
TINY = ["--epochs", "2", "--iterations_per_epoch", "2", "--batch_size", "6", "--val_crops_per_image", "1", "--width", "4",
        "--crop_size", "48", "--num_workers", "0"]


def run_training(tmp_path: Path, dataset: Path, *extra: str, config_files=("train.json",)) -> subprocess.CompletedProcess:
    files = [str(CONFIGS / f) for f in config_files]
    config = files[0] if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config,
           "--dataset_dir", str(dataset), "--bundle_root", str(tmp_path / "bundle"), *TINY, *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


SHIPPED = REPO / "bundle" / "models" / "model.pt"


def test_training_writes_its_run_folder_and_leaves_the_shipped_model(tmp_path):
    """The README's training command, small, in a bundle folder holding a copy of the shipped model: that
    file stays byte-identical; the run writes runs/train/{model.pt, checkpoints/checkpoint_latest.pt, events}."""
    dataset = make_prepared_dataset(tmp_path / "data", n_images=4, size=192)
    shipped = tmp_path / "bundle" / "models" / "model.pt"
    shipped.parent.mkdir(parents=True)
    shutil.copy(SHIPPED, shipped)
    before = hashlib.sha256(shipped.read_bytes()).hexdigest()
    proc = run_training(tmp_path, dataset)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["model.pt"]
    out = tmp_path / "bundle" / "runs" / "train"
    assert list(out.glob("events.out.tfevents.*"))
    # one resumable checkpoint (F + G + optimiser + scheduler + trainer + random state), the end of the run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_latest.pt"]
    ckpt = torch.load(out / "checkpoints" / "checkpoint_latest.pt", map_location="cpu", weights_only=True)
    assert {"network", "optimizer", "lr_scheduler", "trainer", "evaluators", "epoch_seed"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] == 4 and ckpt["trainer"]["epoch_length"] == 2
    state = torch.load(out / "model.pt", map_location="cpu", weights_only=True)
    net = AttentionNet(width=4)
    net.load_state_dict(state)  # F only: loads into the bare attention network
    # the export is the best epoch by validation Dice: the state after epoch 1 (2 steps) or 2 (4 steps)
    assert net.activation.num_batches_tracked.item() in (2, 4) and torch.isfinite(net.activation.running_tau)
    assert not any(k.startswith("classifier") for k in state)
    # TensorBoard received every loss term, accuracy, tau and attention images
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out)).Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_scale", "train/loss_smooth", "train/loss_equiv", "train/accuracy", "train/tau",
            "val_scale_accuracy", "val_attention_dice"} <= scalars
    assert {"val_attention/image", "val_attention/attention", "val_attention/attended"} <= set(acc.Tags()["images"])
    # training shows progress bars (training, both validations) on stderr
    assert "training [2/2]: [2/2] 100%" in proc.stderr, proc.stderr[-3000:]
    assert "validation: attention Dice (images) [2/2]" in proc.stderr and "validation: scale accuracy (tiles) [2/2]" in proc.stderr
    # resuming from these checkpoints: tests/test_resume.py


@pytest.mark.parametrize("extra", [(), ("train_wsi.json",), ("multi_gpu_train.json",)]
                         + [(f"ablations/{p.name}",) for p in sorted((CONFIGS / "ablations").glob("*.json"))])
def test_training_configs_export_into_their_run_folder(extra):
    """No training config writes the shipped bundle/models/model.pt: the model goes to the run's output_dir."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), *(str(CONFIGS / e) for e in extra)])
    parser["bundle_root"] = "/b"
    output_dir, model_path = parser.get_parsed_content("output_dir"), parser.get_parsed_content("model_path")
    assert output_dir.startswith("/b/runs/") and model_path == output_dir + "/model.pt"
    assert parser.get_parsed_content("ckpt_dir").startswith(output_dir)


@pytest.mark.parametrize(
    "ablation, check",
    [
        ("minus_smooth", lambda p: p.get_parsed_content("loss").smooth_weight == 0.0),
        ("minus_equiv", lambda p: p.get_parsed_content("loss").equiv_weight == 0.0 and not p.get_parsed_content("model_def").equivariance),
        ("minus_sparse", lambda p: not p.get_parsed_content("network_def").activation.sparse),
        ("minus_stain_prior", lambda p: p.get_parsed_content("network_def").stain_prior == "none"),
        ("paper_settings", lambda p: p.get_parsed_content("network_def").activation.eta == 7.0
         and p.get_parsed_content("network_def").stain_prior == "none"),
        ("plain_reinhard", lambda p: p.get_parsed_content("network_def").stain_settings == {"brightness_percentile": 90, "max_std_ratio": None}),
        # the two previous shipped models' budgets: 5 epochs of 100 iterations, against the recipe's one of 60
        ("iterations_500", lambda p: (p["epochs"], p["iterations_per_epoch"]) == (5, 100)),
        ("prior_gain2", lambda p: p.get_parsed_content("network_def").stain_prior_gain == 2.0
         and (p["epochs"], p["iterations_per_epoch"]) == (5, 100)),
        # no learning: Adam at learning rate 0 and no weight decay leaves F at its initialisation
        ("no_learning", lambda p: all(g["lr"] == 0.0 and g["weight_decay"] == 0.0 for g in p.get_parsed_content("optimizer").param_groups)),
    ],
)
def test_ablation_overrides(ablation, check):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "ablations" / f"{ablation}.json")])
    parser["network_def#stain_target"] = None  # the stain target is computed from the training images: none here
    assert check(parser)
    assert ablation in parser.get_parsed_content("output_dir")


def test_default_stain_normalisation_is_contrast_capped():
    """The shipped recipe: no brightness standardisation, each LAB channel's contrast change within [1/1.5, 1.5]."""
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser["network_def#stain_target"] = None
    assert parser.get_parsed_content("network_def").stain_settings == {"brightness_percentile": None, "max_std_ratio": 1.5}
    parser["stain_target"] = [[70.0, 20.0, -15.0], [12.0, 8.0, 6.0]]
    normalise = parser.get_parsed_content("stain_normalisation").transform
    assert normalise.brightness_percentile is None and normalise.max_std_ratio == 1.5


def test_ablation_trains(tmp_path):
    dataset = make_prepared_dataset(tmp_path / "data", n_images=2, size=192)
    proc = run_training(tmp_path, dataset, "--epochs", "1", config_files=("train.json", "ablations/minus_sparse.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "bundle" / "runs" / "minus_sparse" / "model.pt").is_file()


def test_missing_dataset_stops_with_clear_message(tmp_path):
    proc = run_training(tmp_path, tmp_path / "nothing-here", "--download", "false")
    assert proc.returncode != 0
    assert "--dataset_dir" in proc.stdout + proc.stderr
    assert not (tmp_path / "bundle" / "runs" / "train" / "model.pt").exists()


def test_training_on_real_monuseg(tmp_path):
    root = require_monuseg()
    proc = run_training(tmp_path, root, "--epochs", "1", "--val_split", "val")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "bundle" / "runs" / "train" / "model.pt").is_file()


def test_training_from_whole_slides(tmp_path, pyramid_slide):
    """train_wsi.json (M_proposed): tiles from a pyramidal slide at 10x/20x/40x, tile index cached."""
    pytest.importorskip("cucim")
    dataset = make_prepared_dataset(tmp_path / "data", n_images=4, size=192)
    proc = run_training(tmp_path, dataset, "--slides", str(pyramid_slide), "--tile_size", "96", "--epochs", "1",
                        config_files=("train.json", "train_wsi.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "bundle" / "runs" / "train"
    assert len(list(out.glob("tile_index_*.npz"))) == 1
    assert (out / "checkpoints" / "checkpoint_latest.pt").is_file()
    assert (out / "model.pt").is_file()
