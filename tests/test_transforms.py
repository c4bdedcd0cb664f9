import numpy as np
import pytest
import torch
from skimage.color import rgb2lab

from custom.transforms import DIHEDRAL_NAMES, EQUIVARIANCE_TRANSFORMS, RandDihedrald, RandHEDJitter, RandHEDJitterd, ReinhardNormalize, ReinhardNormalized, dihedral, dihedral_inverse, reinhard_stats

# each element written independently with numpy on an (H, W) image
NUMPY_REFERENCE = {
    "identity": lambda a: a,
    "hflip": np.fliplr,
    "vflip": np.flipud,
    "transpose": lambda a: a.T,
    "rot90": lambda a: np.rot90(a, 1),
    "rot180": lambda a: np.rot90(a, 2),
    "rot270": lambda a: np.rot90(a, 3),
    "antitranspose": lambda a: np.rot90(a, 2).T,
}


@pytest.mark.parametrize("index", range(len(DIHEDRAL_NAMES)))
def test_dihedral_and_inverse(index):
    img = np.arange(5 * 7).reshape(5, 7)
    expected = NUMPY_REFERENCE[DIHEDRAL_NAMES[index]](img)
    np.testing.assert_array_equal(dihedral(img, index), expected)
    t = torch.as_tensor(img).view(1, 1, 5, 7)
    np.testing.assert_array_equal(dihedral(t, index)[0, 0].numpy(), expected)
    np.testing.assert_array_equal(dihedral_inverse(dihedral(img, index), index), img)
    np.testing.assert_array_equal(dihedral_inverse(dihedral(t, index), index).numpy(), t.numpy())


def test_group_has_eight_distinct_elements_and_paper_set():
    img = np.arange(16).reshape(4, 4)
    outs = {dihedral(img, i).tobytes() for i in range(8)}
    assert len(outs) == 8
    assert [DIHEDRAL_NAMES[i] for i in EQUIVARIANCE_TRANSFORMS] == ["hflip", "vflip", "transpose", "rot90", "rot180", "rot270"]
    with pytest.raises(ValueError):
        dihedral(img, 8)


def _tissue(seed=0, size=64):
    rng = np.random.default_rng(seed)
    img = np.empty((3, size, size), np.float32)
    img[0], img[1], img[2] = 0.9, 0.6, 0.8
    img[:, 10:30, 10:30] = np.array([0.35, 0.2, 0.55])[:, None, None]
    return np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1).astype(np.float32)


def test_reinhard_matches_target_statistics():
    target_means, target_stds = [70.0, 20.0, -15.0], [12.0, 8.0, 6.0]
    out = ReinhardNormalize(target_means, target_stds, brightness_percentile=None)(_tissue())
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    lab = rgb2lab(np.moveaxis(out, 0, -1).astype(np.float64)).reshape(-1, 3)
    np.testing.assert_allclose(lab.mean(0), target_means, atol=1.0)
    np.testing.assert_allclose(lab.std(0), target_stds, rtol=0.1)
    # torch in, torch out; dictionary version identical
    t = torch.as_tensor(_tissue())
    out_t = ReinhardNormalize(target_means, target_stds, brightness_percentile=None)(t)
    assert isinstance(out_t, torch.Tensor)
    d = ReinhardNormalized("image", target_means, target_stds, brightness_percentile=None)({"image": t})
    assert torch.allclose(d["image"], out_t)


def test_reinhard_stats_self_target_is_near_identity():
    img = _tissue(1)
    means, stds = reinhard_stats([img], brightness_percentile=None)
    out = ReinhardNormalize(means, stds, brightness_percentile=None)(img)
    assert np.abs(out - img).max() < 0.02
    with pytest.raises(ValueError):
        ReinhardNormalize([1, 2], [1, 2, 3])


def test_reinhard_max_std_ratio_bounds_the_contrast_change():
    img = _tissue(2)
    lab_in = rgb2lab(np.moveaxis(img, 0, -1).astype(np.float64)).reshape(-1, 3)
    target_means, target_stds = lab_in.mean(0) + [5.0, 2.0, -2.0], lab_in.std(0) * np.array([3.0, 0.2, 1.2])
    plain = ReinhardNormalize(target_means, target_stds, brightness_percentile=None)(img)
    capped = ReinhardNormalize(target_means, target_stds, brightness_percentile=None, max_std_ratio=1.5)(img)
    # the same as plain Reinhard to stds of source x [1.5, 1/1.5, 1.2]: each scale clipped to [1/1.5, 1.5]
    clipped = ReinhardNormalize(target_means, lab_in.std(0) * np.array([1.5, 1 / 1.5, 1.2]), brightness_percentile=None)(img)
    np.testing.assert_allclose(capped, clipped, atol=1e-5)
    assert np.abs(capped - plain).max() > 0.05
    # a cap that does not bind changes nothing
    loose = ReinhardNormalize(target_means, target_stds, brightness_percentile=None, max_std_ratio=100)(img)
    np.testing.assert_allclose(loose, plain, atol=1e-6)
    d = ReinhardNormalized("image", target_means, target_stds, brightness_percentile=None, max_std_ratio=1.5)({"image": img})
    np.testing.assert_allclose(d["image"], capped)


@pytest.mark.parametrize("bad", [0.5, 0, -2, True, "1.5", float("nan")])
def test_reinhard_max_std_ratio_refuses_bad_values(bad):
    with pytest.raises(ValueError, match="max_std_ratio"):
        ReinhardNormalize([70.0, 20.0, -15.0], [12.0, 8.0, 6.0], max_std_ratio=bad)


def test_reinhard_cap_keeps_pale_nuclei_on_real_low_contrast_image():
    """TCGA-18-5592 (40 % pale vesicular nuclei, no white space): plain Reinhard with the
    brightness standardisation washes its nuclei into the stroma, the capped version does not
    (hematoxylin density + Otsu against the true foreground)."""
    from PIL import Image
    from skimage.filters import threshold_otsu

    from custom.training.tiles import reinhard_target
    from custom.model.networks import HematoxylinDensity
    from tests.conftest import require_monuseg

    root = require_monuseg()
    image_id = "TCGA-18-5592-01Z-00-DX1"
    rgb = np.asarray(Image.open(root / "images" / f"{image_id}.png").convert("RGB"))
    truth = np.asarray(Image.open(root / "labels" / f"{image_id}.png")) > 0
    reference = [np.asarray(Image.open(root / "images" / f"{i}.png").convert("RGB")) for i in ("TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5711-01Z-00-DX1")]
    hematoxylin = HematoxylinDensity()
    mean, sd = np.array([0.485, 0.456, 0.406])[:, None, None], np.array([0.229, 0.224, 0.225])[:, None, None]

    def dice(percentile, max_std_ratio):
        means, stds = reinhard_target(reference, None, percentile)
        out = ReinhardNormalize(means, stds, percentile, max_std_ratio)(np.moveaxis(rgb, -1, 0).astype(np.float32) / 255)
        h = hematoxylin(torch.from_numpy(((out - mean) / sd).astype(np.float32))[None])[0, 0].numpy()
        h = np.clip(h, *np.percentile(h, [0.5, 99.5]))
        mask = h > threshold_otsu(h)
        return 2 * (mask & truth).sum() / (mask.sum() + truth.sum())

    plain, capped = dice(90, None), dice(None, 1.5)
    assert capped > 0.7 and capped > plain + 0.2, (plain, capped)


def test_hed_jitter():
    img = _tissue(2)
    assert np.abs(RandHEDJitter(sigma=0.0)(img) - img).max() < 1e-3  # deconvolution round trip
    jit = RandHEDJitter(sigma=0.03).set_random_state(0)
    out = jit(img)
    assert out.shape == img.shape and 0 <= out.min() and out.max() <= 1
    assert 0 < np.abs(out - img).max() < 0.2 and np.abs(jit._factors - 1).max() < 0.2
    d = RandHEDJitterd(["a", "b"], sigma=0.05).set_random_state(1)({"a": img, "b": img.copy()})
    np.testing.assert_allclose(d["a"], d["b"])  # one draw shared by keys


def test_rand_dihedrald_same_transform_for_all_keys():
    img = np.arange(2 * 6 * 6, dtype=np.float32).reshape(2, 6, 6)
    seen = set()
    t = RandDihedrald(["image", "copy"]).set_random_state(0)
    for _ in range(60):
        d = t({"image": img, "copy": img.copy()})
        np.testing.assert_array_equal(d["image"], d["copy"])
        seen.add(d["image"].tobytes())
    assert len(seen) == 8


def test_compare_stain_normalisation_script(prepared_dataset, capsys):
    """scripts/research/compare_stain_normalisation.py: one row per image, one column per setting;
    purple disks on pink keep their contrast under every normalisation."""
    import importlib.util

    from tests.conftest import REPO

    spec = importlib.util.spec_from_file_location("compare_stain_normalisation", REPO / "scripts" / "research" / "compare_stain_normalisation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    means = module.compare(str(prepared_dataset), settings=[(90, None), (None, 1.5)])
    assert list(means) == ["raw", "brightness 90.0, cap None", "brightness None, cap 1.5"]
    assert all(v > 0.9 for v in means.values()), means
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| synthetic-")]
    assert len(rows) == 2 and all(line.count("|") == 5 for line in rows)
    with pytest.raises(SystemExit, match="pairs"):
        module.compare(str(prepared_dataset), settings=[90])


def test_reinhard_source_stats_counts_each_colour_once_with_the_per_pixel_figures():
    """8-bit regions are pooled by colour (each weighted by its pixels): the white level, LAB means and
    stds of computing every pixel (np.percentile, rgb_to_lab); other dtypes take the per-pixel path."""
    from PIL import Image

    from custom.transforms import _standardise_brightness, reinhard_source_stats, rgb_to_lab
    from tests.conftest import require_monuseg

    root = require_monuseg()
    regions = [np.asarray(Image.open(root / "images" / f"{i}.png").convert("RGB"))[:300, :500]
               for i in ("TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5711-01Z-00-DX1")]
    rgb = np.concatenate([r.reshape(-1, 3) for r in regions]).astype(np.float64)[None] / 255.0
    for percentile in (None, 90.0, 37.3):
        white = None if percentile is None else float(np.percentile(rgb.mean(-1), percentile))
        lab = rgb_to_lab(_standardise_brightness(rgb, None, white)).reshape(-1, 3).astype(np.float64)
        expected = np.array([np.nan if white is None else white, *lab.mean(0), *lab.std(0)])
        np.testing.assert_allclose(reinhard_source_stats(regions, percentile), expected, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(reinhard_source_stats([r.astype(np.float32) for r in regions], percentile), expected,
                                   rtol=1e-9, atol=1e-9)


def test_reinhard_with_slide_statistics_looks_colours_up_with_the_same_values():
    """From a slide's second window on, 8-bit colours are computed once and looked up: the
    float32 results equal computing every pixel (float64 input takes the direct path)."""
    from PIL import Image

    from custom.transforms import reinhard_source_stats
    from tests.conftest import require_monuseg

    root = require_monuseg()
    windows = [np.asarray(Image.open(root / "images" / f"{i}.png").convert("RGB"))[:400, :300]
               for i in ("TCGA-A7-A13E-01Z-00-DX1", "TCGA-B0-5711-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1")]
    for percentile in (None, 90.0):
        source = reinhard_source_stats(windows[:2], percentile)
        normalise = ReinhardNormalize([56.3, 27.4, -11.8], [18.0, 9.1, 7.6], None, 1.5)
        for rgb in windows:
            x = torch.from_numpy(np.moveaxis(rgb, -1, 0).copy()).float() / 255  # ScaleIntensityRange's values
            direct = ReinhardNormalize([56.3, 27.4, -11.8], [18.0, 9.1, 7.6], None, 1.5)(x.numpy().astype(np.float64), source)
            np.testing.assert_array_equal(normalise(x, source).numpy(), direct)
        assert normalise._table is not None and normalise._table.known.sum() == len(np.unique(np.concatenate(windows[1:]).reshape(-1, 3), axis=0))
        off_grid = x + 1e-4  # not k / 255: computed directly, and the slide's table is kept
        np.testing.assert_array_equal(normalise(off_grid, source).numpy(),
                                      ReinhardNormalize([56.3, 27.4, -11.8], [18.0, 9.1, 7.6], None, 1.5)(off_grid.numpy().astype(np.float64), source))
        other = source + np.array([0, 1.0, 0, 0, 0, 0, 0])  # another slide: its first window computed directly, no table
        normalise(x, other)
        assert normalise._table is None


def test_reinhard_without_colour_table_computes_every_window_with_the_same_values():
    """``colour_table`` False (inference.json's ``stain_colour_table``) keeps no table; the values are
    those of the table; a non-boolean is refused."""
    rng = np.random.default_rng(0)
    windows = [torch.from_numpy(rng.integers(0, 256, (3, 40, 30)).astype(np.float32) / 255) for _ in range(3)]
    source = np.array([0.9, 60.0, 20.0, -10.0, 15.0, 8.0, 7.0])
    with_table = ReinhardNormalize([56.3, 27.4, -11.8], [18.0, 9.1, 7.6], None, 1.5)
    without = ReinhardNormalize([56.3, 27.4, -11.8], [18.0, 9.1, 7.6], None, 1.5, colour_table=False)
    for x in windows:
        np.testing.assert_array_equal(without(x, source).numpy(), with_table(x, source).numpy())
    assert with_table._table is not None and without._table is None
    with pytest.raises(ValueError, match="colour_table"):
        ReinhardNormalize([56.3, 27.4, -11.8], [18.0, 9.1, 7.6], colour_table="no")
