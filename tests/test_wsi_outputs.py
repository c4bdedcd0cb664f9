"""Whole-slide inference through the bundle (inference.json): stitching, output files, resume.

Most tests use a small real attention network (width 4, dilations 1 and 2) whose
head starts at zero with the hematoxylin logit prior, so it segments the
hematoxylin-dark nuclei of the generated slides without training; one test runs
the shipped model on a real MoNuSeg image through scripts/segment.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow
from PIL import Image

from custom.transforms import IMAGENET_MEAN, IMAGENET_STD
from custom.model.networks import AttentionNet
from custom.model.checkpoint import save_attention_network
from custom.transforms import reinhard_stats
from tests.slides import write_pyramidal_tiff
from custom.wsi.writer import complete_slides
from tests.conftest import CMU_SLIDE, REPO, TCGA_SLIDE, require_backend, require_monuseg, require_slide, synthetic_he

shapely = pytest.importorskip("shapely")
from shapely.geometry import Polygon, box  # noqa: E402

SMALL = {"width": 4, "dilations": [1, 2]}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """F of width 4 = the hematoxylin prior at the start of training, with a running tau
    halfway between the stroma's and the nuclei's logits on a synthetic image."""
    image = synthetic_he(256, 256, tissue_fraction=1.0, seed=3)
    net = AttentionNet(eta=20, stain_prior="logit", stain_prior_gain=2.0, stain_target=reinhard_stats([image]),
                       stain_settings={"brightness_percentile": 90.0, "max_std_ratio": None}, **SMALL).eval()
    x = (torch.as_tensor(np.moveaxis(image, -1, 0)[None] / 255.0, dtype=torch.float32) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
    x = x / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = net.logits(x).flatten()
        net.activation.running_tau.fill_(float(torch.quantile(logits, 0.05) + torch.quantile(logits, 0.95)) / 2)
    return save_attention_network(net, tmp_path_factory.mktemp("model") / "model.pt")


def infer(model, input, output_dir, **overrides):
    settings = {"bundle_root": str(REPO / "bundle"), "model_path": str(model), "input": str(input), "output_dir": str(output_dir),
                "tta": False, "amp_dtype": None, "num_workers": 0, "progress": False, "device": torch.device("cpu"),
                **overrides}  # the model file records its architecture: no width to pass
    wf = ConfigWorkflow(config_file=str(REPO / "bundle" / "configs" / "inference.json"), workflow_type="infer", **settings)
    wf.initialize()
    wf.run()
    wf.finalize()
    return wf


@pytest.mark.parametrize("stored, expected", [
    ({"brightness_percentile": None, "max_std_ratio": 1.5}, (None, 1.5)),
], ids=["stored"])
def test_inference_normalises_with_the_models_own_stain_settings(tmp_path, stored, expected):
    from monai.bundle import ConfigParser

    from custom.transforms import ReinhardNormalized

    net = AttentionNet(eta=20, stain_prior="logit", stain_prior_gain=2.0, stain_target=[[70.0, 20.0, -15.0], [12.0, 8.0, 6.0]],
                       stain_settings=stored, **SMALL)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundle" / "configs" / "inference.json"))
    parser.update({"model_path": str(save_attention_network(net, tmp_path / "model.pt")), "device": torch.device("cpu")})
    (normalise,) = [t for t in parser.get_parsed_content("preprocessing").transforms if isinstance(t, ReinhardNormalized)]
    assert (normalise.transform.brightness_percentile, normalise.transform.max_std_ratio) == expected
    assert parser.get_parsed_content("windows#brightness_percentile") == expected[0]  # the slide's source statistics
    parser.update({"reinhard_max_std_ratio": 2.0})  # a key given on the command line still wins
    (normalise,) = [t for t in parser.get_parsed_content("preprocessing").transforms if isinstance(t, ReinhardNormalized)]
    assert normalise.transform.max_std_ratio == 2.0


def check_outputs(out, name, level0_shape, is_image=False):
    """The files of one slide are complete and consistent; returns (summary, features)."""
    summary = json.loads((out / f"{name}.json").read_text())
    assert set(summary["outputs"]) == {"geojson", "csv", "overlay"} | ({"instances"} if is_image else set())
    collection = json.loads((out / f"{name}.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    features = collection["features"]
    assert len(features) == summary["nuclei"]
    slide_box = box(0, 0, level0_shape[1], level0_shape[0])
    ids = set()
    for f in features:
        assert f["type"] == "Feature" and f["geometry"]["type"] == "Polygon"
        assert f["properties"]["objectType"] == "detection"
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
        poly = Polygon(ring)
        assert poly.is_valid and poly.area > 0 and slide_box.contains(poly)
        ids.add(f["id"])
    assert len(ids) == len(features)
    rows = (out / f"{name}.csv").read_text().splitlines()
    assert rows[0].startswith("id,centroid_x,centroid_y,area_um2") and len(rows) == 1 + len(features)
    assert Image.open(out / f"{name}_overlay.png").size[0] > 0
    assert not list(out.glob("*.partial")) and not list(out.glob("*.tmp"))
    return summary, features


def test_stitched_windows_equal_one_large_window(small_model, tmp_path):
    """A nucleus straddling window borders appears once, with the same pixels as when the
    whole image is one window."""
    png = tmp_path / "image.png"
    Image.fromarray(synthetic_he(520, 460, tissue_fraction=1.0, seed=5)).save(png)
    common = {"base_magnification": 40, "use_tissue_mask": False, "halo": 40}
    infer(small_model, png, tmp_path / "large", window=1024, **common)
    infer(small_model, png, tmp_path / "small", window=96, **common)
    large = np.asarray(Image.open(tmp_path / "large" / "image_instances.png")).astype(np.int64)
    small = np.asarray(Image.open(tmp_path / "small" / "image_instances.png")).astype(np.int64)
    summary_small = json.loads((tmp_path / "small" / "image.json").read_text())
    assert summary_small["windows"] == 30  # 6 x 5 windows of 96 px
    n_large = int(large.max())
    assert n_large > 50
    # every nucleus of the single window is one nucleus of the tiled run, pixel for pixel
    same = 0
    for lab in range(1, n_large + 1):
        pixels = large == lab
        values = np.unique(small[pixels])
        if len(values) == 1 and values[0] > 0 and (small == values[0]).sum() == pixels.sum():
            same += 1
    assert same == n_large
    assert int(small.max()) == n_large == summary_small["nuclei"]
    check_outputs(tmp_path / "small", "image", large.shape, is_image=True)


def test_post_processing_workers_give_the_same_outputs(small_model, tmp_path):
    """Windows post-processed in a worker process while the network infers the next ones are added
    in order: the same GeoJSON, CSV and instance maps as one window after the other in this process,
    over two images of several windows each."""
    folder = tmp_path / "images"
    folder.mkdir()
    for seed in (1, 2):
        Image.fromarray(synthetic_he(300, 260, tissue_fraction=1.0, seed=seed)).save(folder / f"image{seed}.png")
    common = {"base_magnification": 40, "use_tissue_mask": False, "halo": 40, "window": 128}
    infer(small_model, folder, tmp_path / "inline", postprocess_workers=0, **common)
    infer(small_model, folder, tmp_path / "workers", postprocess_workers=2, **common)
    for name in ("image1", "image2"):
        for suffix in (".geojson", ".csv", "_instances.png"):
            assert (tmp_path / "inline" / f"{name}{suffix}").read_bytes() == (tmp_path / "workers" / f"{name}{suffix}").read_bytes()
        check_outputs(tmp_path / "workers", name, (300, 260), is_image=True)


def test_a_failure_in_a_post_processing_worker_leaves_no_complete_looking_file(small_model, tmp_path, monkeypatch):
    from custom.wsi import writer as wsi_outputs

    png = tmp_path / "image.png"
    Image.fromarray(synthetic_he(300, 300, tissue_fraction=1.0)).save(png)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure in a worker")

    monkeypatch.setattr(wsi_outputs, "attention_to_instances", fail)  # window_nuclei's step; the workers fork after this
    with pytest.raises(RuntimeError) as raised:
        infer(small_model, png, tmp_path / "out", base_magnification=40, window=128, postprocess_workers=1)
    assert "simulated failure in a worker" in str(raised.value.__cause__)
    assert sorted(p.name for p in (tmp_path / "out").glob("*")) == []


@pytest.mark.parametrize("backend", ["cucim", "openslide"])
def test_generated_pyramid(small_model, pyramid_slide, backend, tmp_path):
    out = tmp_path / "out"
    infer(small_model, pyramid_slide, out, backend=require_backend(backend), window=512)
    summary, features = check_outputs(out, "generated_pyramid", (1536, 1280))
    assert summary["magnification"] == 40 and summary["mpp"] == pytest.approx(0.25) and summary["windows"] == 6
    assert summary["tissue_mm2"] == pytest.approx(1536 * 1280 * 0.6 * 0.25**2 / 1e6, rel=0.1)
    assert summary["nuclei"] > 100
    # nuclei lie in the tissue (left 60 %); their areas are those of the painted discs (r 5-9 px at 0.25 um)
    xs = np.array([np.mean([p[0] for p in f["geometry"]["coordinates"][0]]) for f in features])
    assert xs.max() < 0.6 * 1280 + 10
    areas = np.array([f["properties"]["measurements"]["area_um2"] for f in features])
    assert 5 < np.median(areas) < 20


@pytest.mark.parametrize("backend", ["cucim", "openslide"])
def test_real_20x_slide_read_at_40x(small_model, backend, tmp_path):
    path = require_slide(CMU_SLIDE)
    out = tmp_path / "out"
    infer(small_model, path, out, backend=require_backend(backend), roi=[1200, 600, 400, 400], window=512)
    summary, features = check_outputs(out, "cmu_small_region", (2967, 2220))
    assert summary["mpp"] == pytest.approx(0.499) and summary["analysis_mpp"] == 0.25
    assert any("Enlarged to 40x" in w for w in summary["warnings"])
    assert summary["nuclei"] > 10
    roi = box(600, 1200, 1000, 1600)
    inside = [Polygon(f["geometry"]["coordinates"][0]).centroid.within(roi.buffer(2)) for f in features]
    assert all(inside)


@pytest.mark.parametrize("backend", ["cucim", "openslide"])
def test_real_slide_without_mpp(small_model, backend, tmp_path):
    path = require_slide(TCGA_SLIDE)
    out = tmp_path / "out"
    with pytest.raises(Exception) as raised:
        infer(small_model, path, out, backend=require_backend(backend))
    messages = []
    e = raised.value
    while e is not None:  # the bundle wraps the slide's error in its own
        messages.append(str(e))
        e = e.__cause__
    assert any(path.name in m and "--mpp" in m for m in messages)
    assert not list(out.glob("*")) if out.exists() else True
    infer(small_model, path, out, backend=backend, base_magnification=10, roi=[1500, 2000, 128, 128], window=512)
    summary, _ = check_outputs(out, "tcga-cr-7395-01a-01-ts1", (3567, 4443))
    assert summary["mpp"] == 1.0 and summary["mpp_source"] == "base_magnification given" and summary["windows"] == 1


def test_blank_slide_gives_empty_valid_outputs_and_rerun_skips(small_model, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    write_pyramidal_tiff(folder / "blank.tiff", np.full((512, 512, 3), 246, np.uint8), mpp=0.25, levels=2)
    write_pyramidal_tiff(folder / "tissue.tiff", synthetic_he(512, 512, tissue_fraction=1.0), mpp=0.25, levels=2)
    out = tmp_path / "out"
    infer(small_model, folder, out, backend=require_backend("openslide"))
    summary, features = check_outputs(out, "blank", (512, 512))
    assert summary["nuclei"] == 0 and features == [] and "no tissue" in summary["warnings"][0]
    check_outputs(out, "tissue", (512, 512))
    assert sorted(complete_slides(out)) == ["blank", "tissue"]
    stamp = (out / "tissue.json").stat().st_mtime_ns
    wf = infer(small_model, folder, out, backend="openslide")  # rerun: both complete, nothing recomputed
    assert len(wf.parser.get_parsed_content("windows")) == 0 and (out / "tissue.json").stat().st_mtime_ns == stamp
    (out / "tissue.csv").unlink()  # an incomplete slide is done again
    assert complete_slides(out) == ["blank"]
    infer(small_model, folder, out, backend="openslide")
    assert (out / "tissue.json").stat().st_mtime_ns != stamp
    check_outputs(out, "tissue", (512, 512))
    # only blank slides: the engine has nothing to run, the outputs are written all the same
    infer(small_model, folder / "blank.tiff", tmp_path / "blank_only", backend="openslide")
    assert check_outputs(tmp_path / "blank_only", "blank", (512, 512))[0]["nuclei"] == 0


def test_interrupted_slide_leaves_no_complete_looking_file(small_model, tmp_path, monkeypatch):
    from custom.wsi import writer as wsi_outputs

    png = tmp_path / "image.png"
    Image.fromarray(synthetic_he(300, 300, tissue_fraction=1.0)).save(png)
    calls = {"n": 0}
    original = wsi_outputs.SlideNucleiWriter._add_nuclei

    def fail_on_second(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure in the middle of a slide")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(wsi_outputs.SlideNucleiWriter, "_add_nuclei", fail_on_second)
    with pytest.raises(RuntimeError) as raised:
        infer(small_model, png, tmp_path / "out", base_magnification=40, window=128)
    assert "simulated failure" in str(raised.value.__cause__)  # the bundle wraps it
    assert sorted(p.name for p in (tmp_path / "out").glob("*")) == []


def test_time_and_progress_bar_start_before_the_first_window(small_model, tmp_path, monkeypatch):
    """A slide's progress bar opens, and its time starts, before its first window is read: at the
    start of the run for the first slide, at the end of the previous slide for the next one, so a
    slow first window (0.5 s here) counts in the summary's seconds."""
    import time

    from custom.wsi import datasets
    from custom.wsi import writer as wsi_writer

    events = []
    read = datasets.SlideWindowDataset.__getitem__

    def slow_first_window(self, index):
        si, wi = self.windows[index][:2]
        events.append(("read", self.slides_info[si]["name"], wi))
        if wi == 0:
            time.sleep(0.5)
        return read(self, index)

    class Bar:
        def __init__(self, total, desc, **kwargs):
            events.append(("bar", desc, total))

        def update(self, n):
            pass

        def close(self):
            events.append(("close",))

    monkeypatch.setattr(datasets.SlideWindowDataset, "__getitem__", slow_first_window)
    monkeypatch.setattr(wsi_writer, "tqdm", Bar)
    folder = tmp_path / "images"
    folder.mkdir()
    for name, seed in (("a", 1), ("b", 2)):
        Image.fromarray(synthetic_he(200, 200, tissue_fraction=1.0, seed=seed)).save(folder / f"{name}.png")
    # in this process (postprocess_workers 0): with a worker, a slide's last window is done, and the next slide's
    # bar opens, one window later, while the network infers that next window
    infer(small_model, folder, tmp_path / "out", base_magnification=40, use_tissue_mask=False, window=128, progress=True,
          postprocess_workers=0)
    assert events == [("bar", "a", 4), ("read", "a", 0), ("read", "a", 1), ("read", "a", 2), ("read", "a", 3), ("close",),
                      ("bar", "b", 4), ("read", "b", 0), ("read", "b", 1), ("read", "b", 2), ("read", "b", 3), ("close",)]
    for name in ("a", "b"):
        assert json.loads((tmp_path / "out" / f"{name}.json").read_text())["seconds"] >= 0.5


def test_overlay_outlines_are_two_pixels_wide(small_model, tmp_path):
    """The nucleus outlines of the slide overlay and of the evaluation overlays are OUTLINE_WIDTH (2) px wide."""
    from scipy import ndimage

    from custom.evaluation.reports import OUTLINE_WIDTH, outlines

    assert OUTLINE_WIDTH == 2
    labels = np.zeros((20, 30), np.int32)
    labels[2:12, 2:12] = 1
    labels[2:12, 12:22] = 2  # touching: each keeps its own outline
    ring = outlines(labels)
    assert ring[labels == 1].sum() == 10 * 10 - 6 * 6 and ring[labels == 2].sum() == 10 * 10 - 6 * 6
    assert not ring[labels == 0].any() and not ring[6:8, 6:8].any()
    png = tmp_path / "image.png"
    Image.fromarray(synthetic_he(256, 256, tissue_fraction=1.0, seed=4)).save(png)
    infer(small_model, png, tmp_path / "out", base_magnification=40, use_tissue_mask=False, overlay_size=256)
    yellow = (np.asarray(Image.open(tmp_path / "out" / "image_overlay.png").convert("RGB")) == (255, 230, 0)).all(-1)
    assert yellow.sum() > 500
    # a 1-px outline has (almost) no 2x2 block of yellow; a 2-px one is mostly made of them
    assert ndimage.binary_erosion(yellow, np.ones((2, 2), bool)).sum() > 0.2 * yellow.sum()  # 1 px: 2 %, 2 px: 36 %


def test_segment_script_with_the_shipped_model(tmp_path):
    """The fresh-clone command: segment a validation image with the committed model."""
    data = require_monuseg()
    image = data / "images" / "TCGA-21-5784-01Z-00-DX1.png"
    if not image.is_file():
        pytest.skip(f"{image} not found")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "scripts" / "segment.py"), str(image), "--out", str(tmp_path / "out"),
           "--base_magnification", "40", "--tta", "False", "--progress", "False"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, _ = check_outputs(tmp_path / "out", image.stem, (1000, 1000), is_image=True)
    instances = np.asarray(Image.open(tmp_path / "out" / f"{image.stem}_instances.png"))
    assert summary["nuclei"] == int(instances.max()) > 200
    # a slide without pixel size: a non-zero exit that says what to pass, and no output
    if TCGA_SLIDE.is_file():
        bad = subprocess.run([sys.executable, str(REPO / "scripts" / "segment.py"), str(TCGA_SLIDE), "--out", str(tmp_path / "bad")],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert bad.returncode != 0 and "--mpp" in bad.stderr
        assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("*"))
    # a misspelt option is refused, not silently ignored
    typo = subprocess.run([sys.executable, str(REPO / "scripts" / "segment.py"), str(image), "--out", str(tmp_path / "typo"), "--windw", "512"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert typo.returncode != 0 and "Did you mean --window?" in typo.stderr and not (tmp_path / "typo").exists()

    # analysis at 20x with the override file: half the pixels, polygons still in level-0 (40x) pixels
    at20 = subprocess.run(cmd[:4] + [str(tmp_path / "out20"), *cmd[5:], "--config", str(REPO / "bundle" / "configs" / "inference_20x.json")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert at20.returncode == 0, at20.stderr[-3000:]
    summary20 = json.loads((tmp_path / "out20" / f"{image.stem}.json").read_text())
    assert summary20["analysis_mpp"] == pytest.approx(0.5) and summary20["postprocess"]["min_size"] == 30
    assert np.asarray(Image.open(tmp_path / "out20" / f"{image.stem}_instances.png")).shape == (500, 500)
    assert 0.7 * summary["nuclei"] < summary20["nuclei"] < 1.3 * summary["nuclei"]
    xs = [x for f in json.loads((tmp_path / "out20" / f"{image.stem}.geojson").read_text())["features"]
          for x, _ in f["geometry"]["coordinates"][0]]
    assert 900 < max(xs) <= 1000
    # an override file that is missing, or that names an unknown key: a clear error and no output
    for bad_config, message in (("no_such.json", "no such file"), (str(tmp_path / "typo.json"), "Did you mean --halo?")):
        (tmp_path / "typo.json").write_text('{"hallo": 48}')
        bad = subprocess.run(cmd[:4] + [str(tmp_path / "bad_config"), *cmd[5:], "--config", bad_config],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert bad.returncode != 0 and message in bad.stderr and not (tmp_path / "bad_config").exists()
