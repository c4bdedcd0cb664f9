"""The MONAI model zoo's checks on this bundle: metadata against the specification's
required fields, network input/output, TorchScript export (same output as eager),
``ConfigWorkflow.check_properties`` for training and inference, file sizes and layout.

The official schema (``meta_schema_20240725.json``) cannot be downloaded here, so
``tests/metadata_schema.json`` holds the fields the MONAI Bundle Specification marks
required; ``verify_metadata`` finds it at ``--filepath`` and skips the download.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow, verify_metadata, verify_net_in_out

from tests.conftest import REPO, make_prepared_dataset

BUNDLE = REPO / "bundle"
CONFIGS = BUNDLE / "configs"
META = CONFIGS / "metadata.json"
SCHEMA = REPO / "tests" / "metadata_schema.json"
ZOO_MAX_BYTES = 25 * 1024 * 1024


def test_bundle_layout_follows_the_zoo():
    for rel in ("LICENSE", "configs/metadata.json", "configs/train.json", "configs/inference.json", "configs/evaluate.json",
                "configs/multi_gpu_train.json", "configs/logging.conf", "models/model.pt", "docs/README.md"):
        assert (BUNDLE / rel).is_file(), f"bundle/{rel} is missing"


def test_verify_metadata_against_the_required_fields():
    verify_metadata(meta_file=str(META), filepath=str(SCHEMA))


def test_the_schema_rejects_incomplete_metadata(tmp_path):
    meta = json.loads(META.read_text())
    for key, bad in (("version", None), ("network_data_format", None), ("changelog", {"not-semver": "x"})):
        broken = dict(meta)
        if bad is None:
            broken.pop(key)
        else:
            broken[key] = bad
        path = tmp_path / f"meta_{key}.json"
        path.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=key if bad is None else "does not match"):
            verify_metadata(meta_file=str(path), filepath=str(SCHEMA))


def test_metadata_versions_and_metrics_match_what_is_shipped():
    import monai

    meta = json.loads(META.read_text())
    assert meta["version"] in meta["changelog"]
    assert meta["monai_version"] == monai.__version__
    assert meta["pytorch_version"] == torch.__version__.split("+")[0]
    assert meta["numpy_version"] == np.__version__
    pinned = {line.split("==")[0]: line.split("==")[1] for line in (REPO / "requirements.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    for name in ("monai", "torch"):
        assert meta[f"{'pytorch' if name == 'torch' else name}_version"] == pinned[name]
    # eval_metrics are the evaluator's summary of the shipped model, not typed
    summary = REPO / "results" / "model" / "summary.json"
    s = json.loads(summary.read_text())
    expected = {"aji": s["aji"], "dice": s["dice"], "ahd_px": s["ahd"], "pq": s["pq"]}
    for key, value in expected.items():
        assert meta["eval_metrics"][key] == pytest.approx(value, abs=5e-3), key
    outputs = meta["network_data_format"]["outputs"]["pred"]
    assert outputs["num_channels"] == 1 and outputs["channel_def"] == {"0": "background", "1": "nuclei"}


def test_verify_net_in_out():
    verify_net_in_out(net_id="network_def", meta_file=str(META), config_file=str(CONFIGS / "inference.json"), n=8, device="cpu")


def test_ckpt_export_torchscript_matches_eager(tmp_path):
    """``monai.bundle ckpt_export`` (traced: the student's forward in evaluation mode has no
    data-dependent control flow for sizes that are multiples of 64, metadata's ``64*n``) gives the eager
    network's output on an input of another such size."""
    ts_path = tmp_path / "model.ts"
    cmd = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts_path),
           "--meta_file", str(META), "--config_file", str(CONFIGS / "inference.json"),
           "--ckpt_file", str(BUNDLE / "models" / "model.pt"), "--use_trace", "True", "--input_shape", "[1, 3, 64, 64]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    extra = {"metadata.json": "", "inference.json": ""}
    ts = torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["version"] == json.loads(META.read_text())["version"]
    assert "network_def" in json.loads(extra["inference.json"])

    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "inference.json"))
    from custom.model.checkpoint import load_attention_weights

    eager = load_attention_weights(parser.get_parsed_content("network_def"), str(BUNDLE / "models" / "model.pt")).eval()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 64)
    with torch.no_grad():
        expected, got = eager(x), ts(x)
    assert got.shape == (2, 1, 128, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert float(expected.std()) > 0  # a real map, not a constant


def test_check_properties_train_and_inference(tmp_path):
    dataset = make_prepared_dataset(tmp_path / "data", n_images=4, size=256)
    train = ConfigWorkflow(config_file=str(CONFIGS / "train.json"), meta_file=str(META), workflow_type="train",
                           dataset_dir=str(dataset), download=False, output_dir=str(tmp_path / "run"),
                           model_path=str(tmp_path / "run" / "model.pt"), width=4, crop_size=64, num_workers=0)
    train.initialize()
    assert train.check_properties() == []
    assert train.max_epochs == 1 and train.network_def.width == 4  # the recipe: one epoch (of 60 iterations)

    infer = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), meta_file=str(META), workflow_type="infer",
                           input=str(dataset / "images"), output_dir=str(tmp_path / "out"), base_magnification=40,
                           use_tissue_mask=False)
    infer.initialize()
    assert infer.check_properties() == []
    assert len(infer.dataset) > 0


def test_every_file_is_under_the_zoo_size_limit():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    sizes = {p: (REPO / p).stat().st_size for p in tracked.split("\0") if p and (REPO / p).is_file()}
    big = {p: s for p, s in sizes.items() if s > ZOO_MAX_BYTES}
    listed = (BUNDLE / "large_files.yml").read_text() if (BUNDLE / "large_files.yml").is_file() else ""
    assert not [p for p in big if p not in listed], f"files over 25 MB not in bundle/large_files.yml: {big}"
