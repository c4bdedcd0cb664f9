"""Slide reading: pixel size from metadata, levels at a magnification, tissue detection, slide lists."""

import numpy as np
import pytest
from PIL import Image

from custom.wsi.slide import MagnificationUnavailable, Slide, list_slides, magnification_to_mpp
from tests.slides import write_pyramidal_tiff
from custom.wsi.tissue import TissueParams, tissue_mask
from custom.wsi.datasets import WSITileDataset
from tests.conftest import CMU_SLIDE, TCGA_SLIDE, require_backend, require_slide, synthetic_he

BACKENDS = ["cucim", "openslide"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_generated_pyramid_levels_and_magnifications(pyramid_slide, backend):
    with Slide(pyramid_slide, require_backend(backend)) as s:
        assert s.level_dims == [(1536, 1280), (768, 640), (384, 320)]
        assert s.mpp == pytest.approx(0.25) and s.mpp_source in ("TIFF resolution (micrometer)", "openslide mpp-x")
        assert [s.level_for(magnification_to_mpp(m)) for m in (40, 20, 10)] == [0, 1, 2]
        # 5x is coarser than every level: read from the coarsest level and reduced further
        assert s.level_for(magnification_to_mpp(5)) == 2
        assert s.size_at(magnification_to_mpp(10)) == (384, 320)
        tile = s.read((10, 20), (64, 48), magnification_to_mpp(20))
        assert tile.shape == (3, 64, 48) and tile.dtype == np.uint8
        np.testing.assert_array_equal(tile, s.read_level((20, 40), (64, 48), level=1))
        five = s.read((0, 0), (32, 32), magnification_to_mpp(5))
        assert five.shape == (3, 32, 32)


def test_backends_read_the_same_pixels(pyramid_slide):
    require_backend("cucim"), require_backend("openslide")
    a = Slide(pyramid_slide, "cucim").read((100, 50), (224, 224), 0.25)
    b = Slide(pyramid_slide, "openslide").read((100, 50), (224, 224), 0.25)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_svs_with_mpp_single_level_20x(backend):
    with Slide(require_slide(CMU_SLIDE), require_backend(backend)) as s:
        assert s.level_dims == [(2967, 2220)]
        assert s.mpp == pytest.approx(0.499)
        assert s.level_for(magnification_to_mpp(20)) == 0
        with pytest.raises(MagnificationUnavailable, match="no level at 40x"):
            s.level_for(magnification_to_mpp(40))
        up = s.read((0, 0), (200, 100), magnification_to_mpp(40), allow_upsample=True)
        assert up.shape == (3, 200, 100)
        # enlarged 2x: the 40x region covers the 20x region of half the size
        native = s.read_level((0, 0), (100, 50))
        assert np.abs(up[:, ::2, ::2].astype(int) - native.astype(int)).mean() < 12


@pytest.mark.parametrize("backend", BACKENDS)
def test_real_svs_without_mpp_needs_it_given(backend):
    path = require_slide(TCGA_SLIDE)
    with Slide(path, require_backend(backend)) as s:
        assert s.mpp is None and len(s.level_dims) == 2
        with pytest.raises(ValueError, match=r"--mpp .*--base_magnification"):
            s.require_mpp()
    with Slide(path, backend, base_magnification=10) as s:
        assert s.mpp == pytest.approx(1.0)
        assert s.level_for(magnification_to_mpp(5)) == 1  # level 1 is 2x coarser: 5x
        assert s.read((0, 0), (64, 64), magnification_to_mpp(5)).shape == (3, 64, 64)


def test_tissue_mask_finds_the_tissue(pyramid_slide):
    with Slide(pyramid_slide, require_backend("openslide")) as s:
        mask, factor = tissue_mask(s)
    assert factor == pytest.approx(32, rel=0.05)  # 8 um/px from 0.25
    columns = mask.mean(0)
    split = int(0.6 * mask.shape[1])
    assert columns[: split - 1].min() > 0.9 and columns[split + 1 :].max() < 0.1


def test_tissue_mask_real_slide():
    with Slide(require_slide(CMU_SLIDE), require_backend("cucim")) as s:
        mask, factor = tissue_mask(s)
    assert 0.2 < mask.mean() < 0.6  # a strip of skin on glass
    with pytest.raises(ValueError, match="min_saturation"):
        TissueParams(min_saturation=2)


def test_plain_image_and_bad_files(tmp_path):
    png = tmp_path / "img.png"
    Image.fromarray(synthetic_he(100, 120)).save(png)
    with Slide(png, base_magnification=40) as s:
        assert s.backend == "image" and s.shape == (100, 120) and s.mpp == 0.25
        assert s.read((0, 0), (50, 60), magnification_to_mpp(20)).shape == (3, 50, 60)
    with pytest.raises(FileNotFoundError, match="missing.svs"):
        Slide(tmp_path / "missing.svs")
    (tmp_path / "empty.svs").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.svs: the file is empty"):
        Slide(tmp_path / "empty.svs")
    (tmp_path / "text.svs").write_text("not a slide\n")
    with pytest.raises(ValueError, match="text.svs: not a valid .svs slide.*a text file"):
        Slide(tmp_path / "text.svs", "openslide")
    with pytest.raises(ValueError, match="mpp must be a positive number"):
        Slide(png, mpp=-1)


def test_list_slides(tmp_path, pyramid_slide):
    folder = tmp_path / "slides"
    folder.mkdir()
    write_pyramidal_tiff(folder / "b.tiff", synthetic_he(64, 64), mpp=0.5, levels=1)
    Image.fromarray(synthetic_he(64, 64)).save(folder / "a.png")
    (folder / "notes.txt").write_text("x")
    assert [p.name for p in list_slides(folder)] == ["a.png", "b.tiff"]
    csv = tmp_path / "list.csv"
    csv.write_text("path,comment\nslides/b.tiff,x\n" + f"{pyramid_slide},y\n")
    assert list_slides(csv) == [folder / "b.tiff", pyramid_slide]
    assert len(list_slides([str(folder), str(pyramid_slide)])) == 3
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_slides(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no input given"):
        list_slides(None)
    (tmp_path / "bad.csv").write_text("file_name\nx.svs\n")
    with pytest.raises(ValueError, match="'path' column"):
        list_slides(tmp_path / "bad.csv")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="no slides or images"):
        list_slides(tmp_path / "empty_dir")
    # entries of a list or CSV are kept when missing: opening each one reports it, the batch goes on
    assert list_slides([str(folder / "a.png"), str(tmp_path / "gone.svs")]) == [folder / "a.png", tmp_path / "gone.svs"]
    (tmp_path / "gone.csv").write_text("path\ngone.svs\nslides/a.png\n")
    assert list_slides(tmp_path / "gone.csv") == [tmp_path / "gone.svs", folder / "a.png"]
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 training slides do not exist, e.g. \['.*gone.svs'\]"):
        WSITileDataset(tmp_path / "gone.csv")


def test_16bit_pyramid_read_by_levels_with_tifffile(tmp_path):
    """A tiled 16-bit RGB pyramid (SubIFDs): the backends cannot read it, tifffile reads each level by
    tiles, 16 bits reduced to 8 (the high byte)."""
    import tifffile

    image = synthetic_he(320, 256)
    half = np.asarray(Image.fromarray(image).resize((128, 160), Image.BILINEAR))
    path = tmp_path / "pyramid16.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(image.astype(np.uint16) * 257, photometric="rgb", tile=(64, 64), subifds=1, compression="zlib",
                 resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
        tw.write(half.astype(np.uint16) * 257, photometric="rgb", tile=(64, 64), subfiletype=1, compression="zlib")
    with Slide(path, "cucim") as s:
        assert s.backend == "tifffile" and s.level_dims == [(320, 256), (160, 128)] and not s.is_image
        assert s.mpp == pytest.approx(0.25) and "16 bits per channel reduced to 8" in s.conversion
        np.testing.assert_array_equal(s.read_level((64, 32), (100, 90), level=0), np.moveaxis(image[64:164, 32:122], -1, 0))
        np.testing.assert_array_equal(s.read_level((64, 32), (50, 45), level=1), np.moveaxis(half[32:82, 16:61], -1, 0))
        assert s.level_for(magnification_to_mpp(20)) == 1


def test_tiled_tiff_with_separate_colour_planes_read_with_tifffile(tmp_path):
    """A tiled 8-bit RGB TIFF whose colours are stored as separate planes (planar configuration 2):
    cuCIM misreads its regions (wrong pixels in the first column of tiles), so tifffile reads it."""
    import tifffile

    image = synthetic_he(300, 200)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(image, -1, 0), photometric="rgb", planarconfig="separate", tile=(64, 64), compression="zlib")
    for backend in BACKENDS:
        with Slide(path, backend, mpp=0.25) as s:
            assert s.backend == "tifffile"
            np.testing.assert_array_equal(s.read_level((13, 17), (200, 150)), np.moveaxis(image[13:213, 17:167], -1, 0))


def test_compressed_single_strip_tiff_above_the_limit_is_refused(tmp_path, monkeypatch):
    """A strip is decoded whole, so a compressed TIFF stored as one strip cannot be read by
    regions: above the whole-image limit it is refused with what to do (limit lowered here)."""
    import tifffile

    import custom.wsi.slide as wsi

    rgb = np.full((64, 96, 3), 200, np.uint8)
    one_strip, strips = tmp_path / "one_strip.tif", tmp_path / "strips.tif"
    tifffile.imwrite(one_strip, rgb, photometric="rgb", compression="zlib", rowsperstrip=64)
    tifffile.imwrite(strips, rgb, photometric="rgb", compression="zlib", rowsperstrip=8)
    monkeypatch.setattr(wsi, "MAX_WHOLE_IMAGE_PIXELS", 96 * 16)
    with pytest.raises(wsi.SlideError, match=r"one_strip.tif: level 0 is stored in compressed strips of 0 megapixels.*tiled pyramidal TIFF"):
        wsi.Slide(one_strip, mpp=0.25)
    with wsi.Slide(strips, mpp=0.25) as slide:  # 8-row strips are read by regions
        assert slide.read_level((0, 0), (10, 10)).shape == (3, 10, 10)


def test_slide_cache_keeps_a_bounded_number_of_slides_open(tmp_path):
    from custom.wsi.datasets import _SlideCache

    paths = []
    for i in range(5):
        paths.append(tmp_path / f"s{i}.png")
        Image.fromarray(np.full((32, 32, 3), 100 + i, np.uint8)).save(paths[-1])
    cache = _SlideCache("cucim", 0.25, None, max_open=2)
    first = cache(paths[0])
    for p in paths[1:]:
        cache(p)
    assert list(cache._open) == paths[-2:]
    assert cache(paths[0]) is not first  # reopened after being closed
    assert int(cache(paths[0]).read_level((0, 0), (1, 1))[0, 0, 0]) == 100
