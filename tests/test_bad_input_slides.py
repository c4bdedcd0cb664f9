"""Bad inputs, family "slides and images": what ``scripts/segment.py`` (whole-slide
inference through ``inference.json``) does with slides and images that are missing,
empty, truncated, corrupt, of another format than their suffix says, without
tissue, tiny, too large to decode whole, or in a pixel format other than 8-bit RGB.

Every case is a row of ``CASES``: a function that writes the input (generated, or
cut from the real CMU slide where ``../shared/data`` has it, else skipped) and what
must happen:

* ``error``: exit status 1, ``segment.py: error: <file>: <what is wrong>. <what to do>``
  on stderr, and nothing in the output folder that looks complete for the bad file
  (no ``<name>.json``, ``.geojson``, ``.csv``, ``_overlay.png``); in a batch the good
  slides are segmented all the same (complete outputs) and each bad one is listed.
* ``same`` / ``similar``: a pixel format converted to RGB with a WARNING, then segmented:
  the same nuclei as the 8-bit RGB original (lossless conversions), or about as many (lossy).
* ``segmented``: exit 0 and complete outputs (tiny images), with an optional extra check.
* ``no_tissue``: exit 0, a WARNING, and empty but valid outputs (a FeatureCollection
  without features, a CSV header, the summary).

Rows run ``scripts/segment.py``'s ``main`` in this process, except those marked
``subprocess``, which run the script as a command; TTA off, on the CPU, with the small
real network of ``test_wsi_outputs`` (it segments the generated nuclei untrained), or
the shipped model where its receptive field matters.
Separate tests prove that a large stripped or uncompressed TIFF is read by regions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from custom.wsi.slide import MAX_WHOLE_IMAGE_PIXELS, Slide
from tests.slides import write_pyramidal_tiff
from custom.wsi.writer import complete_slides
from tests.conftest import CMU_SLIDE, REPO, require_slide, synthetic_he
from tests.test_wsi_outputs import check_outputs, small_model  # noqa: F401 - small_model: a fixture used here

SEGMENT = REPO / "scripts" / "segment.py"
_spec = importlib.util.spec_from_file_location("segment_script", SEGMENT)
segment_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(segment_script)

HE = synthetic_he(256, 256, tissue_fraction=1.0, seed=1)  # the 8-bit RGB original of the conversion cases
COMMON = ("--tta", "False", "--progress", "False", "--device", "cpu", "--num_workers", "0", "--amp_dtype", "None")


# --- inputs -------------------------------------------------------------------------------------


def _png16(path: Path, rgb16: np.ndarray) -> Path:
    """A 16-bit RGB PNG (Pillow cannot write one): IHDR, one IDAT, IEND."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header says ``width`` x ``height`` RGB, with the first rows of data only
    (a real large PNG would take minutes to write; the size is refused from the header)."""
    rows = b"".join(b"\0" + bytes(3 * width) for _ in range(4))
    crc = lambda kind, data: struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)  # noqa: E731
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(rows)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + crc(b"IHDR", ihdr)
                     + struct.pack(">I", len(idat)) + b"IDAT" + idat + crc(b"IDAT", idat))
    return path


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def _save(path: Path, image: Image.Image | np.ndarray, **kwargs) -> Path:
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **kwargs)
    return path


def _pyramid(path: Path, image: np.ndarray = HE) -> Path:
    return write_pyramidal_tiff(path, image, mpp=0.25, levels=2, tile=64)


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _garbage_after_header(src: Path, dst: Path) -> Path:
    """The valid 8-byte TIFF header of ``src``, then random bytes: the directories are garbage."""
    data = src.read_bytes()
    dst.write_bytes(data[:8] + np.random.default_rng(0).integers(0, 256, len(data) - 8, dtype=np.uint8).tobytes())
    return dst


def _garbage_tiles(src: Path, dst: Path) -> Path:
    """``src`` with the image data of its level 0 replaced by random bytes; directories intact."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        start = int(min(page.dataoffsets))
        end = int(max(o + c for o, c in zip(page.dataoffsets, page.databytecounts)))
    data[start:end] = np.random.default_rng(0).integers(0, 256, end - start, dtype=np.uint8).tobytes()
    dst.write_bytes(bytes(data))
    return dst


def _cmu(d: Path) -> Path:
    return require_slide(CMU_SLIDE)


def _he_png(d: Path) -> Path:
    return _save(d / "he.png", HE)


def _folder_with_bad_slides(d: Path) -> Path:
    folder = d / "slides"
    folder.mkdir()
    _save(folder / "he.png", HE)
    _truncate(_pyramid(d / "whole.tiff"), folder / "half.tiff")
    _save(folder / "gray.png", Image.fromarray(HE).convert("L"))
    (folder / "notes.txt").write_text("ignored: not a slide suffix\n")
    return folder


def _csv_with_missing_slide(d: Path) -> Path:
    _he_png(d)
    (d / "slides.csv").write_text("path\nhe.png\ngone.svs\n")
    return d / "slides.csv"


def _rgba_half_transparent(d: Path) -> Path:
    alpha = np.full(HE.shape[:2], 255, np.uint8)
    alpha[:, 128:] = 0
    return _save(d / "rgba_half.png", np.dstack([HE, alpha]))


def _nuclei_left_of(x_max: float) -> Callable[[dict, list], None]:
    def check(summary: dict, features: list) -> None:
        xs = [max(p[0] for p in f["geometry"]["coordinates"][0]) for f in features]
        assert summary["nuclei"] > 10 and max(xs) <= x_max, "nuclei in the transparent half (composited on white: glass)"
    return check


def _big_uncompressed_tiff(path: Path, height: int, width: int) -> np.memmap:
    """An uncompressed, single-strip RGB TIFF of any size: a sparse file (takes no disk space)."""
    return tifffile.memmap(path, shape=(height, width, 3), dtype=np.uint8, photometric="rgb")


@dataclass(frozen=True)
class Case:
    """One bad input.

    Args:
        make: writes the input under a folder and returns what segment.py gets (a path or a list of paths).
        outcome: "error", "same", "similar", "segmented" or "no_tissue" (see the module docstring).
        words: a regex the error (stderr) or the log (stdout: warnings) must match.
        bad: names (file stems) the error is about: each in the message and without outputs.
        good: names that must have complete outputs (batches, and the segmented cases).
        args: segment.py options of this case (with ``COMMON``).
        subprocess: run segment.py as a command instead of in this process.
        check: an extra check of ``(summary, features)`` of the first good slide.
        min_nuclei: the least number of nuclei of the good slides.
        model: "small" (the untrained width-4 network) or "shipped" (bundle/models/model.pt).
    """

    make: Callable[[Path], object]
    outcome: str
    words: str
    bad: tuple[str, ...] = ()
    good: tuple[str, ...] = ()
    args: tuple[str, ...] = ("--base_magnification", "40")
    subprocess: bool = False
    check: Callable[[dict, list], None] | None = None
    min_nuclei: int = 0
    model: str = "small"


CASES = [
    # missing, empty, truncated, corrupt, not what the suffix says
    pytest.param(Case(lambda d: d / "nowhere.svs", "error", r"nowhere\.svs: no such slide, folder or CSV\. Check the path", ("nowhere",)),
                 id="missing_path"),
    pytest.param(Case(lambda d: _write(d / "empty.svs", b""), "error", r"empty\.svs: the file is empty \(0 bytes\).*copy it again", ("empty",)), id="empty_svs"),
    pytest.param(Case(lambda d: _write(d / "empty.png", b""), "error",
                      r"empty\.png: the file is empty \(0 bytes\)", ("empty",)), id="empty_png"),
    pytest.param(Case(lambda d: _truncate(_cmu(d), d / "cmu_half.svs"), "error",
                      r"cmu_half\.svs: the file is damaged: its TIFF header points to no readable image directory.*truncated or corrupt.*copy the slide again",
                      ("cmu_half",)), id="truncated_svs_real"),
    pytest.param(Case(lambda d: _truncate(_pyramid(d / "whole.tiff"), d / "half.tiff"), "error",
                      r"half\.tiff: the file is truncated: the image data of its page 0 \(256x256\) runs to byte [\d,]+ but the file has [\d,]+ bytes",
                      ("half",)), id="truncated_tiff"),
    pytest.param(Case(lambda d: _truncate(_he_png(d), d / "half.png"), "error",
                      r"half\.png: the PNG cannot be decoded \(.*truncated.*\): the file is truncated or damaged", ("half",)), id="truncated_png"),
    pytest.param(Case(lambda d: _garbage_after_header(_cmu(d), d / "garbled.svs"), "error",
                      r"garbled\.svs: the file is damaged: its TIFF structure cannot be read", ("garbled",)), id="corrupt_svs_real_header_then_garbage"),
    pytest.param(Case(lambda d: _garbage_after_header(_pyramid(d / "whole.tiff"), d / "garbled.tiff"), "error",
                      r"garbled\.tiff: the file is damaged", ("garbled",)), id="corrupt_tiff_header_then_garbage"),
    pytest.param(Case(lambda d: _garbage_tiles(_cmu(d), d / "bad_tiles.svs"), "error",
                      r"bad_tiles\.svs: the file is corrupt: 1[23]\d of 130 JPEG tiles checked on its page 0 \(2967x2220\) do not start with a JPEG header",
                      ("bad_tiles",)), id="corrupt_svs_real_tiles"),
    pytest.param(Case(lambda d: _garbage_tiles(_pyramid(d / "whole.tiff"), d / "bad_tiles.tiff"), "error",
                      r"bad_tiles\.tiff: the file is corrupt: \d+ of 16 deflate tiles checked", ("bad_tiles",)), id="corrupt_tiff_tiles"),
    pytest.param(Case(lambda d: _write(d / "notes.svs", "meeting notes, not a slide\n"), "error",
                      r"notes\.svs: not a valid \.svs slide: \.svs files are TIFF files, but this one starts with b'meeting ' \(a text file\)",
                      ("notes",)), id="text_named_svs"),
    pytest.param(Case(lambda d: _save(d / "photo.tif", HE, format="PNG"), "error",
                      r"photo\.tif: not a valid \.tif slide: .* \(a PNG image\)", ("photo",)), id="png_named_tif"),
    pytest.param(Case(lambda d: _write(d / "report.docx", b"PK\x03\x04" + bytes(60)), "error",
                      r"report\.docx: unsupported file type '\.docx': give a whole-slide image \(\.svs, .*\) or an image \(\.png",
                      ("report",)), id="unsupported_suffix_docx"),
    # batches: the good slides are segmented, the bad ones listed, exit status 1
    pytest.param(Case(lambda d: [_he_png(d), _write(d / "notes.txt", "not a slide\n")], "error",
                      r"1 of 2 slides could not be segmented \(the outputs of the other 1 are written\):\n  .*notes\.txt: unsupported file type '\.txt'",
                      ("notes",), ("he",)), id="list_with_txt"),
    pytest.param(Case(_csv_with_missing_slide, "error", r"1 of 2 slides could not be segmented.*\n  .*gone\.svs: no such file",
                      ("gone",), ("he",)), id="csv_with_missing_slide"),
    pytest.param(Case(_folder_with_bad_slides, "error",
                      r"2 of 3 slides could not be segmented.*\n  .*gray\.png: the image is grayscale.*\n  .*half\.tiff: the file is truncated",
                      ("gray", "half"), ("he",), subprocess=True), id="folder_with_bad_slides"),
    pytest.param(Case(lambda d: [_truncate(_pyramid(d / "whole.tiff"), d / "half.tiff"), d / "gone.png"], "error",
                      r"none of the 2 slides can be segmented:\n  .*half\.tiff: the file is truncated.*\n  .*gone\.png: no such file",
                      ("half", "gone")), id="all_bad"),
    # no tissue, tiny images
    pytest.param(Case(lambda d: _pyramid(d / "glass.tiff", np.full((256, 256, 3), 246, np.uint8)), "no_tissue",
                      r"WARNING - .*glass\.tiff: no tissue found in it \(tissue: saturation >= 0\.07.*--use_tissue_mask False", (), ("glass",),
                      args=(), subprocess=True), id="no_tissue"),
    pytest.param(Case(lambda d: _save(d / "tiny.png", synthetic_he(64, 48, tissue_fraction=1.0, seed=2)), "segmented", "", (), ("tiny",),
                      min_nuclei=1, model="shipped"), id="image_smaller_than_window_and_context"),
    pytest.param(Case(lambda d: _save(d / "dot.png", np.array([[[80, 45, 135]]], np.uint8)), "segmented", "", (), ("dot",)), id="image_1x1"),
    pytest.param(Case(lambda d: _png_header(d / "huge.png", 10_000, 9_000), "error",
                      r"huge\.png: the image is 10000x9000 px \(90 megapixels\); PNG images can only be decoded whole, and the limit is 80 megapixels\. "
                      r"Convert it to a tiled pyramidal TIFF.*vips tiffsave huge\.png huge\.tif --tile --pyramid", ("huge",)), id="png_too_large"),
    pytest.param(Case(lambda d: _png_header(d / "huger.png", 20_000, 20_000), "error",
                      r"huger\.png: the image is too large \(.*\); PNG images can only be decoded whole.*vips tiffsave", ("huger",)),
                 id="png_too_large_for_pillow"),
    # pixel formats: grayscale refused, the others converted to RGB and segmented
    pytest.param(Case(lambda d: _save(d / "gray.png", Image.fromarray(HE).convert("L")), "error",
                      r"gray\.png: the image is grayscale \(mode L\); H&E nucleus segmentation needs the colour image.*Segment the original RGB image",
                      ("gray",)), id="grayscale_png"),
    pytest.param(Case(lambda d: _save(d / "gray16.png", (HE[..., 0].astype(np.uint16) * 257)), "error",
                      r"gray16\.png: the image is grayscale \(mode I;16\)", ("gray16",)), id="grayscale_16bit_png"),
    pytest.param(Case(lambda d: _save(d / "graypal.png", Image.fromarray(HE).convert("L").convert("P")), "error",
                      r"graypal\.png: the image is grayscale \(mode P with gray palette colours\)", ("graypal",)), id="grayscale_palette_png"),
    pytest.param(Case(lambda d: _save(d / "gray.tif", Image.fromarray(HE).convert("L")), "error",
                      r"gray\.tif: the image is grayscale \(TIFF 8-bit MINISBLACK", ("gray",)), id="grayscale_tiff"),
    pytest.param(Case(lambda d: tifffile.imwrite(d / "float.tif", HE.astype(np.float32), photometric="rgb") or d / "float.tif", "error",
                      r"float\.tif: unsupported pixel format \(TIFF 32-bit RGB.*float32\); convert it to 8-bit RGB", ("float",)),
                 id="float_tiff"),
    pytest.param(Case(lambda d: _save(d / "rgba.png", np.dstack([HE, np.full(HE.shape[:2], 255, np.uint8)])), "same",
                      r"WARNING - .*rgba\.png: RGBA: alpha composited on white", (), ("rgba",)), id="rgba_png"),
    pytest.param(Case(_rgba_half_transparent, "segmented", r"rgba_half\.png: RGBA: alpha composited on white", (), ("rgba_half",),
                      check=_nuclei_left_of(128 + 2)), id="rgba_png_transparent_half"),
    pytest.param(Case(lambda d: _png16(d / "rgb16.png", HE.astype(np.uint16) * 257), "same",
                      r"WARNING - .*rgb16\.png: 16-bit RGB: 16 bits per channel reduced to 8", (), ("rgb16",)), id="rgb_16bit_png"),
    pytest.param(Case(lambda d: tifffile.imwrite(d / "rgb16.tif", HE.astype(np.uint16) * 257, photometric="rgb", tile=(64, 64),
                                                 compression="zlib") or d / "rgb16.tif", "same",
                      r"WARNING - .*rgb16\.tif: TIFF 16-bit RGB.*16 bits per channel reduced to 8", (), ("rgb16",)), id="rgb_16bit_tiled_tiff"),
    pytest.param(Case(lambda d: _save(d / "cmyk.tif", Image.fromarray(HE).convert("CMYK")), "same",
                      r"WARNING - .*cmyk\.tif: TIFF 8-bit SEPARATED.*CMYK converted to RGB", (), ("cmyk",)), id="cmyk_tiff"),
    pytest.param(Case(lambda d: _save(d / "cmyk.jpg", Image.fromarray(HE).convert("CMYK"), quality=95), "similar",
                      r"WARNING - .*cmyk\.jpg: CMYK: converted to RGB", (), ("cmyk",)), id="cmyk_jpeg"),
    pytest.param(Case(lambda d: _save(d / "palette.png", Image.fromarray(HE).quantize(256)), "similar",
                      r"WARNING - .*palette\.png: palette image \(mode P\): colours looked up", (), ("palette",)), id="palette_png"),
    pytest.param(Case(lambda d: tifffile.imwrite(d / "stripped.tif", HE, photometric="rgb", rowsperstrip=16, compression="zlib",
                                                 resolution=(4e4, 4e4), resolutionunit="CENTIMETER") or d / "stripped.tif", "same", "",
                      (), ("stripped",), args=("--backend", "openslide")), id="stripped_tiff_openslide_cannot_read"),
    # options: a decimal comma (read as the pair (0, 25) by the command line) is named, with the fix
    pytest.param(Case(_he_png, "error", r"--mpp: '0,25' is not a number \(use a decimal point: 0\.25\)", args=("--mpp", "0,25")),
                 id="mpp_decimal_comma"),
]


def _model_args(model: str, request) -> list[str]:
    """segment.py options of the network of a case."""
    if model == "shipped":
        return []
    return ["--model", str(request.getfixturevalue("small_model"))]  # the file records its architecture


def _run(argv: list[str], as_subprocess: bool, capfd) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``segment.py argv``."""
    if as_subprocess:
        proc = subprocess.run([sys.executable, str(SEGMENT), *argv], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        return proc.returncode, proc.stdout, proc.stderr
    capfd.readouterr()
    try:
        segment_script.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capfd.readouterr()
    return code, out, err


def _outputs_of(out: Path, name: str) -> list[str]:
    """Files of the output folder that belong to the slide ``name`` (any that looks like an output)."""
    if not out.is_dir():
        return []
    return sorted(p.name for p in out.iterdir() if p.name.split(".")[0] in (name, f"{name}_overlay", f"{name}_instances"))


@pytest.fixture(scope="module")
def original_nuclei(tmp_path_factory, request) -> list:
    """Nucleus polygons of the 8-bit RGB original, segmented like the conversion cases."""
    d = tmp_path_factory.mktemp("original")
    code = segment_script.main([str(_he_png(d)), "--out", str(d / "out"), "--base_magnification", "40", *COMMON, *_model_args("small", request)])
    assert code is None
    summary, features = check_outputs(d / "out", "he", HE.shape[:2], is_image=True)
    assert summary["nuclei"] > 30
    return features


@pytest.mark.parametrize("case", CASES)
def test_bad_input(case: Case, tmp_path, capfd, request):
    made = case.make(tmp_path)
    inputs = json.dumps([str(p) for p in made]) if isinstance(made, list) else str(made)
    out = tmp_path / "out"
    code, stdout, stderr = _run([inputs, "--out", str(out), *case.args, *COMMON, *_model_args(case.model, request)], case.subprocess, capfd)
    if case.outcome == "error":
        assert code == 1, f"exit status {code}; stderr: {stderr[-2000:]}"
        message = stderr[stderr.rindex("segment.py: error: ") :]
        assert "Traceback" not in message
        assert re.search(case.words, message), message
        for name in case.bad:
            assert name in message
            assert _outputs_of(out, name) == [], f"outputs left for {name}"
            assert name not in complete_slides(out)
    else:
        assert code == 0, f"exit status {code}; stderr: {stderr[-3000:]}"
        if case.words:
            assert re.search(case.words, stdout), stdout[-3000:]
    if len(case.bad) and len(case.good):  # a batch: each bad slide logged when found, the others go on
        assert stdout.count("Skipping it; the other slides go on.") == len(case.bad)
    for i, name in enumerate(case.good):
        summary = json.loads((out / f"{name}.json").read_text())
        is_image = "instances" in summary["outputs"]
        summary, features = check_outputs(out, name, summary["level0_shape"], is_image=is_image)
        assert summary["nuclei"] >= case.min_nuclei
        if case.outcome == "no_tissue":
            assert summary["nuclei"] == 0 and summary["windows"] == 0 and "no tissue found" in summary["warnings"][0]
            assert (out / f"{name}.csv").read_text().splitlines()[0].startswith("id,centroid_x")
        if case.outcome in ("same", "similar") and i == 0:
            original = request.getfixturevalue("original_nuclei")
            if case.outcome == "same":
                assert [f["geometry"] for f in features] == [f["geometry"] for f in original]
            else:
                assert abs(len(features) - len(original)) <= 0.1 * len(original) + 2
        if case.check is not None and i == 0:
            case.check(summary, features)


# --- large TIFFs are read by regions ---------------------------------------------------------------


def test_big_stripped_tiff_is_read_by_regions(tmp_path):
    """A 12000 x 12000 RGB TIFF in deflate strips of 16 rows (432 MB of pixels; as a PNG it would be
    refused): reading a region decodes only the strips it overlaps."""
    height = width = 12_000
    rows = 16

    def strip(k: int, n: int) -> np.ndarray:  # strip k: rows of value 37 k mod 200, plus x mod 50
        return np.broadcast_to(((k * 37) % 200 + np.arange(width, dtype=np.uint16) % 50).astype(np.uint8)[None, :, None], (n, width, 3))

    encoded = [zlib.compress(np.ascontiguousarray(strip(k, rows)).tobytes(), 1) for k in range(7)]
    count = -(-height // rows)
    path = tmp_path / "big.tif"
    tifffile.imwrite(path, (encoded[k % 7] for k in range(count)), shape=(height, width, 3), dtype=np.uint8, photometric="rgb",
                     rowsperstrip=rows, compression="zlib")
    assert height * width > MAX_WHOLE_IMAGE_PIXELS
    tracemalloc.start()
    try:
        with Slide(path, "openslide", base_magnification=40) as slide:
            region = slide.read_level((5000, 7000), (300, 200))
            _, peak = tracemalloc.get_traced_memory()
            assert slide.backend == "tifffile" and not slide.is_image and slide.shape == (height, width)
    finally:
        tracemalloc.stop()
    expected = ((np.arange(5000, 5300) // rows % 7) * 37 % 200)[:, None] + (np.arange(7000, 7200) % 50)[None, :]
    assert region.shape == (3, 300, 200) and all((region[c] == expected).all() for c in range(3))
    # the 19 strips under the region are 11 MB decoded; the level is 432 MB
    assert peak < 0.05 * height * width * 3, f"peak {peak / 1e6:.0f} MB"


def test_big_uncompressed_tiff_is_memory_mapped(tmp_path):
    """An uncompressed single-strip TIFF (tifffile's default) of 432 MB of pixels: a region is
    read through a memory map, not by decoding the one strip."""
    path = tmp_path / "flat.tif"
    pixels = _big_uncompressed_tiff(path, 12_000, 12_000)
    pixels[6000:6100, 3000:3050] = (90, 50, 140)
    pixels.flush()
    del pixels
    tracemalloc.start()
    try:
        with Slide(path, "cucim", base_magnification=40) as slide:
            region = slide.read_level((5990, 2990), (120, 70))
            _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (region[:, 10:110, 10:60] == np.array([90, 50, 140])[:, None, None]).all()
    assert region[:, :10].max() == 0 and region[:, 110:].max() == 0
    assert peak < 5e6, f"peak {peak / 1e6:.0f} MB"
