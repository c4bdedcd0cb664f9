"""``scripts/adapt.py``: self-training on a user's unlabeled images writes a model that segmentation takes."""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch

from tests.conftest import REPO, require_monuseg


def _adapt_module():
    spec = importlib.util.spec_from_file_location("adapt_script", REPO / "scripts" / "adapt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_adapt_writes_a_model_that_loads(tmp_path):
    """Two real MoNuSeg images (no labels), one tiny epoch: the written model is a CompactAttentionNet that
    carries the shipped student's stain target and post-processing, with weights changed by the training."""
    from custom.model.checkpoint import load_attention_weights
    from custom.model.networks import CompactAttentionNet

    images = sorted((require_monuseg() / "images").glob("*.png"))[:2]
    folder = tmp_path / "slides"
    folder.mkdir()
    for p in images:
        (folder / p.name).symlink_to(p)
    out = tmp_path / "adapted" / "model.pt"
    _adapt_module().main([str(folder), "--out", str(out), "--base_magnification", "40", "--adapt_tiles", "2",
                          "--adapt_tile_size", "256", "--selftrain_epochs", "1", "--selftrain_crops_per_image", "2",
                          "--selftrain_batch_size", "2", "--selftrain_crop_size", "128", "--pseudo_views", "2",
                          "--work_dir", str(tmp_path / "run"), "--progress", "false", "--num_workers", "0"])
    shipped = load_attention_weights(CompactAttentionNet(), str(REPO / "bundle" / "models" / "model.pt"))
    adapted = load_attention_weights(CompactAttentionNet(), str(out))
    assert adapted.postprocess == shipped.postprocess and adapted.stain_target is not None
    changed = [k for k, v in adapted.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()
               and not torch.equal(v, shipped.state_dict()[k])]
    assert changed
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.pt"]  # no temporary file left beside it


@pytest.mark.parametrize("args, message", [
    (["{missing}", "--out", "{tmp}/m.pt"], "does not exist|not found|no such"),
    (["{folder}", "--out", "{tmp}/model.txt"], "the adapted model is a .pt file"),
    (["{folder}", "--out", "{tmp}/m.pt", "--selftrain_epoch", "3"], "not a key of"),
])
def test_adapt_bad_input_exits_with_its_cause(tmp_path, capsys, args, message):
    """Refused before any work: the cause on stderr, exit status 1, no model file."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (64, 64), (200, 120, 180)).save(folder / "a.png")
    argv = [a.format(missing=tmp_path / "nope", folder=folder, tmp=tmp_path) for a in args]
    with pytest.raises(SystemExit) as e:
        _adapt_module().main(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("adapt.py: error:")
    assert re.search(message, err, re.IGNORECASE), err
    assert not list(tmp_path.glob("*.pt"))
