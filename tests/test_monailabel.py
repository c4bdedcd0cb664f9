"""The bundle served by MONAI Label (``monaibundle`` app, and ``monailabel_app/`` for QuPath/DSA).

MONAI Label's ``BundleInferTask`` (monailabel 0.8.5, ``monailabel/tasks/infer/bundle.py``)
reads from ``configs/inference.json``: ``network_def``, ``preprocessing``, ``inferer``,
``postprocessing``, ``device`` and ``bundle_root``; from ``configs/metadata.json``: the first
``network_data_format`` input and output keys and the output ``channel_def``; and loads
``models/model.pt`` itself (``basic_infer.py``). Importing that class needs torchvision
(``monailabel/transform/post.py`` imports ``torchvision.utils`` at module level), whose
registry wheels are CUDA builds that cannot load against the CPU torch used here, so
:func:`test_bundle_infer_task_real` runs only where MONAI Label imports; the other tests
repeat its steps line by line (cited) on real MoNuSeg images and a real slide.

Shapes: images ``(3, H, W)``; attention ``(1, H, W)`` float in [0, 1]; instance maps
``(1, H, W)`` int32 (0 background); polygons in level-0 slide pixels.
"""

from __future__ import annotations

import copy
import csv
import json

import numpy as np
import pytest
import torch

from tests.conftest import CMU_SLIDE, REPO, require_backend, require_monuseg, require_slide, synthetic_he

BUNDLE = REPO / "bundle"
CONFIG = BUNDLE / "configs" / "inference.json"
METADATA = BUNDLE / "configs" / "metadata.json"
MODEL = BUNDLE / "models" / "model.pt"
VAL_IMAGE = "TCGA-A7-A13E-01Z-00-DX1"  # a validation image of the committed evaluation (results/model/per_image.csv)


def _bundle_config(**overrides):
    """``BundleInferTask._load_bundle_config`` (bundle.py L309-313): a ConfigParser on
    inference.json with ``bundle_root`` set to the bundle folder; then
    ``_update_device`` (L300-307) with the request's device ("cpu" here)."""
    from monai.bundle import ConfigItem, ConfigParser

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser.config.update({"bundle_root": str(BUNDLE), **overrides})
    parser.config.update({"device": "cpu"})
    if parser.ref_resolver.items.get("device"):
        parser.ref_resolver.items["device"] = ConfigItem(config="cpu", id="device")
    return parser


def _transforms(parser, key: str) -> list:
    """``pre_transforms`` / ``post_transforms`` (bundle.py L198-201, L261-264): the Compose's transforms."""
    from monai.transforms import Compose

    c = parser.get_parsed_content(key, instantiate=True)
    return list(c.transforms) if isinstance(c, Compose) else c


def _network(parser):
    """The network as MONAI Label builds and loads it: ``network_def`` instantiated
    (bundle.py L119-121), then ``BasicInferTask._get_network`` (basic_infer.py L465-486):
    deepcopy, ``torch.load(models/model.pt)`` with torch's default (weights_only),
    ``checkpoint.get("model", checkpoint)``, ``load_state_dict(strict=load_strict)``
    (BundleInferTask's default ``load_strict=False``, bundle.py L90), ``eval()``."""
    template = parser.get_parsed_content("network_def", instantiate=True)
    network = copy.deepcopy(template)
    checkpoint = torch.load(str(MODEL), map_location=torch.device("cpu"))
    state = checkpoint.get("model", checkpoint)
    assert set(template.state_dict()) == set(state), "model.pt keys differ from network_def's: MONAI Label would load it partially"
    result = network.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys
    return network.eval()


def _infer(parser, network, data: dict) -> dict:
    """``BasicInferTask.__call__`` (basic_infer.py L279-313): pre-transforms, ``run_inferer``
    (L501-525: ``inputs[None]``, ``inferer(inputs, network)`` under no_grad, ``outputs[0]``
    stored under "pred"), post-transforms."""
    data = dict(data)
    for t in _transforms(parser, "preprocessing"):
        data = t(data)
    inferer = parser.get_parsed_content("inferer", instantiate=True)
    inputs = data["image"] if torch.is_tensor(data["image"]) else torch.from_numpy(data["image"])
    with torch.no_grad():
        data["pred"] = inferer(inputs[None].to("cpu"), network)[0]
    for t in _transforms(parser, "postprocessing"):
        data = t(data)
    return data


def test_metadata_keys_monailabel_reads():
    """bundle.py L133-147: the first input / output keys of ``network_data_format`` name the
    image and prediction keys, ``channel_def`` of the output gives the labels (all but
    "background"), ``len(spatial_shape)`` the dimension."""
    metadata = json.loads(METADATA.read_text())
    key_image, image = next(iter(metadata["network_data_format"]["inputs"].items()))
    key_pred, pred = next(iter(metadata["network_data_format"]["outputs"].items()))
    assert (key_image, key_pred) == ("image", "pred"), "preprocessing reads 'image' and postprocessing writes 'pred'"
    assert len(image.get("spatial_shape") or []) == 2, "MONAI Label takes the dimension from spatial_shape (3 when absent)"
    labels = {v.lower(): int(k) for k, v in pred.get("channel_def", {}).items() if v.lower() != "background"}
    assert labels and min(labels.values()) >= 1, f"labels {labels}: the nucleus label must not be 0 (background)"


def test_preprocessing_leaves_whole_slide_windows_unchanged():
    """The loader added in front of ``preprocessing`` passes SlideWindowDataset's items
    (``image`` uint8 (3, h, w) plus per-slide ``stain``) through as the same objects, so
    scripts/segment.py normalises windows exactly as before."""
    from custom.wsi.load_region import LoadRegiond
    from custom.transforms import reinhard_source_stats

    parser = _bundle_config()
    transforms = _transforms(parser, "preprocessing")
    assert isinstance(transforms[0], LoadRegiond)
    rgb = synthetic_he(96, 128)
    item = {"image": np.ascontiguousarray(np.moveaxis(rgb, -1, 0)), "stain": reinhard_source_stats([rgb]), "slide": 0}
    out = transforms[0](item)
    assert out.keys() == item.keys() and all(out[k] is item[k] for k in item)


def test_region_box_clips_and_scales():
    """Requested level-0 regions (x, y, width, height) -> analysis-grid boxes (y0, x0, y1, x1)."""
    from custom.wsi.load_region import region_box

    assert region_box((1000, 800), 1.0) == (0, 0, 1000, 800)  # no region: the whole image
    assert region_box((1000, 800), 1.0, (0, 0), (2048, 2048)) == (0, 0, 1000, 800)  # MONAI Label's default size, clipped
    assert region_box((1000, 800), 0.5, (100, 40), (30, 20)) == (80, 200, 120, 260)  # 20x slide read at 40x
    assert region_box((1000, 800), 1.0, (100, 40), (30, 20), level_downsample=4.0) == (40, 100, 120, 220)
    with pytest.raises(ValueError, match="outside the slide"):
        region_box((1000, 800), 1.0, (900, 10), (50, 50))


def test_monailabel_steps_on_monuseg_match_the_evaluation():
    """One MONAI Label inference on a real MoNuSeg validation image through the bundle's
    keys (image given as a file path, 40x stated in the request) gives the instances the
    bundle's own evaluation scored: the same number of nuclei and the same AJI against the
    ground truth as ``results/model/per_image.csv``, within bfloat16 rounding."""
    from custom.data.prepared import load_label
    from custom.evaluation.metrics import aji
    from custom.model.checkpoint import load_attention_weights

    root = require_monuseg()
    image = root / "images" / f"{VAL_IMAGE}.png"
    label = root / "labels" / f"{VAL_IMAGE}.png"
    if not (image.is_file() and label.is_file()):
        pytest.skip(f"{VAL_IMAGE} not in {root}")
    parser = _bundle_config()
    network = _network(parser)
    reference = load_attention_weights(parser.get_parsed_content("network_def", instantiate=True), str(MODEL))
    ref_state = reference.state_dict()
    for k, v in network.state_dict().items():
        assert torch.equal(v, ref_state[k]) if isinstance(v, torch.Tensor) else v == ref_state[k], k
    assert network.stain_target == reference.stain_target and network.postprocess == reference.postprocess

    path = str(image)
    data = _infer(parser, network, {"image": path, "image_path": path, "device": "cpu", "base_magnification": 40})
    pred = data["pred"]
    assert pred.shape == (1, 1000, 1000) and pred.dtype == torch.int32  # Restored (bundle.py L269) resizes nothing
    ids = np.unique(pred.numpy())
    n = len(ids) - 1
    assert ids[0] == 0 and np.array_equal(ids, np.arange(n + 1))
    score = aji(load_label(label), pred.numpy()[0])
    rows = {r["id"]: r for r in csv.DictReader((REPO / "results" / "model" / "per_image.csv").open())}
    assert VAL_IMAGE in rows, "the committed evaluation no longer lists this image"
    ref_n, ref_aji = float(rows[VAL_IMAGE]["n_pred"]), float(rows[VAL_IMAGE]["aji"])
    assert abs(n - ref_n) <= 0.02 * ref_n, f"{n} nuclei, the evaluation found {ref_n:g}"
    assert abs(score - ref_aji) <= 0.01, f"AJI {score:.4f}, the evaluation scored {ref_aji:.4f}"


def test_slide_tiles_give_whole_nuclei_once():
    """Two adjacent 256x256 tiles of the real 20x CMU slide, requested as QuPath does
    (level-0 ``location`` (x, y) and ``size``), with the app's context: every polygon is
    valid, its centroid lies in its own tile (level-0 pixels), and no nucleus on the
    seam is returned by both tiles."""
    from shapely.geometry import Polygon

    from monailabel_app.lib.transforms import NucleiToPolygonsd

    slide = str(require_slide(CMU_SLIDE))
    require_backend("cucim")
    parser = _bundle_config(tta=False)
    network = _network(parser)
    context = int(parser.get_parsed_content("halo")) + int(network.receptive_radius)
    to_polygons = NucleiToPolygonsd(keys="pred", max_nucleus_um2=float(parser["max_nucleus_um2"]), tolerance=float(parser["polygon_tolerance"]))
    tiles = []
    for x in (1000, 1256):
        request = {"image": slide, "image_path": slide, "device": "cpu", "location": [x, 1000], "size": [256, 256], "level": 0,
                   "context": context, "min_poly_area": 20}
        data = to_polygons(_infer(parser, network, request))
        assert data["scale_to_level0"] == pytest.approx(0.5, abs=0.01)  # 20x slide analysed at 40x
        annotation = data["result"]["annotation"]
        assert annotation["location"] == [x, 1000] and annotation["size"] == [256, 256]
        contours = [c for e in annotation["elements"] for c in e["contours"]]
        assert len(contours) <= int(data["pred"].max())  # one per kept nucleus, less those under min_poly_area
        polygons = [Polygon(c) for c in contours]
        assert len(polygons) >= 20, f"only {len(polygons)} nuclei in a 256x256 tile of tissue"
        for p in polygons:
            assert p.is_valid and p.area >= 20
            cx, cy = p.centroid.x, p.centroid.y
            assert x - 2 <= cx <= x + 258 and 998 <= cy <= 1258, (cx, cy)
        tiles.append(polygons)
    left, right = tiles
    seam = [p for p in left if p.bounds[2] > 1250] + [p for p in right if p.bounds[0] < 1262]
    assert seam, "no nucleus near the seam: the tiles test nothing"
    doubles = [(a, b) for a in left for b in right if a.intersects(b) and a.intersection(b).area > 0.5 * min(a.area, b.area)]
    assert not doubles, f"{len(doubles)} nuclei returned by both tiles"


def test_bundle_infer_task_real():
    """MONAI Label's own ``BundleInferTask`` on the bundle (where monailabel imports): the
    stock task returns the same instance map as the steps above, and the app's task
    returns one polygon per nucleus."""
    try:
        from monailabel.tasks.infer.bundle import BundleInferTask
    except (ImportError, RuntimeError, OSError) as e:  # torchvision's CUDA-built ops fail with RuntimeError
        pytest.skip(f"MONAI Label cannot be imported here: {type(e).__name__}: {e}")
    root = require_monuseg()
    image = str(root / "images" / f"{VAL_IMAGE}.png")
    request = {"image": image, "device": "cpu", "base_magnification": 40, "location": [200, 300], "size": [320, 256]}

    task = BundleInferTask(str(BUNDLE), {})
    assert task.is_valid() and task.dimension == 2 and task.key_image == "image" and task.key_pred == "pred"
    _, data = task({**request, "skip_writer": True})
    parser = _bundle_config()
    expected = _infer(parser, _network(parser), {**request, "image_path": image})["pred"]
    assert torch.equal(torch.as_tensor(data["pred"]), expected)

    from monailabel_app.lib.infers import NucleiBundleInferTask

    app_task = NucleiBundleInferTask(str(BUNDLE), {})
    assert app_task.info()["pathology"] and app_task.labels == {"Nucleus": 1}
    _, result = app_task({**request, "output": "json", "result_write_to_file": False})
    contours = [c for e in result["annotation"]["elements"] for c in e["contours"]]
    assert len(contours) >= 20
    xy = np.concatenate([np.asarray(c) for c in contours])
    assert xy[:, 0].min() >= 200 - 60 and xy[:, 0].max() <= 520 + 60 and xy[:, 1].min() >= 300 - 60 and xy[:, 1].max() <= 556 + 60
