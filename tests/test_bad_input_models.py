"""Bad input, family "models and configs": checkpoints that are missing, corrupt, of
another architecture or width, or hold NaN; settings out of range; misspelt keys.

Every case is a row of a table: the workflow (inference ``inference.json`` on one small
image, or training ``train.json`` on a small generated dataset), the overrides that make
it wrong, and the words its error must contain. The workflow must fail before it writes
anything that looks like a result. One command-line run per workflow checks the exit status.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigWorkflow
from monai.networks.nets import UNet

from custom.command_line import check_overrides
from custom.model.networks import AttentionNet
from custom.model.checkpoint import save_attention_network
from tests.conftest import REPO, error_messages, make_prepared_dataset

CONFIGS = REPO / "bundle" / "configs"
MODEL = REPO / "bundle" / "models" / "model.pt"


def _model_file(kind: str, folder: Path) -> Path:
    """A model file of the given kind in ``folder``."""
    path = folder / f"{kind}.pt"
    if kind == "missing":
        return path
    if kind == "corrupt":
        path.write_bytes(bytes(range(256)) * 64)
    elif kind == "truncated":
        data = MODEL.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        path.write_text("weights will be uploaded later\n")
    elif kind == "unrecorded_architecture":  # exported before 0.14.0: no architecture record, so the config's network is used
        save_attention_network(AttentionNet(width=8, stain_prior="logit"), path)
        state = torch.load(path, weights_only=False)
        del state["_extra_state"]["architecture"]
        torch.save(state, path)
    elif kind == "other_architecture":
        net = UNet(spatial_dims=2, in_channels=3, out_channels=1, channels=(4, 8), strides=(2,))
        torch.save(net.state_dict(), path)
    elif kind == "nan":
        state = torch.load(MODEL, weights_only=True)
        state["unet.final_conv.bias"] = torch.full_like(state["unet.final_conv.bias"], float("nan"))
        torch.save(state, path)
    else:
        raise KeyError(kind)
    return path


MODEL_CASES = {
    "missing": "missing.pt: no such file",
    "corrupt": "corrupt.pt: not a readable PyTorch checkpoint",
    "truncated": "truncated.pt: not a readable PyTorch checkpoint",
    "text": "text.pt: not a readable PyTorch checkpoint",
    "unrecorded_architecture": "unrecorded_architecture.pt: does not fit this attention network ({'_target_': 'custom.model.networks.CompactAttentionNet'",
    "other_architecture": "other_architecture.pt: does not fit this attention network",
    "nan": "nan.pt: NaN or infinite values in ['unet.final_conv.bias']",
}

# (workflow, overrides, words the error must contain)
SETTING_CASES = {
    "eta_zero": ("train", {"eta": 0.0}, "eta (percentage of attended pixels) must be in (0, 100), got 0.0"),
    "eta_100": ("train", {"eta": 100.0}, "must be in (0, 100), got 100.0"),
    "r_zero": ("train", {"r": 0.0}, "r (sigmoid compression) must be > 0, got 0.0"),
    "r_negative": ("train", {"r": -5.0}, "must be > 0, got -5.0"),
    "width_zero": ("train", {"width": 0}, "width must be >= 1, got width=0"),
    "batch_size_zero": ("train", {"batch_size": 0}, "needs positive num_images, num_magnifications, batch_size"),
    "unknown_magnification": ("train", {"magnifications": [10, 20, 80]}, "magnifications [80] cannot be made from base magnification 40x"),
    "crop_larger_than_image": ("train", {"crop_size": 512}, "smaller than crop_size 512"),
    "amp_dtype": ("train", {"amp_dtype": "float8"}, "amp_dtype must be 'auto', one of"),
    "stain_prior": ("train", {"stain_prior": "eosin"}, "stain_prior must be one of"),
    "flag_not_boolean": ("infer", {"overwrite": "maybe"}, "overwrite must be true or false, got 'maybe'"),
    "infer_magnification_zero": ("infer", {"magnification": 0}, "magnification must be > 0, got 0"),
    "infer_window_zero": ("infer", {"window": 0}, "window must be >= 16 pixels, got 0"),
    "infer_halo_negative": ("infer", {"halo": -8}, "halo must be >= 0 pixels, got -8"),
    "infer_backend": ("infer", {"backend": "pillow"}, "backend must be 'cucim' or 'openslide', got 'pillow'"),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_prepared_dataset(tmp_path_factory.mktemp("data"), n_images=4, size=256)


def _infer(dataset: Path, out: Path, **overrides) -> ConfigWorkflow:
    image = dataset / "images" / "synthetic-0.png"
    return ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type="infer", input=str(image),
                          output_dir=str(out), base_magnification=40, use_tissue_mask=False, tta=False, progress=False,
                          **overrides)


def _train(dataset: Path, out: Path, **overrides) -> ConfigWorkflow:
    settings = dict(dataset_dir=str(dataset), download=False, output_dir=str(out), model_path=str(out / "model.pt"),
                    width=4, crop_size=64, batch_size=6, epochs=1, iterations_per_epoch=1, num_workers=0)
    return ConfigWorkflow(config_file=str(CONFIGS / "train.json"), workflow_type="train", **{**settings, **overrides})


def _fails(workflow: ConfigWorkflow) -> str:
    with pytest.raises(Exception) as info:
        workflow.initialize()
        workflow.run()
    return error_messages(info.value)


@pytest.mark.parametrize("kind", list(MODEL_CASES), ids=list(MODEL_CASES))
def test_bad_model_file_is_refused(kind, dataset, tmp_path):
    path = _model_file(kind, tmp_path)
    out = tmp_path / "out"
    message = _fails(_infer(dataset, out, model_path=str(path)))
    assert MODEL_CASES[kind] in message, message
    assert not out.exists() or not list(out.iterdir())  # nothing written


@pytest.mark.parametrize("case", list(SETTING_CASES), ids=list(SETTING_CASES))
def test_out_of_range_setting_is_refused(case, dataset, tmp_path):
    kind, overrides, expected = SETTING_CASES[case]
    out = tmp_path / "out"
    workflow = (_train if kind == "train" else _infer)(dataset, out, **overrides)
    message = _fails(workflow)
    assert expected in message, message
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.json"))


TYPO_CASES = {
    "train_epoch": (["--config_file", "bundle/configs/train.json", "--epoch", "3"], "--epoch: not a key", "--epochs"),
    "train_nested": (["--config_file", "bundle/configs/train.json", "--train#trainer#max_epoch", "3"], "--train#trainer#max_epoch",
                     "--train#trainer#max_epochs"),
    "wsi_override_file": (["--config_file", "['bundle/configs/train.json','bundle/configs/train_wsi.json']", "--tile_coverge", "0.5"],
                          "--tile_coverge", "--tile_coverage"),
    "inference_window": (["--config_file", "bundle/configs/inference.json", "--windw", "512"], "--windw", "--window"),
}


@pytest.mark.parametrize("case", list(TYPO_CASES), ids=list(TYPO_CASES))
def test_misspelt_override_is_refused(case):
    args, named, suggestion = TYPO_CASES[case]
    with pytest.raises(ValueError) as info:
        check_overrides(["run", "training", *args])
    assert named in str(info.value) and f"Did you mean {suggestion}?" in str(info.value)


@pytest.mark.parametrize("args", [["--brightness_percentile", "None"], ["--amp_dtype=None"], ["--eval_split", " None"]],
                         ids=["space", "equals", "padded"])
def test_none_override_is_refused_with_the_spelling_that_works(args):
    """monai.bundle run drops overrides whose value is None: the key would silently keep its config value."""
    with pytest.raises(ValueError) as info:
        check_overrides(["run", "training", "--config_file", "['bundle/configs/train.json','bundle/configs/evaluate.json']", *args])
    key = args[0][2:].partition("=")[0]
    assert f"--{key} None: monai.bundle run drops" in str(info.value) and f"--{key} '$None'" in str(info.value)


def test_dollar_none_passes_and_sets_none():
    from monai.bundle import ConfigParser
    from monai.bundle.scripts import _update_args

    check_overrides(["run", "training", "--config_file", "bundle/configs/train.json", "--brightness_percentile", "$None"])
    parser = ConfigParser(_update_args(args={"brightness_percentile": 90}, brightness_percentile="$None"))
    assert parser.get_parsed_content("brightness_percentile") is None


def test_known_overrides_pass():
    check_overrides(["run", "training", "--config_file", "bundle/configs/train.json", "--epochs", "2", "--train#trainer#max_epochs",
                     "2", "--train#checkpoint_loader#_disabled_", "true", "--meta_file", "bundle/configs/metadata.json"])


def test_command_line_exit_status(dataset, tmp_path):
    """From the command line: a misspelt key in training, a corrupt model in segment.py."""
    out = tmp_path / "run"
    train = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", "bundle/configs/train.json",
             "--dataset_dir", str(dataset), "--download", "False", "--output_dir", str(out), "--epoch", "1"]
    proc = subprocess.run(train, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "--epoch: not a key of bundle/configs/train.json" in proc.stderr
    assert "Did you mean --epochs?" in proc.stderr and not out.exists()

    bad = _model_file("truncated", tmp_path)
    seg_out = tmp_path / "seg"
    segment = [sys.executable, "scripts/segment.py", str(dataset / "images" / "synthetic-0.png"), "--out", str(seg_out),
               "--model", str(bad), "--base_magnification", "40", "--tta", "False"]
    proc = subprocess.run(segment, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "truncated.pt: not a readable PyTorch checkpoint" in proc.stderr
    assert not seg_out.exists() or not list(seg_out.iterdir())
