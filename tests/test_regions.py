"""custom.wsi.load_region.LoadRegiond's slide colour statistics: a requested tile is stain-normalised
as whole-slide inference normalises its slide (MONAI Label / QuPath = scripts/segment.py)."""

import logging

import numpy as np
import pytest
from PIL import Image

from custom.wsi.load_region import LoadRegiond
from custom.transforms import reinhard_source_stats
from custom.wsi.slide import Slide, magnification_to_mpp
from custom.wsi.tissue import tissue_mask
from custom.wsi.datasets import SlideWindowDataset, slide_stain_stats
from tests.conftest import CMU_SLIDE, require_backend, require_slide, synthetic_he


def _request(path, location, size=(256, 256)) -> dict:
    return {"image": str(path), "location": list(location), "size": list(size), "level": 0}


def test_tiles_of_a_generated_slide_share_its_statistics(pyramid_slide):
    """Two tiles, one all tissue, one mostly glass, get the same ``stain``: that of
    SlideWindowDataset for the slide, which differs from either tile's own colours."""
    require_backend("cucim")
    load = LoadRegiond(magnification=40, backend="cucim", stain_regions=8, stain_region_size=256)
    windows = SlideWindowDataset(pyramid_slide, window=256, halo=0, context=0, backend="cucim", stain_regions=8, stain_region_size=256)
    tissue_tile = load(_request(pyramid_slide, (100, 100)))
    glass_tile = load(_request(pyramid_slide, (1000, 1200)))  # x 1000-1256 of 1280: right of the tissue (left 60 %)
    np.testing.assert_array_equal(tissue_tile["stain"], windows.stain[0])
    np.testing.assert_array_equal(glass_tile["stain"], windows.stain[0])
    own = reinhard_source_stats([np.moveaxis(glass_tile["image"], 0, -1)])
    assert abs(own[1] - windows.stain[0][1]) > 5, "the glass tile's own L* mean should be far from the slide's"
    assert all("stain" in windows[i] for i in range(len(windows)))


def test_stain_regions_zero_keeps_the_tiles_own_colours(pyramid_slide):
    require_backend("cucim")
    assert "stain" not in LoadRegiond(backend="cucim")(_request(pyramid_slide, (100, 100)))  # default 0: as before
    windows = SlideWindowDataset(pyramid_slide, window=512, halo=0, context=0, backend="cucim", stain_regions=0)
    assert len(windows) > 0 and all("stain" not in windows[i] for i in range(len(windows)))
    with pytest.raises(ValueError, match="stain_regions"):
        LoadRegiond(stain_regions=-1)
    with pytest.raises(ValueError, match="stain_regions"):
        SlideWindowDataset(pyramid_slide, backend="cucim", stain_regions=-1)


def test_small_image_is_one_region_and_a_changed_file_is_read_again(tmp_path):
    """An image no larger than a stain region: its statistics are the whole image's (per-image
    normalisation, as evaluation does); they are kept per file, and read again once the file changes."""
    path = tmp_path / "tile.png"
    Image.fromarray(synthetic_he(200, 240, tissue_fraction=1.0, seed=1)).save(path)
    load = LoadRegiond(magnification=40, backend="cucim", base_magnification=40, stain_regions=8, stain_region_size=512)
    part = load({**_request(path, (0, 0), (64, 64)), "base_magnification": 40})
    whole = reinhard_source_stats([np.asarray(Image.open(path).convert("RGB"))])
    np.testing.assert_allclose(part["stain"], whole, rtol=1e-9)
    assert part["image"].shape == (3, 64, 64)
    Image.fromarray(synthetic_he(200, 240, tissue_fraction=1.0, seed=1) // 2 + 60).save(path)  # darker
    again = load({**_request(path, (0, 0), (64, 64)), "base_magnification": 40})
    assert not np.allclose(again["stain"], part["stain"])
    np.testing.assert_allclose(again["stain"], reinhard_source_stats([np.asarray(Image.open(path).convert("RGB"))]), rtol=1e-9)


def test_image_without_tissue_warns_and_keeps_the_tiles_colours(tmp_path, caplog):
    path = tmp_path / "glass.png"
    Image.fromarray(np.full((128, 128, 3), 250, np.uint8)).save(path)
    load = LoadRegiond(backend="cucim", base_magnification=40, stain_regions=8)
    with caplog.at_level(logging.WARNING, logger="custom.wsi.load_region"):
        out = load(_request(path, (0, 0), (64, 64)))
    assert "stain" not in out
    assert any("no tissue" in r.getMessage() and "glass.png" in r.getMessage() for r in caplog.records)


def test_slide_stain_stats_of_the_real_cmu_slide_match_segment_and_monailabel():
    """The real 20x CMU slide: the statistics of scripts/segment.py's windows and of two
    MONAI Label tiles far apart are the same numbers, and plausible H&E (L* below glass)."""
    slide_path = str(require_slide(CMU_SLIDE))
    require_backend("cucim")
    windows = SlideWindowDataset(slide_path, backend="cucim")  # the defaults of inference.json: 8 regions of 512
    load = LoadRegiond(magnification=40, backend="cucim", stain_regions=8, stain_region_size=512)
    a = load(_request(slide_path, (200, 200)))["stain"]
    b = load(_request(slide_path, (1800, 2400)))["stain"]
    np.testing.assert_array_equal(a, windows.stain[0])
    np.testing.assert_array_equal(b, windows.stain[0])
    with Slide(slide_path, "cucim") as slide:
        mpp = magnification_to_mpp(40)
        mask, factor = tissue_mask(slide)
        np.testing.assert_array_equal(slide_stain_stats(slide, mpp, None, mask, factor), a)
        with pytest.raises(ValueError, match="stain regions"):
            slide_stain_stats(slide, mpp, regions=0)
    assert 30 < a[1] < 90 and a[4] > 3  # L* mean and spread of stained tissue
