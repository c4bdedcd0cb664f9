"""Whole-slide datasets: tissue tiles at several magnifications (cached index) and inference windows."""

import logging

import numpy as np
import pytest

from custom.training.tiles import BalancedMagnificationBatchSampler
from custom.wsi.slide import MagnificationUnavailable, Slide, magnification_to_mpp
from custom.wsi.tissue import tissue_mask
from custom.wsi.datasets import SlideWindowDataset, WSITileDataset, tile_coverage, tissue_core
from tests.conftest import CMU_SLIDE, TCGA_SLIDE, require_backend, require_slide

BACKENDS = ["cucim", "openslide"]


def test_tile_coverage_counts_mask_pixels():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    cov = tile_coverage(mask, 4.0, np.array([[0, 0, 40, 20], [0, 0, 40, 40], [0, 20, 40, 40], [0, 0, 2, 2]]))
    np.testing.assert_allclose(cov, [1.0, 0.5, 0.0, 1.0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiles_of_generated_pyramid(pyramid_slide, backend, tmp_path):
    ds = WSITileDataset(pyramid_slide, magnifications=(10, 20, 40), tile_size=96, tile_coverage=0.7,
                        backend=require_backend(backend), cache_dir=str(tmp_path))
    assert all(n > 0 for n in ds.class_sizes)
    # more tiles at higher magnification: 4x per step for the same tissue
    assert ds.class_sizes[2] > 3 * ds.class_sizes[1] > 9 * ds.class_sizes[0] * 0.9
    slide = Slide(pyramid_slide, backend)
    mask, factor = tissue_mask(slide)
    for m, mag in enumerate(ds.magnifications):
        f = slide.scale_to_level0(magnification_to_mpp(mag))
        boxes = np.array([[y, x, y + 96, x + 96] for _, y, x in ds.tiles[m]]) * f
        assert tile_coverage(mask, factor, boxes).min() >= 0.7
        assert boxes[:, 3].max() <= 0.6 * 1280 + 2 * factor  # tissue is on the left 60 %
    item = ds[ds.offsets[1]]
    assert item["image"].shape == (3, 96, 96) and item["label"] == 1 and item["magnification"] == 20.0
    assert item["id"] == "generated_pyramid"
    assert len(list(tmp_path.glob("tile_index_*.npz"))) == 1



def test_sample_items_spread_over_slides(pyramid_slide, tmp_path):
    """Adaptation tiles: read into memory with ids naming slide and position, the same for a seed,
    taken from every slide in turn (the generated slide twice, as two paths)."""
    twin = tmp_path / "twin.tiff"
    twin.symlink_to(pyramid_slide)
    ds = WSITileDataset([str(pyramid_slide), str(twin)], magnifications=(40,), tile_size=96, backend=require_backend("openslide"))
    items = ds.sample_items(6, seed=1)
    assert len(items) == 6 and all(it["image"].shape == (3, 96, 96) and it["image"].dtype == np.uint8 for it in items)
    assert [it["id"].split("_y")[0] for it in items] == ["generated_pyramid", "twin"] * 3
    assert [it["id"] for it in ds.sample_items(6, seed=1)] == [it["id"] for it in items]
    y, x = (int(v) for v in items[0]["id"].split("_y")[1].split("_x"))
    np.testing.assert_array_equal(items[0]["image"], Slide(pyramid_slide, "openslide").read((y, x), (96, 96), magnification_to_mpp(40)))
    assert len(ds.sample_items(10 ** 6)) == ds.class_sizes[0]
    with pytest.raises(ValueError, match="n must be"):
        ds.sample_items(0)

def test_tile_index_is_cached(pyramid_slide, tmp_path, monkeypatch):
    first = WSITileDataset(pyramid_slide, tile_size=96, backend=require_backend("openslide"), cache_dir=str(tmp_path))

    def no_rescan(self):
        raise AssertionError("rescanned although the index is cached")

    monkeypatch.setattr(WSITileDataset, "_scan", no_rescan)
    second = WSITileDataset(pyramid_slide, tile_size=96, backend="openslide", cache_dir=str(tmp_path))
    assert second.class_sizes == first.class_sizes
    with pytest.raises(AssertionError, match="rescanned"):  # other settings: another index
        WSITileDataset(pyramid_slide, tile_size=96, tile_coverage=0.9, backend="openslide", cache_dir=str(tmp_path))


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_20x_slide_skips_or_refuses_40x(backend, caplog):
    path = require_slide(CMU_SLIDE)
    with caplog.at_level(logging.WARNING):
        ds = WSITileDataset(path, magnifications=(10, 20), backend=require_backend(backend))
    assert ds.class_sizes[0] >= 5 and ds.class_sizes[1] > 3 * ds.class_sizes[0]
    assert ds[0]["image"].shape == (3, 224, 224)
    with pytest.raises(ValueError, match="no tissue tiles at 40x"):
        WSITileDataset(path, magnifications=(10, 20, 40), backend=backend)
    assert "no level at 40x" in caplog.text
    with pytest.raises(MagnificationUnavailable, match="no level at 40x"):
        WSITileDataset(path, magnifications=(10, 20, 40), backend=backend, missing_magnification="error")


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_slide_without_mpp(backend):
    path = require_slide(TCGA_SLIDE)
    with pytest.raises(ValueError, match="--mpp"):
        WSITileDataset(path, magnifications=(5, 10), backend=require_backend(backend))
    ds = WSITileDataset(path, magnifications=(2.5, 5, 10), backend=backend, base_magnification=10)
    assert all(n > 0 for n in ds.class_sizes)
    tiles = ds.sample_tiles(6, seed=1)
    assert len(tiles) == 6 and tiles[0].shape == (224, 224, 3)


def test_balanced_sampler_with_class_sizes():
    sizes = [3, 10, 40]
    s = BalancedMagnificationBatchSampler(sizes, 3, batch_size=6, num_batches=20, seed=0)
    offsets = [0, 3, 13]
    for batch in s:
        classes = [int(np.searchsorted(offsets, i, side="right") - 1) for i in batch]
        assert sorted(classes) == [0, 0, 1, 1, 2, 2]
        assert all(0 <= i < sum(sizes) for i in batch)
    with pytest.raises(ValueError, match="class sizes"):
        BalancedMagnificationBatchSampler([3, 4], 3, batch_size=6, num_batches=2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_cover_the_tissue_once(pyramid_slide, backend):
    ds = SlideWindowDataset(pyramid_slide, magnification=40, window=256, halo=32, context=7, backend=require_backend(backend))
    info = ds.slides_info[0]
    assert info["analysis_shape"] == [1536, 1280] and info["scale_to_level0"] == pytest.approx(1.0)
    assert info["num_windows"] == len(ds) and 0 < len(ds) < 6 * 5  # glass windows skipped
    assert info["tissue_mm2"] == pytest.approx(1536 * 1280 * 0.6 * 0.25**2 / 1e6, rel=0.1)
    covered = np.zeros((1536, 1280), int)
    for i in range(len(ds)):
        item = ds[i]
        y, x, h, w = item["box"]
        assert item["image"].shape == (3, h, w)
        cy0, cx0, cy1, cx1 = item["core"]
        vy0, vx0, vy1, vx1 = item["valid"]
        assert vy0 <= cy0 < cy1 <= vy1 and vx0 <= cx0 < cx1 <= vx1
        assert (cy0 - vy0 == 32 or y + vy0 == 0) and (vy0 == 7 or y == 0)  # halo, then context
        covered[y + cy0 : y + cy1, x + cx0 : x + cx1] += 1
    assert covered.max() == 1 and covered[:, : int(0.55 * 1280)].min() == 1
    assert np.isfinite(ds.stain[0]).all()


def test_tissue_core_shrinks_a_core_to_its_tissue_and_margin():
    mask = np.zeros((10, 10), bool)
    mask[2:4, :5] = True  # level-0 rows 8-16, columns 0-20 (4 level-0 pixels per mask pixel)
    assert tissue_core(mask, 4.0, (0, 0, 40, 40), 1.0, 3) == (5, 0, 19, 23)
    assert tissue_core(mask, 4.0, (0, 0, 20, 20), 2.0, 1) == (3, 0, 9, 11)  # analysis pixels of 2 level-0 pixels
    assert tissue_core(mask, 4.0, (0, 24, 40, 40), 1.0, 3) == (0, 24, 40, 40)  # no tissue under it: as it is
    assert tissue_core(mask, 4.0, (10, 10, 14, 14), 1.0, 30) == (10, 10, 14, 14)  # never beyond the core


def test_windows_shrink_to_the_tissue_with_a_margin(pyramid_slide):
    # 320-pixel cores: the tissue (the slide's left 60 %, 768 pixels) ends inside the third column of cores
    whole = SlideWindowDataset(pyramid_slide, magnification=40, window=320, halo=32, context=7, backend=require_backend("cucim"))
    ds = SlideWindowDataset(pyramid_slide, magnification=40, window=320, halo=32, context=7, backend="cucim", tissue_margin_um=16)
    assert len(ds) == len(whole)
    mask, factor = tissue_mask(Slide(pyramid_slide, "cucim"), ds.tissue)
    near = np.kron(mask, np.ones((int(factor), int(factor)), int))[:1536, :1280]
    covered = np.zeros((1536, 1280), int)
    for i in range(len(ds)):
        item = ds[i]
        y, x = item["box"][:2]
        cy0, cx0, cy1, cx1 = item["core"]
        covered[y + cy0 : y + cy1, x + cx0 : x + cx1] += 1
    assert covered.max() == 1 and covered[near[: covered.shape[0], : covered.shape[1]] > 0].min() == 1  # all tissue, once
    assert covered.sum() < sum((c[4] - c[2]) * (c[5] - c[3]) for c in whole.windows)  # less glass than whole cores
    cols = np.flatnonzero(covered.any(0))
    assert cols.max() <= np.flatnonzero(near.any(0)).max() + 16 / 0.25 + 1  # at most the margin beyond the tissue
    assert ds.tissue_margin_um == 16.0 and whole.tissue_margin_um is None
    # the margin needs the tissue mask: without it, whole cores, and the summary's record says so
    assert SlideWindowDataset(pyramid_slide, backend="cucim", tissue_margin_um=16, use_tissue_mask=False).tissue_margin_um is None
    with pytest.raises(ValueError, match="tissue_margin_um"):
        SlideWindowDataset(pyramid_slide, backend="cucim", tissue_margin_um=-1)


def test_windows_at_a_lower_magnification_and_roi(pyramid_slide):
    ds = SlideWindowDataset(pyramid_slide, magnification=20, window=128, halo=16, context=5, backend=require_backend("openslide"),
                            roi=[0, 0, 512, 512])
    info = ds.slides_info[0]
    assert info["scale_to_level0"] == pytest.approx(2.0) and len(ds) == 4
    with pytest.raises(ValueError, match="outside the slide"):
        SlideWindowDataset(pyramid_slide, backend="openslide", roi=[5000, 0, 10, 10])
    assert len(SlideWindowDataset(pyramid_slide, backend="openslide", exclude=["generated_pyramid"]).slides_info) == 0
