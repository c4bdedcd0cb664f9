"""The classical hematoxylin baselines: interface, behaviour on synthetic H&E, and on one real image."""

import numpy as np
import pytest
import torch

from custom.evaluation.baselines import BASELINES, HematoxylinLocalThreshold, HematoxylinOtsu
from custom.transforms import IMAGENET_MEAN, IMAGENET_STD
from custom.data.prepared import load_label, load_rgb
from custom.evaluation.metrics import dice_foreground
from custom.inference.postprocess import attention_to_instances
from tests.conftest import require_monuseg

PINK, PURPLE = (235, 170, 200), (90, 50, 140)


def normalise(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> ImageNet-normalised (1, 3, H, W), as the evaluation workflow feeds the baselines."""
    x = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 255.0
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((x - mean) / std)[None]


def synthetic_he(size: int = 128, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Light pink background with a few dark purple disks (slightly noisy); returns (rgb, disk mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    rgb = np.empty((size, size, 3), np.uint8)
    rgb[...] = PINK
    mask = np.zeros((size, size), bool)
    for cy, cx, r in [(30, 30, 9), (35, 90, 7), (90, 45, 10), (100, 100, 8), (64, 70, 6)]:
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    rgb[mask] = PURPLE
    rgb = np.clip(rgb.astype(int) + rng.integers(-6, 7, rgb.shape), 0, 255).astype(np.uint8)
    return rgb, mask


def test_registry_names():
    assert BASELINES == {"hematoxylin_otsu": HematoxylinOtsu, "hematoxylin_local": HematoxylinLocalThreshold}


@pytest.mark.parametrize("cls", [HematoxylinOtsu, HematoxylinLocalThreshold])
def test_baseline_masks_cover_the_disks(cls):
    rgb, disks = synthetic_he()
    x = torch.cat([normalise(rgb), normalise(rgb[:, ::-1])])  # a batch of 2, the second mirrored
    out = cls()(x)
    assert out.shape == (2, 1, 128, 128) and out.dtype == torch.float32
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}
    for b, truth in enumerate([disks, disks[:, ::-1]]):
        pred = out[b, 0].numpy() > 0
        dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
        assert dice > 0.8, f"{cls.__name__} image {b}: Dice {dice:.3f}"


@pytest.mark.parametrize("cls", [HematoxylinOtsu, HematoxylinLocalThreshold])
@pytest.mark.parametrize("colour", [PINK, PURPLE, (255, 255, 255)])
def test_flat_image_gives_empty_mask(cls, colour):
    rgb = np.empty((48, 40, 3), np.uint8)
    rgb[...] = colour
    out = cls()(normalise(rgb))
    assert out.shape == (1, 1, 48, 40)
    assert not out.any()


@pytest.mark.parametrize("cls", [HematoxylinOtsu, HematoxylinLocalThreshold])
@pytest.mark.parametrize("shape", [(3, 16, 16), (1, 1, 16, 16), (2, 4, 16, 16)])
def test_wrong_input_shape_raises(cls, shape):
    with pytest.raises(ValueError, match="B, 3, H, W"):
        cls()(torch.zeros(shape))


@pytest.mark.parametrize("block_size", [2, 1, 100, -3])
def test_invalid_block_size_raises(block_size):
    with pytest.raises(ValueError, match="block_size"):
        HematoxylinLocalThreshold(block_size=block_size)


@pytest.mark.parametrize("cls", [HematoxylinOtsu, HematoxylinLocalThreshold])
def test_negative_smoothing_raises(cls):
    with pytest.raises(ValueError, match="smoothing_sigma"):
        cls(smoothing_sigma=-1.0)


def test_otsu_on_real_monuseg_image():
    root = require_monuseg()
    image_id = "TCGA-A7-A13E-01Z-00-DX1"
    rgb = load_rgb(root / "images" / f"{image_id}.png")
    label = load_label(root / "labels" / f"{image_id}.png", rgb.shape[:2])
    mask = HematoxylinOtsu()(normalise(rgb))[0, 0]
    instances = attention_to_instances(mask)
    assert instances.shape == label.shape and instances.max() > 50  # many nuclei found
    assert dice_foreground(label, instances) > 0.6
