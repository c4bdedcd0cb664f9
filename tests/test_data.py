import json

import numpy as np
import pytest

from custom.data import BalancedMagnificationBatchSampler, MultiMagnificationDataset, downsample, list_ids, load_rgb
from tests.conftest import make_prepared_dataset, require_monuseg


@pytest.mark.parametrize("batch_size", [30, 32, 7])
def test_every_batch_balanced_over_magnifications(batch_size):
    s = BalancedMagnificationBatchSampler(num_images=5, num_magnifications=3, batch_size=batch_size, num_batches=9, seed=0)
    batches = list(s)
    assert len(batches) == 9 and all(len(b) == batch_size for b in batches)
    totals = np.zeros(3, int)
    for i, b in enumerate(batches):
        counts = np.bincount(np.asarray(b) // 5, minlength=3)
        assert counts.max() - counts.min() <= 1
        if batch_size % 3 == 0:
            assert (counts == batch_size // 3).all()
        totals += counts
        if i % 3 == 2:  # every 3 consecutive batches are exactly balanced
            assert totals.max() == totals.min()


def test_sampler_draws_each_image_before_repeating_and_is_reproducible():
    s = BalancedMagnificationBatchSampler(num_images=4, num_magnifications=3, batch_size=12, num_batches=2, seed=3)
    first = list(s)
    for m in range(3):
        imgs = [i % 4 for i in first[0] if i // 4 == m]
        assert sorted(imgs) == [0, 1, 2, 3]
    s.set_epoch(0)
    assert list(s) == first
    s.set_epoch(1)
    assert list(s) != first
    with pytest.raises(ValueError):
        BalancedMagnificationBatchSampler(0, 3, 32, 10)


def test_list_ids_and_errors(tmp_path):
    root = make_prepared_dataset(tmp_path / "d", n_images=4)
    splits = json.loads((root / "splits.json").read_text())
    assert list_ids(root, "train") == splits["train"]
    assert len(list_ids(root)) == 4
    with pytest.raises(ValueError, match="no split 'test'"):
        list_ids(root, "test")
    with pytest.raises(ValueError, match="requested ids have no image"):
        list_ids(root, ids=["nope"])
    with pytest.raises(FileNotFoundError, match="--dataset_dir"):
        list_ids(tmp_path / "empty")
    (root / "splits.json").unlink()
    with pytest.raises(FileNotFoundError, match="splits.json"):
        list_ids(root, "train")


def test_multi_magnification_views_and_labels(tmp_path):
    root = make_prepared_dataset(tmp_path / "d", n_images=2, size=200)
    ds = MultiMagnificationDataset(root, list_ids(root), magnifications=(10, 20, 40), base_magnification=40)
    assert len(ds) == 6
    shapes = [ds[i]["image"].shape for i in range(6)]
    assert shapes == [(3, 50, 50)] * 2 + [(3, 100, 100)] * 2 + [(3, 200, 200)] * 2
    assert [ds[i]["label"] for i in range(6)] == [0, 0, 1, 1, 2, 2]
    assert ds[5]["image"].dtype == np.uint8 and ds[4]["magnification"] == 40.0
    # 40x view is the stored image; 20x is its antialiased half
    np.testing.assert_array_equal(np.moveaxis(ds[4]["image"], 0, -1), load_rgb(root / "images" / f"{ds.ids[0]}.png"))
    fixed = MultiMagnificationDataset(root, list_ids(root), fixed_crops=3, crop_size=40, seed=1)
    assert len(fixed) == 18 and all(fixed[i]["image"].shape == (3, 40, 40) for i in range(18))
    assert [fixed[i]["label"] for i in range(3)] == [0, 1, 2]  # magnifications interleaved
    again = MultiMagnificationDataset(root, list_ids(root), fixed_crops=3, crop_size=40, seed=1)
    assert all(np.array_equal(fixed[i]["image"], again[i]["image"]) for i in range(18))
    with pytest.raises(ValueError, match="smaller than crop_size"):
        MultiMagnificationDataset(root, list_ids(root), fixed_crops=1, crop_size=60)
    with pytest.raises(ValueError, match="cannot be made"):
        MultiMagnificationDataset(root, list_ids(root), magnifications=(80,), base_magnification=40)


def test_labels_are_never_read(tmp_path):
    root = make_prepared_dataset(tmp_path / "d", n_images=2, size=64)
    for p in (root / "labels").iterdir():
        p.unlink()
    (root / "labels").rmdir()
    ds = MultiMagnificationDataset(root, list_ids(root), magnifications=(20, 40))
    assert len(ds) == 4


def test_downsample_antialiases():
    stripes = np.zeros((3, 64, 64), np.uint8)
    stripes[:, :, ::2] = 255  # one-pixel stripes: aliasing would give 0 or 255
    small = downsample(stripes, 4)
    assert small.shape == (3, 16, 16)
    assert 100 < small.mean() < 155 and small.std() < 20


def test_real_monuseg_pyramid():
    root = require_monuseg()
    ids = list_ids(root, "train")
    assert len(ids) == 19 and not set(ids) & set(list_ids(root, "val"))
    ds = MultiMagnificationDataset(root, ids[:1])
    assert [ds[i]["image"].shape for i in range(3)] == [(3, 250, 250), (3, 500, 500), (3, 1000, 1000)]
