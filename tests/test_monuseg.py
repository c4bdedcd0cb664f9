"""MoNuSeg: XML rasterisation against the reference labels, archive conversion, download failure."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MONUSEG = REPO.parent / "shared" / "data" / "monuseg"

from custom.data import monuseg
from custom.data.monuseg import MONUSEG_ARCHIVES, convert_monuseg, ensure_monuseg, has_prepared_data, xml_to_instance_map

ANNOTATED = ["TCGA-B0-5698-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1"]


def shared_monuseg() -> Path:
    """The shared MoNuSeg copy with its two official XML files, or skip."""
    if not (MONUSEG / "annotations").is_dir() or not (MONUSEG / "labels").is_dir():
        pytest.skip(f"shared MoNuSeg data not found at {MONUSEG}")
    return MONUSEG


def write_xml(path: Path, polygons: list[list[tuple[float, float]]]) -> Path:
    """A minimal ImageScope XML with 1-based vertices."""
    regions = "".join(
        f'<Region Id="{k}"><Vertices>'
        + "".join(f'<Vertex X="{x}" Y="{y}"/>' for x, y in poly)
        + "</Vertices></Region>"
        for k, poly in enumerate(polygons, start=1)
    )
    path.write_text(f'<Annotations><Annotation Id="1"><Regions>{regions}</Regions></Annotation></Annotations>')
    return path


@pytest.mark.parametrize("image_id", ANNOTATED)
def test_xml_reproduces_reference_labels(image_id):
    root = shared_monuseg()
    reference = np.asarray(Image.open(root / "labels" / f"{image_id}.png"))
    ours = xml_to_instance_map(root / "annotations" / f"{image_id}.xml", reference.shape)
    assert ours.dtype == np.uint16 and ours.shape == reference.shape
    a, b = ours > 0, reference > 0
    dice = 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())
    assert dice >= 0.98, f"{image_id}: foreground Dice {dice:.4f}"
    n_ours, n_ref = len(np.unique(ours)) - 1, len(np.unique(reference)) - 1
    assert abs(n_ours - n_ref) <= 0.01 * n_ref, (n_ours, n_ref)


def test_polygon_rule_and_overwrite(tmp_path):
    # 1-based vertices: square (2,2)-(5,5) covers 0-based pixels rows/cols 2..4 under the
    # half-open rule (centre on the top/left edge is outside, on the bottom/right inside).
    xml = write_xml(tmp_path / "a.xml", [[(2, 2), (5, 2), (5, 5), (2, 5)], [(4, 4), (7, 4), (7, 7), (4, 7)]])
    label = xml_to_instance_map(xml, (10, 10))
    expected = np.zeros((10, 10), np.uint16)
    expected[2:5, 2:5] = 1
    expected[4:7, 4:7] = 2  # later region wins
    np.testing.assert_array_equal(label, expected)


@pytest.mark.parametrize(
    "content",
    ["<Annotations><Region", "<Annotations><Annotation/></Annotations>", '<A><Region><Vertex X="a" Y="1"/></Region></A>'],
    ids=["truncated", "no-regions", "bad-vertex"],
)
def test_malformed_xml_names_the_file(tmp_path, content):
    bad = tmp_path / "broken-annotation.xml"
    bad.write_text(content)
    with pytest.raises(ValueError, match="broken-annotation.xml"):
        xml_to_instance_map(bad, (100, 100))


def make_raw_archive(tmp_path: Path, image_id: str) -> Path:
    """The official training-archive nesting, with one shared image saved as RGBA .tif."""
    root = shared_monuseg()
    base = tmp_path / "raw" / "MoNuSeg 2018 Training Data"
    (base / "Tissue Images").mkdir(parents=True)
    (base / "Annotations").mkdir()
    rgb = np.asarray(Image.open(root / "images" / f"{image_id}.png").convert("RGB"))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(base / "Tissue Images" / f"{image_id}.tif")
    shutil.copy(root / "annotations" / f"{image_id}.xml", base / "Annotations" / f"{image_id}.xml")
    junk = tmp_path / "raw" / "__MACOSX" / "MoNuSeg 2018 Training Data" / "Tissue Images"
    junk.mkdir(parents=True)
    (junk / f"._{image_id}.tif").write_bytes(b"\x00\x05\x16\x07 resource fork")
    return tmp_path / "raw", rgb


def test_convert_official_layout(tmp_path):
    image_id = ANNOTATED[0]
    raw, rgb = make_raw_archive(tmp_path, image_id)
    out = tmp_path / "prepared"
    assert convert_monuseg(raw, out) == [image_id]
    image = Image.open(out / "images" / f"{image_id}.png")
    assert image.mode == "RGB"
    image = np.asarray(image)
    assert image.dtype == np.uint8 and image.shape == (1000, 1000, 3)
    np.testing.assert_array_equal(image, rgb)
    label = np.asarray(Image.open(out / "labels" / f"{image_id}.png"))
    assert label.dtype == np.uint16 and label.shape == (1000, 1000)
    assert label.max() == 357
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{image_id}.png"]
    assert sorted(p.name for p in (out / "labels").iterdir()) == [f"{image_id}.png"]
    assert has_prepared_data(out)


def test_image_without_xml_is_named(tmp_path):
    raw = tmp_path / "raw" / "Tissue Images"
    raw.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(raw / "lonely-image.tif")
    with pytest.raises(FileNotFoundError, match="lonely-image.tif"):
        convert_monuseg(tmp_path / "raw", tmp_path / "out")


def test_archive_table():
    assert set(MONUSEG_ARCHIVES) == {"train", "test"}
    assert "1ZgqFJomqQGNnsx7w7QBzQQMVA16lbVCA" in MONUSEG_ARCHIVES["train"]["url"]
    assert "1NKkSQ5T0ZNQ8aUhh0a8Dt2YKYCQXIViw" in MONUSEG_ARCHIVES["test"]["url"]
    assert MONUSEG_ARCHIVES["train"]["filename"] == "MoNuSeg 2018 Training Data.zip"
    assert MONUSEG_ARCHIVES["test"]["filename"] == "MoNuSegTestData.zip"
    for spec in MONUSEG_ARCHIVES.values():
        assert spec["md5"] is None or len(spec["md5"]) == 32


def test_ensure_returns_prepared_dir_without_download(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "x.png")
    monkeypatch.setattr(monuseg, "_download_and_extract", lambda *a, **k: pytest.fail("must not download"))
    assert ensure_monuseg(tmp_path, download=True) == str(tmp_path)


def test_ensure_without_download_explains(tmp_path):
    target = tmp_path / "nothing-here"
    with pytest.raises(RuntimeError, match="--dataset_dir") as info:
        ensure_monuseg(target, download=False)
    assert str(target) in str(info.value) and "images/*.png" in str(info.value)


def test_ensure_download_failure_leaves_nothing_prepared(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    with pytest.raises(RuntimeError) as info:
        ensure_monuseg(target, url="http://127.0.0.1:9/monuseg.zip")
    message = str(info.value)
    assert "--dataset_dir" in message and str(target) in message
    assert "prepare_monuseg.py" in message and "\n" not in message
    assert not (target / "images").exists()
    assert not has_prepared_data(target)


def test_ensure_download_converts_into_layout(tmp_path, monkeypatch):
    """The download step replaced by one that extracts a tiny archive: staging, publishing, splits."""
    ids = monuseg.MONUSEG_SPLITS["train"] + monuseg.MONUSEG_SPLITS["val"] + ["TCGA-EXTRA-01Z-00-DX1"]

    def fake_download(url, archive, extract_dir, hash_val, hash_type):
        assert hash_type == "sha256" and hash_val == MONUSEG_ARCHIVES["train"]["sha256"]
        base = extract_dir / "MoNuSeg 2018 Training Data"
        (base / "Tissue Images").mkdir(parents=True)
        (base / "Annotations").mkdir()
        for image_id in ids:
            Image.fromarray(np.full((12, 12, 3), 200, np.uint8)).save(base / "Tissue Images" / f"{image_id}.tif")
            write_xml(base / "Annotations" / f"{image_id}.xml", [[(3, 3), (8, 3), (8, 8), (3, 8)]])

    monkeypatch.setattr(monuseg, "_download_and_extract", fake_download)
    target = tmp_path / "data"
    assert ensure_monuseg(target) == str(target)
    assert sorted(p.stem for p in (target / "images").glob("*.png")) == sorted(ids)
    assert sorted(p.stem for p in (target / "labels").glob("*.png")) == sorted(ids)
    splits = json.loads((target / "splits.json").read_text())
    assert splits["train"] == monuseg.MONUSEG_SPLITS["train"] and splits["val"] == monuseg.MONUSEG_SPLITS["val"]
    assert splits["extra"] == ["TCGA-EXTRA-01Z-00-DX1"]
    assert not [p for p in target.iterdir() if p.name.startswith(".")]  # no staging left


def test_ensure_conversion_failure_leaves_no_images(tmp_path, monkeypatch):
    def fake_download(url, archive, extract_dir, hash_val, hash_type):
        extract_dir.mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extract_dir / "a.tif")
        write_xml(extract_dir / "a.xml", [[(1, 1), (4, 1), (4, 4)]])
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(extract_dir / "b.tif")  # no b.xml

    monkeypatch.setattr(monuseg, "_download_and_extract", fake_download)
    with pytest.raises(RuntimeError, match="b.tif"):
        ensure_monuseg(tmp_path / "data")
    assert not (tmp_path / "data" / "images").exists()


def test_cli_bad_raw_dir_fails(tmp_path):
    missing = tmp_path / "no-such-archive"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "prepare_monuseg.py"), "--raw_dir", str(missing), "--out_dir", str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not has_prepared_data(tmp_path / "out")


def test_cli_converts(tmp_path):
    """The CLI entry point in-process (a subprocess would re-import torch: slow)."""
    spec = importlib.util.spec_from_file_location("prepare_monuseg_cli", REPO / "scripts" / "prepare_monuseg.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    raw = tmp_path / "raw" / "MoNuSegTestData"
    raw.mkdir(parents=True)
    Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(raw / "tile-1.tif")
    write_xml(raw / "tile-1.xml", [[(2, 2), (10, 2), (10, 10), (2, 10)]])
    out = tmp_path / "out"
    assert cli.main(["--raw_dir", str(tmp_path / "raw"), "--out_dir", str(out)]) == 0
    label = np.asarray(Image.open(out / "labels" / "tile-1.png"))
    assert label.dtype == np.uint16 and (label == 1).sum() == 64
    assert cli.main(["--out_dir", str(out)]) == 1  # neither --raw_dir nor --download


def test_organ_folds_cover_the_30_images():
    """Every image of the authors' split has an organ; the leave-one-organ-out folds hold the seven
    organs' images once each, the three 2-image organs pooled."""
    from custom.data.monuseg import MONUSEG_SPLITS, organ_folds, organ_of

    ids = MONUSEG_SPLITS["train"] + MONUSEG_SPLITS["val"]
    organs = [organ_of(i) for i in ids]
    assert {o: organs.count(o) for o in set(organs)} == {"breast": 6, "kidney": 6, "liver": 6, "prostate": 6, "bladder": 2,
                                                         "colon": 2, "stomach": 2}
    folds = organ_folds(ids)
    assert sorted(folds) == ["breast", "kidney", "liver", "other", "prostate"]
    assert sorted(i for members in folds.values() for i in members) == sorted(ids)
    assert {organ_of(i) for i in folds["other"]} == {"bladder", "colon", "stomach"}
    with pytest.raises(ValueError, match="not a MoNuSeg image id"):
        organ_of("slide_001")
