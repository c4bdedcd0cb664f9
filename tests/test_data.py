import json

import numpy as np
import pytest

from custom.training.tiles import BalancedMagnificationBatchSampler, MultiMagnificationDataset, downsample
from custom.data.prepared import list_ids, load_rgb
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
    ds = MultiMagnificationDataset(root, list_ids(root), magnifications=(10, 20, 40), base_magnification=40, crop_size=50)
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
    with pytest.raises(ValueError, match="at 10x is 50x50, smaller than crop_size 51: use images of at least 204 px"):
        MultiMagnificationDataset(root, list_ids(root), crop_size=51)  # random training crops are checked too
    with pytest.raises(ValueError, match="cannot be made"):
        MultiMagnificationDataset(root, list_ids(root), magnifications=(80,), base_magnification=40)


def test_labels_are_never_read(tmp_path):
    root = make_prepared_dataset(tmp_path / "d", n_images=2, size=64)
    for p in (root / "labels").iterdir():
        p.unlink()
    (root / "labels").rmdir()
    ds = MultiMagnificationDataset(root, list_ids(root), magnifications=(20, 40), crop_size=32)
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


# ---------------------------------------------------------------------------------------------------------
# labels, whole-image dataset, stain target
# ---------------------------------------------------------------------------------------------------------


def test_load_label_types_and_values(tmp_path):
    from PIL import Image

    from custom.data.prepared import load_label

    label = np.zeros((6, 5), np.uint16)
    label[1:3, 1:3], label[4, 4] = 1000, 7  # ids above 255 survive
    Image.fromarray(label).save(tmp_path / "u16.png")
    out = load_label(tmp_path / "u16.png", (6, 5))
    assert out.dtype == np.int32 and out.shape == (6, 5)
    np.testing.assert_array_equal(out, label)
    Image.fromarray(label.astype(np.uint8) % 200).save(tmp_path / "u8.png")
    assert load_label(tmp_path / "u8.png").dtype == np.int32


def test_load_label_errors_name_the_file(tmp_path):
    from PIL import Image

    from custom.data.prepared import load_label

    Image.fromarray(np.zeros((6, 5), np.uint16)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="small.png") as info:
        load_label(tmp_path / "small.png", (8, 5))
    assert "6x5" in str(info.value) and "8x5" in str(info.value)
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="rgb.png.*single-channel"):
        load_label(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((6, 5), np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="float.tif.*integer"):
        load_label(tmp_path / "float.tif")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        load_label(tmp_path / "text.png")


def test_prepared_image_dataset_items(tmp_path):
    from custom.data.prepared import PreparedImageDataset, load_label

    root = make_prepared_dataset(tmp_path / "d", n_images=2, size=40)
    ids = list_ids(root)
    ds = PreparedImageDataset(root, ids)
    assert len(ds) == 2
    item = ds[1]
    assert set(item) == {"image", "label", "id"} and item["id"] == ids[1]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (3, 40, 40)
    assert item["label"].dtype == np.int32 and item["label"].shape == (1, 40, 40)
    np.testing.assert_array_equal(np.moveaxis(item["image"], 0, -1), load_rgb(root / "images" / f"{ids[1]}.png"))
    np.testing.assert_array_equal(item["label"][0], load_label(root / "labels" / f"{ids[1]}.png"))
    assert item["label"].max() > 0
    no_labels = PreparedImageDataset(root, ids, labels=False, transform=lambda d: {**d, "seen": True})
    assert set(no_labels[0]) == {"image", "id", "seen"}


def test_prepared_image_dataset_label_errors(tmp_path):
    from PIL import Image

    from custom.data.prepared import PreparedImageDataset

    root = make_prepared_dataset(tmp_path / "d", n_images=2, size=40)
    ids = list_ids(root)
    (root / "labels" / f"{ids[0]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=ids[0]):
        PreparedImageDataset(root, ids)
    assert len(PreparedImageDataset(root, ids, labels=False)) == 2  # labels not asked for: fine
    Image.fromarray(np.zeros((20, 40), np.uint16)).save(root / "labels" / f"{ids[0]}.png")  # wrong size
    with pytest.raises(ValueError, match=f"{ids[0]}.png: label is 20x40"):  # found when the dataset is built
        PreparedImageDataset(root, ids)


def test_stain_target_of():
    from custom.model.checkpoint import stain_target_of
    from custom.model.networks import AttentionNet

    target = [[70.0, 10.0, -10.0], [15.0, 8.0, 6.0]]
    means, stds = stain_target_of(AttentionNet(width=2, dilations=(1,), stain_target=target))
    assert means == target[0] and stds == target[1]
    with pytest.raises(ValueError, match="weights/model.pt.*stain target"):
        stain_target_of(AttentionNet(width=2, dilations=(1,)), "weights/model.pt")
    with pytest.raises(ValueError, match="stain target"):
        stain_target_of(object())  # no stain_target attribute at all


def test_stain_settings_of():
    from custom.model.checkpoint import stain_settings_of
    from custom.model.networks import AttentionNet

    stored = {"brightness_percentile": None, "max_std_ratio": 1.5}
    assert stain_settings_of(AttentionNet(width=2, dilations=(1,), stain_settings=stored)) == stored
    with pytest.raises(ValueError, match="old/model.pt: the weights store no stain normalisation settings"):  # before 0.5.0
        stain_settings_of(AttentionNet(width=2, dilations=(1,)), "old/model.pt")
    with pytest.raises(ValueError, match="max_std_ratio"):
        stain_settings_of(AttentionNet(width=2, dilations=(1,), stain_settings={"brightness_percentile": 90}))
