"""custom.command_line: booleans as they arrive from `python -m monai.bundle run ... --key value` (flag), and the
command's errors (the one-line cause last) and bundle_root when run from another folder."""

import os
import subprocess
import sys

import pytest

from custom.command_line import flag
from tests.conftest import REPO, make_prepared_dataset


@pytest.mark.parametrize("value", [True, 1, "true", "True", "TRUE", "yes", "on", "1", " true "])
def test_true_spellings(value):
    assert flag(value, "tta") is True


@pytest.mark.parametrize("value", [False, 0, None, "false", "False", "no", "off", "0", "None", ""])
def test_false_spellings(value):
    assert flag(value, "tta") is False


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, [True]])
def test_anything_else_is_an_error_naming_the_key(value):
    with pytest.raises(ValueError, match="write_overlays must be true or false"):
        flag(value, "write_overlays")


# ---- python -m monai.bundle run: errors end with their one-line cause; running from another folder

TINY = ["--iterations_per_epoch", "1", "--batch_size", "6", "--val_crops_per_image", "1", "--width", "4", "--crop_size", "48",
        "--num_workers", "0", "--epochs", "1", "--val_interval", "100"]


def bundle_run(cwd, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_misspelt_override_ends_with_its_one_line_message(tmp_path):
    """MONAI wraps the check's error in "Failed to evaluate ConfigExpression"; the real message comes last."""
    proc = bundle_run(REPO, "--config_file", "bundle/configs/train.json", "--dataset_dir", str(tmp_path), "--epoch", "3")
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr  # still there, above
    assert last_line(proc.stderr).startswith("ValueError: --epoch: not a key of bundle/configs/train.json"), proc.stderr[-2000:]
    assert "Did you mean --epochs?" in last_line(proc.stderr)


def test_training_from_another_folder(tmp_path):
    """From outside the repository root: the relative default bundle_root is refused with a message naming
    --bundle_root (nothing is written where the command runs); with --bundle_root the run writes there."""
    dataset = make_prepared_dataset(tmp_path / "data", n_images=2, size=192)
    config = str(REPO / "bundle" / "configs" / "train.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = bundle_run(elsewhere, "--config_file", config, "--dataset_dir", str(dataset), *TINY)
    assert proc.returncode == 1
    assert last_line(proc.stderr) == (f"ValueError: bundle_root='bundle' is not a folder of the current folder {elsewhere} (it would hold "
                                      "bundle/runs/train): run from the repository root, or pass --bundle_root /path/to/repo/bundle."), proc.stderr[-2000:]
    assert not list(elsewhere.iterdir())

    proc = bundle_run(elsewhere, "--config_file", config, "--dataset_dir", str(dataset), "--bundle_root", str(tmp_path / "bundle"), *TINY)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (tmp_path / "bundle" / "runs" / "train" / "checkpoints" / "checkpoint_latest.pt").is_file()
    assert not list(elsewhere.iterdir())


def test_check_bundle_root_and_root_cause(tmp_path, monkeypatch):
    from custom.command_line import check_bundle_root, root_cause

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="--bundle_root /path/to/repo/bundle"):
        check_bundle_root("bundle", "bundle/runs/train", "bundle/runs/train/model.pt")
    check_bundle_root("bundle", "/elsewhere/runs/train")  # nothing would be written inside it: --output_dir was given
    check_bundle_root(str(tmp_path / "bundle"), str(tmp_path / "bundle" / "runs" / "train"))  # absolute: created as needed
    (tmp_path / "bundle").mkdir()
    check_bundle_root("bundle", "bundle/runs/train")

    try:
        try:
            raise ValueError("--epoch: not a key")
        except ValueError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression") from e
    except RuntimeError as wrapped:
        assert str(root_cause(wrapped)) == "--epoch: not a key"


def test_hmaxima_override_restores_the_tuned_markers_and_keeps_the_stored_rest():
    """The shipped model stores markers without the h-maxima step (0.15.0, for speed: docs/speed.md);
    inference_hmaxima.json puts back the set tuned in 0.11.0 (h-maxima markers 0.5 px deep, distance blur 1,
    footprint 5), in inference and evaluation alike; every other post-processing value is the model's."""
    from monai.bundle import ConfigParser

    configs = REPO / "bundle" / "configs"
    for files, key in ((["inference.json"], ""), (["train.json", "evaluate.json"], "eval#")):
        parser = ConfigParser()
        parser.read_config([str(configs / f) for f in (*files, "inference_hmaxima.json")])
        parser.update({"bundle_root": str(REPO / "bundle"), "device": "cpu"})
        params, stored = parser.get_parsed_content(f"{key}postprocess_params"), parser.get_parsed_content(f"{key}tuned")
        assert (stored["marker_h"], stored["sigma"], stored["footprint_radius"]) == (0.0, 2.5, 6)
        assert (params["marker_h"], params["sigma"], params["footprint_radius"]) == (0.5, 1.0, 5)
        assert all(params[k] == stored[k] for k in ("threshold", "min_size", "local_block_size", "fill_holes", "attention_sigma"))
