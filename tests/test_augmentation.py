"""custom.training.augmentation and the self-training augmentation of bundle/configs/selftrain.json: JPEG
re-encoding, photometric transforms leave the target alone, geometric ones keep it on the image."""

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from custom.training.augmentation import RandJPEG, RandJPEGd, jpeg_roundtrip
from tests.conftest import REPO, require_monuseg

CONFIGS = [str(REPO / f"bundle/configs/{name}.json") for name in ("train", "distill", "selftrain")]
PHOTOMETRIC = ("aug_hed_prob", "aug_blur_prob", "aug_noise_prob", "aug_jpeg_prob")


def _real_rgb(size: int = 192) -> np.ndarray:
    """A crop of a real MoNuSeg image, ``(3, size, size)`` float32 in [0, 1]."""
    from custom.data.prepared import load_rgb

    root = require_monuseg()
    image = sorted((root / "images").glob("*.png"))[0]
    return np.ascontiguousarray(np.moveaxis(load_rgb(image)[200 : 200 + size, 300 : 300 + size], -1, 0), dtype=np.float32) / 255.0


def _dark_mask(rgb) -> torch.Tensor:
    """Where the image is dark (nuclei): a target channel that is a function of the pixels."""
    return (torch.as_tensor(rgb).mean(0) < 0.45).float()


def _augmentation(**overrides) -> list:
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    for key, value in overrides.items():
        parser[key] = value
    return parser.get_parsed_content("selftrain#augmentation")


def test_jpeg_roundtrip_keeps_shape_type_and_range_and_loses_more_at_low_quality():
    rgb = _real_rgb()
    low, high = jpeg_roundtrip(rgb, 10), jpeg_roundtrip(rgb, 95)
    assert low.shape == rgb.shape and low.dtype == np.float32 and 0.0 <= low.min() and low.max() <= 1.0
    assert 0 < np.abs(high - rgb).mean() < np.abs(low - rgb).mean() < 0.1
    out = jpeg_roundtrip(torch.as_tensor(rgb), 50)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="quality"):
        RandJPEG(quality=(0, 50))


def test_rand_jpeg_draws_in_range_and_dict_version_touches_its_keys_only():
    rgb = _real_rgb(64)
    t = RandJPEG(quality=(20, 40)).set_random_state(0)
    qualities = set()
    for _ in range(20):
        t.randomize()
        qualities.add(t._quality)
    assert qualities <= set(range(20, 41)) and len(qualities) > 3
    label = torch.rand(2, 64, 64)
    out = RandJPEGd("image", quality=(30, 30))({"image": rgb, "label": label})
    np.testing.assert_array_equal(out["image"], jpeg_roundtrip(rgb, 30))
    assert out["label"] is label
    same = RandJPEGd("image", prob=0.0)({"image": rgb})
    assert same["image"] is rgb


def test_photometric_augmentation_changes_the_image_only():
    rgb = _real_rgb()
    label = torch.stack([_dark_mask(rgb), torch.ones(rgb.shape[1:])])
    transforms = _augmentation(aug_scale_prob=0.0, selftrain_crop_size=192, selftrain_crops_per_image=1,
                               **{key: 1.0 for key in PHOTOMETRIC})
    photometric = transforms[3:]
    assert [type(t).__name__ for t in photometric] == ["RandHEDJitterd", "RandGaussianSmoothd", "RandGaussianNoised", "RandJPEGd"]
    d = {"image": torch.as_tensor(rgb), "label": label.clone()}
    for t in photometric:
        t.set_random_state(1)
        d = t(d)
    torch.testing.assert_close(torch.as_tensor(d["label"]), label)
    assert float(torch.as_tensor(d["image"]).sub(torch.as_tensor(rgb)).abs().mean()) > 0.005


@pytest.mark.parametrize("seed", range(4))
def test_geometric_augmentation_keeps_the_target_on_the_image(seed):
    """Crop, dihedral element and scale +-20 % (forced) move image and target together: the target, a
    function of the image's pixels, still matches the augmented image, and padding is ignored."""
    rgb = _real_rgb()
    label = torch.stack([_dark_mask(rgb), torch.ones(rgb.shape[1:])])
    transforms = _augmentation(aug_scale_prob=1.0, selftrain_crop_size=160, selftrain_crops_per_image=2,
                               **{key: 0.0 for key in PHOTOMETRIC})
    samples = _apply(transforms, {"image": torch.as_tensor(rgb), "label": label}, seed)
    assert len(samples) == 2
    for s in samples:
        image, target = torch.as_tensor(s["image"]), torch.as_tensor(s["label"])
        assert image.shape == (3, 160, 160) and target.shape == (2, 160, 160)
        assert set(torch.unique(target).tolist()) <= {0.0, 1.0}
        valid = target[1] > 0
        agreement = float((_dark_mask(image)[valid] == target[0][valid]).float().mean())
        assert agreement > 0.95
        misaligned = float((_dark_mask(torch.flip(image, dims=(-1,)))[valid] == target[0][valid]).float().mean())
        assert misaligned < agreement - 0.05


def test_zooming_out_ignores_the_padded_border():
    rgb = _real_rgb(160)
    label = torch.stack([_dark_mask(rgb), torch.ones(rgb.shape[1:])])
    transforms = _augmentation(aug_scale_prob=1.0, selftrain_crop_size=160, selftrain_crops_per_image=1,
                               **{"selftrain#augmentation#2#max_zoom": 0.8}, **{key: 0.0 for key in PHOTOMETRIC})
    (s,) = _apply(transforms, {"image": torch.as_tensor(rgb), "label": label}, 0)
    weight = torch.as_tensor(s["label"])[1]
    assert (weight[:14] == 0).all() and (weight[-14:] == 0).all() and (weight[:, :14] == 0).all()
    assert (weight[18:-18, 18:-18] == 1).all()
    assert float(torch.as_tensor(s["image"])[:, :14].mean()) > 0.2  # the image is reflected, not black


def _apply(transforms, item: dict, seed: int) -> list[dict]:
    samples = [item]
    for t in transforms:
        t.set_random_state(seed)
        outputs = [t(s) for s in samples]
        samples = [o for out in outputs for o in (out if isinstance(out, list) else [out])]
    return samples


def test_pale_paste_research_transform_adds_labelled_copies_where_it_changes_the_image():
    """scripts/research/pale_paste.py: the pasted copies are foreground of weight 1 where the image
    changed; the crop's own instances keep their pixels elsewhere; a bad opacity is refused; its override
    file puts it right after selftrain.json's crop."""
    from scipy import ndimage

    from scripts.research.pale_paste import RandPastePaleNucleid

    rgb = _real_rgb()
    blobs, _ = ndimage.label(ndimage.binary_opening(_dark_mask(rgb).numpy() > 0, iterations=2))
    foreground = np.isin(blobs, np.flatnonzero(np.bincount(blobs.ravel()) >= 50)[1:]).astype(np.float32)  # nucleus-sized dark blobs
    assert foreground.any()
    target = np.stack([foreground, np.ones_like(foreground)]).astype(np.float32)
    for number in (1, 6):  # later copies may carve a 1-px gap into earlier ones: foreground checked with one
        paste = RandPastePaleNucleid(["image", "label"], number=number, opacity=(0.5, 0.5), touching=1.0)
        paste.set_random_state(0)
        out = paste({"image": torch.from_numpy(rgb.copy()), "label": torch.from_numpy(target.copy())})
        changed, label = np.any(out["image"].numpy() != rgb, axis=0), out["label"].numpy()
        assert changed.sum() > 50 * number and np.all(label[1][changed] == 1)
        assert number > 1 or np.all(label[0][changed] == 1)
        untouched = ~ndimage.binary_dilation(changed)
        assert np.array_equal(label[0][untouched], foreground[untouched])
    with pytest.raises(ValueError, match="opacity"):
        RandPastePaleNucleid(["image", "label"], opacity=(0.0, 1.0))
    parser = ConfigParser()
    parser.read_config([*CONFIGS, str(REPO / "scripts/research/pale_paste.json")])
    parser["bundle_root"] = str(REPO / "bundle")
    names = [type(t).__name__ for t in parser.get_parsed_content("selftrain#preprocessing").transforms]
    assert names[names.index("RandSpatialCropSamplesd") + 1] == "RandPastePaleNucleid"
