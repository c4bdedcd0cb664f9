import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.handlers import PostProcessing
from monai.transforms import Compose
from scipy import ndimage

from custom.inference.inferer import TiledAttentionInferer
from custom.model.networks import AttentionNet
from custom.inference.postprocess import AttentionToInstances, AttentionToInstancesd, attention_to_instances, fill_small_holes, keep_centred, local_threshold, local_threshold_mask, mask_to_instances, otsu_threshold


def _discs(shape=(64, 80), centres=((32, 29), (32, 51)), radius=12) -> np.ndarray:
    """Attention 1 inside the discs, 0 outside (float32)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    out = np.zeros(shape, np.float32)
    for cy, cx in centres:
        out[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = 1.0
    return out


def _assert_consecutive(labels: np.ndarray) -> None:
    assert labels.dtype == np.int32
    assert set(np.unique(labels)) - {0} == set(range(1, labels.max() + 1))


def test_two_touching_discs_are_split():
    attention = _discs()  # centres 22 px apart, radius 12: the discs overlap by 2 px
    labels = attention_to_instances(attention)
    assert labels.shape == attention.shape
    _assert_consecutive(labels)
    assert labels.max() == 2
    disc_area = (_discs(centres=((32, 29),)) > 0).sum()
    areas = np.bincount(labels.ravel())[1:]
    assert np.all(np.abs(areas - disc_area) <= 0.1 * disc_area), (areas, disc_area)
    # each instance is on its own side of the line between the centres
    cols = [np.nonzero(labels == i)[1].mean() for i in (1, 2)]
    assert sorted(round(c) for c in cols) == [29, 51]


def test_channel_first_and_torch_inputs():
    attention = _discs()
    ref = attention_to_instances(attention)
    np.testing.assert_array_equal(attention_to_instances(attention[None]), ref)
    np.testing.assert_array_equal(attention_to_instances(torch.as_tensor(attention)[None]), ref)
    np.testing.assert_array_equal(attention_to_instances(torch.as_tensor(attention, dtype=torch.bfloat16)), ref)


def test_empty_and_full_attention():
    empty = attention_to_instances(np.zeros((40, 50), np.float32))
    assert empty.shape == (40, 50) and empty.max() == 0 and empty.dtype == np.int32
    full = attention_to_instances(np.ones((40, 50), np.float32))
    assert full.shape == (40, 50)
    _assert_consecutive(full)
    assert full.max() >= 1 and (full > 0).all()


def test_morphology_removes_speck_and_min_size_removes_small_blob():
    attention = _discs(centres=((20, 20),), radius=8)
    attention[50, 60] = 1.0  # 1-pixel speck: removed by the opening
    labels = attention_to_instances(attention)
    assert labels.max() == 1 and labels[50, 60] == 0
    kept = attention_to_instances(attention, morphology_radii=())
    assert kept.max() == 2 and kept[50, 60] > 0
    # a 5 x 5 blob survives the morphology but not min_size=50
    attention[45:50, 55:60] = 1.0
    assert attention_to_instances(attention).max() == 2
    filtered = attention_to_instances(attention, min_size=50)
    _assert_consecutive(filtered)
    assert filtered.max() == 1 and filtered[47, 57] == 0 and filtered[20, 20] == 1


def test_threshold_is_respected():
    attention = 0.6 * _discs(centres=((20, 20),), radius=8) + 0.3 * _discs(centres=((20, 50),), radius=8)
    assert attention_to_instances(attention).max() == 1  # only the 0.6 disc is above 0.5
    assert attention_to_instances(attention, threshold=0.2).max() == 2
    assert attention_to_instances(attention, threshold=0.7).max() == 0


def test_nucleus_close_to_a_larger_one_is_kept():
    # a small disc 2 px from a large one has no maximum of its own within disk(7) (the large
    # disc is deeper there): it is kept as an instance unless fill_unmarked=False (the authors' code)
    large = _discs(shape=(60, 80), centres=((30, 25),), radius=14)
    attention = np.maximum(large, _discs(shape=(60, 80), centres=((30, 44),), radius=2))
    labels = attention_to_instances(attention)
    assert labels.max() == 2 and labels[30, 44] > 0 and labels[30, 44] != labels[30, 25]
    authors = attention_to_instances(attention, fill_unmarked=False)
    assert authors.max() == 1 and authors[30, 44] == 0


def test_mask_to_instances_matches_attention_path():
    attention = _discs()
    np.testing.assert_array_equal(mask_to_instances(attention > 0.5), attention_to_instances(attention))
    np.testing.assert_array_equal(mask_to_instances((attention > 0.5).astype(np.uint8)), attention_to_instances(attention))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": -0.1}, "threshold"),
        ({"morphology_radii": 2}, "morphology_radii"),
        ({"morphology_radii": (2, -1)}, "morphology_radii"),
        ({"morphology_radii": (1.5,)}, "morphology_radii"),
        ({"sigma": -1.0}, "sigma"),
        ({"footprint_radius": 0}, "footprint_radius"),
        ({"min_size": -3}, "min_size"),
        ({"threshold": "mean"}, "threshold"),
        ({"threshold": "otsu", "otsu_range": (0.7, 0.3)}, "otsu_range"),
        ({"threshold": "otsu", "otsu_range": (0.2, 1.5)}, "otsu_range"),
        ({"threshold": "otsu", "otsu_range": 0.5}, "otsu_range"),
        ({"attention_sigma": -1.0}, "attention_sigma"),
        ({"attention_sigma": float("nan")}, "attention_sigma"),
        ({"local_block_size": 4}, "local_block_size"),
        ({"local_block_size": 1}, "local_block_size"),
        ({"local_block_size": -3}, "local_block_size"),
        ({"local_block_size": 31.0}, "local_block_size"),
        ({"local_block_size": 31, "local_offset": float("nan")}, "local_offset"),
        ({"local_block_size": 31, "local_offset": "high"}, "local_offset"),
        ({"marker_h": -0.5}, "marker_h"),
        ({"marker_h": float("nan")}, "marker_h"),
        ({"marker_h": True}, "marker_h"),
        ({"marker_h": "deep"}, "marker_h"),
        ({"fill_holes": -1}, "fill_holes"),
        ({"fill_holes": 50.0}, "fill_holes"),
        ({"fill_holes": True}, "fill_holes"),
    ],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        attention_to_instances(np.zeros((8, 8), np.float32), **kwargs)
    with pytest.raises(ValueError, match=match):
        AttentionToInstances(**kwargs)


def _soft_discs(background: float, nucleus: float, seed: int = 0) -> np.ndarray:
    """Two discs at ``nucleus`` on a ``background`` level, with a little noise (a soft map)."""
    rng = np.random.default_rng(seed)
    base = background + (nucleus - background) * _discs()
    return np.clip(base + rng.normal(0, 0.02, base.shape), 0, 1).astype(np.float32)


def test_marker_h_merges_maxima_of_one_nucleus():
    """Two discs of radius 10 whose centres are 8 px apart are one lobed nucleus: the distance
    map has two maxima with a dip of under half a pixel between them, and the paper's markers
    (footprint 3) cut it in two; ``marker_h`` 0.5 makes them one marker. Discs 20 px apart (a
    dip of 4+ px) stay two at ``marker_h`` 2, and ``marker_h`` 0 is the paper's rule exactly."""
    lobed = _discs(centres=((32, 36), (32, 44)), radius=10)
    pair = _discs(centres=((32, 30), (32, 50)), radius=10)
    assert attention_to_instances(lobed, footprint_radius=3).max() == 2
    assert attention_to_instances(lobed, footprint_radius=3, marker_h=0.5).max() == 1
    assert mask_to_instances(lobed > 0.5, footprint_radius=3, marker_h=0.5).max() == 1
    assert attention_to_instances(pair, footprint_radius=3, marker_h=2.0).max() == 2
    for a in (lobed, pair, _discs()):
        assert np.array_equal(attention_to_instances(a, footprint_radius=3, marker_h=0.0), attention_to_instances(a, footprint_radius=3))
    out = AttentionToInstancesd(keys="pred", footprint_radius=3, marker_h=0.5)({"pred": torch.from_numpy(lobed)[None]})
    assert out["pred_instances"].shape == (1, 64, 80) and int(out["pred_instances"].max()) == 1


def _ring(radius: int = 12, hole: int = 6, size: int = 64) -> np.ndarray:
    """A vesicular nucleus: a disc of ``radius`` whose pale interior (radius ``hole``) fails the threshold."""
    yy, xx = np.mgrid[:size, :size]
    d = np.hypot(yy - size // 2, xx - size // 2)
    return ((d <= radius) & (d > hole)).astype(np.float32)


def test_fill_holes_makes_a_ring_one_solid_nucleus():
    """The rim of a nucleus with a pale centre (a ring 6 px thick) has its distance maxima all
    round the ring, and the paper's markers cut it into pieces; filling the hole (113 px)
    gives one solid instance. A cap below the hole's area leaves the ring as it was, and
    0 is the paper's rule exactly."""
    ring = _ring()
    hole_area = int(((ring == 0) & ndimage.binary_fill_holes(ring > 0)).sum())
    assert attention_to_instances(ring, footprint_radius=3).max() > 1
    solid = attention_to_instances(ring, footprint_radius=3, fill_holes=hole_area)
    assert solid.max() == 1 and (solid > 0).sum() == int(ndimage.binary_fill_holes(ring > 0).sum())
    assert np.array_equal(attention_to_instances(ring, footprint_radius=3, fill_holes=hole_area - 1),
                          attention_to_instances(ring, footprint_radius=3))
    assert np.array_equal(attention_to_instances(ring, footprint_radius=3, fill_holes=0), attention_to_instances(ring, footprint_radius=3))
    out = AttentionToInstancesd(keys="pred", footprint_radius=3, fill_holes=200)({"pred": torch.from_numpy(ring)[None]})
    assert out["pred_instances"].shape == (1, 64, 64) and int(out["pred_instances"].max()) == 1


def test_fill_small_holes_keeps_large_and_open_holes():
    """Only enclosed holes up to the cap are filled: a lumen larger than the cap and a gap
    open to the image border stay background."""
    seg = np.zeros((40, 60), bool)
    seg[5:15, 5:15] = True
    seg[8:11, 8:11] = False  # 9 px hole: filled
    seg[5:35, 25:55] = True
    seg[10:30, 30:50] = False  # 400 px lumen: kept
    seg[20:40, 17:21] = True
    seg[25:40, 18:20] = False  # a slot open to the bottom border: not a hole
    out = fill_small_holes(seg, 100)
    assert out[8:11, 8:11].all() and not out[10:30, 30:50].any() and not out[25:40, 18:20].any()
    assert np.array_equal(fill_small_holes(seg, 0), seg) and fill_small_holes(seg, 400)[10:30, 30:50].all()


def test_otsu_threshold_adapts_to_each_map():
    # the same two nuclei on a dim and on a bright map: 0.5 misses them in one and floods the other
    dim, bright = _soft_discs(0.2, 0.45), _soft_discs(0.55, 0.8)
    assert attention_to_instances(dim, threshold=0.5).max() == 0
    assert attention_to_instances(bright, threshold=0.5).max() == 1  # everything is one blob
    t_dim, t_bright = otsu_threshold(dim, (0.0, 1.0)), otsu_threshold(bright, (0.0, 1.0))
    assert 0.2 < t_dim < 0.45 and 0.55 < t_bright < 0.8
    for m in (dim, bright):
        labels = attention_to_instances(m, threshold="otsu", otsu_range=(0.0, 1.0))
        assert labels.max() == 2
        _assert_consecutive(labels)


def test_otsu_range_keeps_a_map_without_nuclei_empty():
    rng = np.random.default_rng(1)
    stroma = np.clip(rng.normal(0.25, 0.05, (64, 64)), 0, 1).astype(np.float32)  # one mode, no nuclei
    assert attention_to_instances(stroma, threshold="otsu", otsu_range=(0.0, 1.0), min_size=10).max() > 0  # split in two
    assert otsu_threshold(stroma) == 0.4  # the default range's lower bound
    assert attention_to_instances(stroma, threshold="otsu", min_size=10).max() == 0
    assert otsu_threshold(np.full((8, 8), 0.9, np.float32)) == 0.6  # a constant map: the bound, no crash
    assert otsu_threshold(torch.as_tensor(_soft_discs(0.2, 0.45))[None], (0.0, 1.0)) == pytest.approx(
        otsu_threshold(_soft_discs(0.2, 0.45), (0.0, 1.0)))


def test_attention_blur_before_the_threshold():
    rng = np.random.default_rng(2)
    noisy = np.clip(_discs() * 0.6 + 0.2 + rng.normal(0, 0.25, _discs().shape), 0, 1).astype(np.float32)
    speckled = attention_to_instances(noisy, threshold=0.5, morphology_radii=(), min_size=0)
    blurred = attention_to_instances(noisy, threshold=0.5, morphology_radii=(), min_size=0, attention_sigma=2.0)
    assert speckled.max() > 10  # noise above 0.5 everywhere makes specks
    assert blurred.max() == 2  # the two discs, nothing else
    assert np.array_equal(attention_to_instances(noisy, attention_sigma=0.0), attention_to_instances(noisy))


def _ramp_with_discs() -> tuple[np.ndarray, np.ndarray]:
    """Background rising from 0.3 (left) to 0.7 (right), two discs 0.25 above it, one on each side."""
    h, w = 64, 128
    yy, xx = np.mgrid[:h, :w]
    discs = ((yy - 32) ** 2 + (xx - 30) ** 2 < 8 ** 2) | ((yy - 32) ** 2 + (xx - 98) ** 2 < 8 ** 2)
    return (0.3 + 0.4 * xx / (w - 1) + 0.25 * discs).astype(np.float32), discs


def test_local_threshold_follows_an_uneven_background():
    attention, discs = _ramp_with_discs()
    # one threshold per map floods the bright side: the right disc drowns in its background
    flooded = attention_to_instances(attention, threshold=0.5, min_size=0) > 0
    assert flooded.sum() > 5 * discs.sum()
    # above the neighbourhood's mean by 0.1: the two discs, nothing else
    mask = local_threshold_mask(attention, block_size=61, offset=0.1)
    assert (mask & discs).sum() / (mask | discs).sum() > 0.8
    # skimage's threshold_local in float64 (computed here in float32): the same mask but for ties
    from skimage.filters import threshold_local
    reference_threshold = threshold_local(attention.astype(np.float64), 61, method="gaussian", offset=-0.1)
    assert (mask != (attention > reference_threshold)).mean() < 1e-4
    # the threshold map itself (shared with the research scripts): float32, within float32 rounding of skimage's
    threshold = local_threshold(attention, 61, 0.1)
    assert threshold.dtype == np.float32 and np.abs(threshold - reference_threshold).max() < 1e-5
    with pytest.raises(ValueError, match="block_size"):
        local_threshold(attention, 0, 0.1)
    labels = attention_to_instances(attention, threshold=0.0, local_block_size=61, local_offset=0.1, min_size=0)
    assert labels.max() == 2
    _assert_consecutive(labels)
    assert ((labels > 0) & discs).sum() / ((labels > 0) | discs).sum() > 0.8
    # it narrows the global threshold's mask, never widens it; block 0 is the paper's pipeline
    both = attention_to_instances(attention, threshold=0.6, local_block_size=61, local_offset=0.1, min_size=0) > 0
    assert not (both & ~(attention_to_instances(attention, threshold=0.6, min_size=0) > 0)).any()
    assert np.array_equal(attention_to_instances(attention, local_block_size=0, local_offset=0.3), attention_to_instances(attention))
    with pytest.raises(ValueError, match="block_size >= 3"):
        local_threshold_mask(attention, block_size=0)
    with pytest.raises(ValueError, match="NaN"):
        local_threshold_mask(np.full((8, 8), np.nan, np.float32), block_size=3)


def test_local_threshold_through_the_transforms():
    attention, _ = _ramp_with_discs()
    out = AttentionToInstancesd(keys="pred", threshold=0.0, local_block_size=61, local_offset=0.1, min_size=0)(
        {"pred": torch.as_tensor(attention)[None]})
    assert int(out["pred_instances"].max()) == 2


def test_otsu_through_the_transforms():
    m = _soft_discs(0.55, 0.8)
    out = AttentionToInstancesd(keys="pred", threshold="otsu", otsu_range=(0.0, 1.0))({"pred": torch.as_tensor(m)[None]})
    assert out["pred_instances"].shape == (1, *m.shape) and int(out["pred_instances"].max()) == 2


def test_invalid_inputs():
    with pytest.raises(ValueError, match=r"attention must have shape \(H, W\) or \(1, H, W\)"):
        attention_to_instances(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        attention_to_instances(np.full((8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="mask must have shape"):
        mask_to_instances(np.zeros((1, 1, 8, 8)))
    with pytest.raises(ValueError, match="output_key"):
        AttentionToInstancesd(keys=["a", "b"], output_key="x")


def test_array_transform_keeps_type_and_channel():
    attention = _discs()
    out = AttentionToInstances()(MetaTensor(torch.as_tensor(attention)[None], meta={"filename_or_obj": "x.png"}))
    assert isinstance(out, MetaTensor) and out.shape == (1, 64, 80) and out.dtype == torch.int32
    assert out.meta["filename_or_obj"] == "x.png" and out.max().item() == 2
    out_np = AttentionToInstances()(attention)
    assert isinstance(out_np, np.ndarray) and out_np.shape == (64, 80) and out_np.dtype == np.int32


def test_dict_transform_in_compose():
    post = Compose([AttentionToInstancesd(keys="pred", min_size=10)])
    d = post({"pred": torch.as_tensor(_discs())[None], "image": torch.zeros(3, 64, 80)})
    assert d["pred_instances"].shape == (1, 64, 80) and d["pred_instances"].max().item() == 2
    assert torch.equal(d["pred"], torch.as_tensor(_discs())[None])  # the attention is kept
    d = AttentionToInstancesd(keys="pred", output_key="label_pred")({"pred": _discs()})
    assert d["label_pred"].max() == 2


@pytest.mark.parametrize("via_handler", [False, True])
def test_monai_evaluator_postprocessing(via_handler):
    # the bundle path: SupervisedEvaluator + TiledAttentionInferer + postprocessing transform
    net = AttentionNet(width=2, dilations=(1,)).eval()
    post = Compose([AttentionToInstancesd(keys="pred")])
    kwargs = {"val_handlers": [PostProcessing(transform=post)]} if via_handler else {"postprocessing": post}
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=[{"image": torch.randn(2, 3, 24, 20)}],
        network=net,
        inferer=TiledAttentionInferer(roi_size=16, tta=False),
        **kwargs,
    )
    evaluator.run()
    out = evaluator.state.output
    assert len(out) == 2
    for item in out:
        assert item["pred_instances"].shape == (1, 24, 20) and item["pred_instances"].dtype == torch.int32
        np.testing.assert_array_equal(item["pred_instances"][0].numpy(), attention_to_instances(item["pred"]))


def test_keep_centred_keeps_nuclei_centred_in_the_core():
    labels = np.zeros((20, 20), np.int32)
    labels[2:6, 2:6] = 3  # centroid (3.5, 3.5) -> pixel (3, 3): inside the core [3, 10)
    labels[12:16, 2:6] = 5  # centroid row 13.5: below the core
    labels[4:10, 8:18] = 7  # centroid (6.5, 12.5) -> pixel (6, 12): inside the core, though it reaches past it; 60 pixels
    out = keep_centred(labels, (3, 3, 10, 13))
    assert out.dtype == np.int32 and out.max() == 2  # renumbered 1..N
    assert set(np.unique(out[labels == 3])) == {1} and set(np.unique(out[labels == 7])) == {2}
    assert not out[labels == 5].any()
    capped = keep_centred(labels, (3, 3, 10, 13), max_size=59)  # the 60-pixel instance is too large
    assert capped.max() == 1 and not capped[labels == 7].any()
    assert keep_centred(np.zeros((4, 4), np.int32), (0, 0, 4, 4)).max() == 0


def test_fast_steps_equal_the_library_functions(monkeypatch):
    """The faster steps of mask_to_instances give exactly what the skimage/scipy calls they replace give."""
    from skimage.feature import peak_local_max
    from skimage.morphology import disk, reconstruction
    from skimage.segmentation import watershed

    from custom.inference import postprocess

    rng = np.random.default_rng(0)
    for radius in range(1, 10):
        image = rng.random((40, 50))
        image[rng.random(image.shape) < 0.3] = 0.5  # ties
        assert np.array_equal(postprocess._disk_maximum(image, radius), ndimage.maximum_filter(image, footprint=disk(radius), mode="nearest"))
    for k in range(20):
        seg = ndimage.binary_opening(rng.random((60, 70)) < 0.6)
        distance = ndimage.gaussian_filter(ndimage.distance_transform_edt(seg), 1.0 if k % 2 else 0.0)
        peaks = np.zeros(seg.shape, bool)
        peaks[tuple(peak_local_max(distance, footprint=disk(3), labels=seg.astype(np.int32), exclude_border=False).T)] = True
        assert np.array_equal(postprocess._footprint_peaks(distance, seg, 3), peaks)
        # skimage's reconstruction of the distance rounded to 1/256 px above its floor (h = 0.5: 128 steps)
        step = 1 / postprocess.MARKER_LEVELS_PER_PIXEL
        rounded = distance.min() + np.rint((distance - distance.min()) / step) * step
        expected = reconstruction(rounded - 0.5, rounded, method="dilation", footprint=np.ones((3, 3), bool))
        assert np.allclose(postprocess._lowered_reconstruction(distance, 0.5), expected, rtol=0, atol=1e-12)
        assert np.abs(postprocess._lowered_reconstruction(distance, 0.5)  # within the rounding of the exact one
                      - reconstruction(distance - 0.5, distance, method="dilation", footprint=np.ones((3, 3), bool))).max() <= step / 2 + 1e-12
        with monkeypatch.context() as m:  # without skimage's private loop: its public function on the rounded map
            m.setattr(postprocess, "_reconstruction_loop", None)
            assert np.allclose(postprocess._lowered_reconstruction(distance, 0.5), expected, rtol=0, atol=1e-12)
        for flat in (np.zeros((5, 6)), np.pad(np.full((2, 2), 0.3), 2)):  # no top rises 0.5 above the floor
            rounded = np.rint(flat / step) * step
            assert np.allclose(postprocess._lowered_reconstruction(flat, 0.5),
                               reconstruction(rounded - 0.5, rounded, method="dilation", footprint=np.ones((3, 3), bool)), rtol=0, atol=1e-12)
        markers, n_markers = ndimage.label(peaks, structure=np.ones((3, 3), bool))
        markers[rng.random(seg.shape) < 0.002] = 0  # some components without a marker
        flooded, reference = postprocess._watershed(distance, markers, n_markers, seg), watershed(-distance, markers, mask=seg)
        # the same; on the unblurred distance (many exact ties between markers) but for a few tied pixels
        assert np.array_equal(flooded, reference) if k % 2 else (flooded != reference).mean() < 0.005
        holes = ndimage.label(ndimage.binary_fill_holes(seg) & ~seg)[0]
        small = np.bincount(holes.ravel()) <= 4
        small[0] = False
        assert np.array_equal(fill_small_holes(seg, 4), seg | small[holes])
