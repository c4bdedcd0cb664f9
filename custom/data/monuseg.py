"""MoNuSeg 2018: download, and conversion of the official archive to the prepared layout.

The official archives (Kumar et al., TMI 2017/2019; CC BY-NC-SA 4.0) hold H&E
tiles as ``*.tif`` (1000x1000 RGB, 40x, ~0.25 um/px) and one Aperio ImageScope
XML per tile with the nucleus outlines::

    MoNuSeg 2018 Training Data/Tissue Images/<id>.tif
    MoNuSeg 2018 Training Data/Annotations/<id>.xml
    MoNuSegTestData/<id>.tif, MoNuSegTestData/<id>.xml

They are converted to the prepared layout every dataset of the project uses::

    dataset_dir/images/<id>.png   RGB uint8 (H, W, 3)
    dataset_dir/labels/<id>.png   uint16 instance map (H, W), 0 = background
    dataset_dir/splits.json       {"train": [ids], "val": [ids], ...}

Rasterisation rule (measured against the reference label maps of the shared
data): vertices are 1-based pixel coordinates, so 1 is subtracted; a pixel
belongs to a polygon when its centre lies strictly right of / below the
polygon's left / top crossing and at or before its right / bottom crossing
(even-odd scanline fill of pixel centres, half-open towards the top-left).
Foreground Dice against the reference maps: 0.997 (TCGA-B0-5698, sub-pixel
vertices) and 0.999 (TCGA-B0-5710, integer vertices). ``skimage.draw.polygon``
reaches 0.995 and 0.948 on the same files (it keeps every polygon edge, which
for integer-vertex outlines adds a one-pixel rim); 0.5-pixel offsets or PIL's
``ImageDraw.polygon`` score 0.94-0.99.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from custom.atomic_write import write_atomic
from custom.command_line import flag

__all__ = ['MONUSEG_ARCHIVES', 'MONUSEG_ORGANS', 'MONUSEG_SPLITS', 'convert_monuseg', 'ensure_monuseg', 'has_prepared_data', 'organ_folds', 'organ_of', 'prepare_monuseg',
           'xml_to_instance_map']


# Official archives (Google Drive files linked from https://monuseg.grand-challenge.org/Data/).
# Hashes could not be checked here (no internet); they are the ones published by others:
#   md5:    a public dataset-loader module in the stored code index (class ``MoNuSeg``, fields
#           ``md5s['train data']`` / ``md5s['test data']``; its repository name was not shown);
#   sha256: constantinpape/torch-em, torch_em/data/datasets/histopathology/monuseg.py (``CHECKSUM``),
#           repeated in several forks and in an independent MoNuSeg manifest script that verified
#           the current archives (37 training + 14 test images).
# ensure_monuseg checks the sha256 (better corroborated) unless an md5 is passed explicitly.
MONUSEG_ARCHIVES: dict[str, dict[str, str | None]] = {
    "train": {
        "url": "https://drive.google.com/uc?id=1ZgqFJomqQGNnsx7w7QBzQQMVA16lbVCA",
        "filename": "MoNuSeg 2018 Training Data.zip",
        "md5": "dfe849bcb72daec2a78ae5ba0ad10ade",
        "sha256": "25d3d3185bb2970b397cafa72eb664c9b4d24294aee382e7e3df9885affce742",
    },
    "test": {
        "url": "https://drive.google.com/uc?id=1NKkSQ5T0ZNQ8aUhh0a8Dt2YKYCQXIViw",
        "filename": "MoNuSegTestData.zip",
        "md5": "0721da0cdbd267299e0463419d70e1a5",
        "sha256": "13e522387ae8b1bcc0530e13ff9c7b4d91ec74959ef6f6e57747368d7ee6f88a",
    },
}


# The paper authors' split of the 30 original training images by source slide (19 train / 11 val).
# The current training archive holds 7 more images; they are listed under "extra" in splits.json.
MONUSEG_SPLITS: dict[str, list[str]] = {
    "train": [
        "TCGA-21-5784-01Z-00-DX1", "TCGA-21-5786-01Z-00-DX1", "TCGA-38-6178-01Z-00-DX1",
        "TCGA-49-4488-01Z-00-DX1", "TCGA-A7-A13F-01Z-00-DX1", "TCGA-AR-A1AK-01Z-00-DX1",
        "TCGA-AR-A1AS-01Z-00-DX1", "TCGA-B0-5698-01Z-00-DX1", "TCGA-CH-5767-01Z-00-DX1",
        "TCGA-E2-A14V-01Z-00-DX1", "TCGA-G2-A2EK-01A-02-TSB", "TCGA-G9-6336-01Z-00-DX1",
        "TCGA-G9-6348-01Z-00-DX1", "TCGA-G9-6362-01Z-00-DX1", "TCGA-HE-7128-01Z-00-DX1",
        "TCGA-HE-7129-01Z-00-DX1", "TCGA-HE-7130-01Z-00-DX1", "TCGA-KB-A93J-01A-01-TS1",
        "TCGA-NH-A8F7-01A-01-TS1",
    ],
    "val": [
        "TCGA-18-5592-01Z-00-DX1", "TCGA-50-5931-01Z-00-DX1", "TCGA-A7-A13E-01Z-00-DX1",
        "TCGA-AY-A8YK-01A-01-TS1", "TCGA-B0-5710-01Z-00-DX1", "TCGA-B0-5711-01Z-00-DX1",
        "TCGA-DK-A2I6-01A-01-TS1", "TCGA-E2-A1B5-01Z-00-DX1", "TCGA-G9-6356-01Z-00-DX1",
        "TCGA-G9-6363-01Z-00-DX1", "TCGA-RD-A8N9-01A-01-TS1",
    ],
}


# Organ of each MoNuSeg image by its TCGA tissue source site (the second field of the id), as the
# challenge lists them (Kumar et al. 2019, table 1; the challenge calls the sites 18, 21, 38, 49, 50
# "liver", TCGA's codes say lung: the group is the same either way). The 30 images: breast 6,
# kidney 6, liver 6, prostate 6, bladder 2, colon 2, stomach 2.
MONUSEG_ORGANS: dict[str, str] = {
    "A7": "breast", "AR": "breast", "E2": "breast",
    "B0": "kidney", "HE": "kidney",
    "18": "liver", "21": "liver", "38": "liver", "49": "liver", "50": "liver",
    "G9": "prostate", "CH": "prostate",
    "DK": "bladder", "G2": "bladder",
    "AY": "colon", "NH": "colon",
    "KB": "stomach", "RD": "stomach",
}


def organ_of(image_id: str) -> str:
    """The organ of a MoNuSeg image id (``TCGA-<site>-...``, :data:`MONUSEG_ORGANS`).

    Raises:
        ValueError: when the id is not a TCGA id of one of those sites.
    """
    parts = str(image_id).split("-")
    if len(parts) < 3 or parts[0] != "TCGA" or parts[1] not in MONUSEG_ORGANS:
        raise ValueError(f"{image_id!r}: not a MoNuSeg image id (TCGA-<site>-... with a site among {sorted(MONUSEG_ORGANS)}).")
    return MONUSEG_ORGANS[parts[1]]


def organ_folds(ids: Iterable[str], min_images: int = 4) -> dict[str, list[str]]:
    """Leave-one-organ-out folds: organ -> its ids, in the order given. Organs with fewer than
    ``min_images`` images are pooled into one fold ``"other"`` (bladder, colon and stomach have two
    MoNuSeg images each: one fold of 6 instead of three of 2)."""
    by_organ: dict[str, list[str]] = {}
    for i in ids:
        by_organ.setdefault(organ_of(i), []).append(i)
    folds = {organ: members for organ, members in by_organ.items() if len(members) >= min_images}
    other = [i for organ, members in by_organ.items() if len(members) < min_images for i in members]
    if other:
        folds["other"] = other
    return folds


_IMAGE_SUFFIXES = {".tif", ".tiff"}
_FIX_HINT = (
    "Fix: pass --dataset_dir /path/to/prepared/monuseg (layout images/*.png, labels/*.png, optional "
    "splits.json), or download the official archive by hand (MoNuSeg 2018 Training Data.zip from "
    "https://monuseg.grand-challenge.org/Data/), extract it and run "
    "`python scripts/prepare_monuseg.py --raw_dir /path/to/extracted --out_dir {root}`."
)


def _read_regions(xml_path: Path) -> list[np.ndarray]:
    """Polygons of an ImageScope XML, in document order.

    Returns
    -------
    list of np.ndarray
        One float64 array ``(V, 2)`` of ``(x, y)`` vertices per ``Region``, in
        0-based pixel coordinates (the file's 1-based values minus 1).
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as e:
        raise ValueError(f"{xml_path}: not a readable MoNuSeg/ImageScope XML file ({e}).") from e
    regions = list(root.iter("Region"))
    if not regions:
        raise ValueError(f"{xml_path}: no <Region> elements; not a MoNuSeg/ImageScope annotation file.")
    polygons = []
    for k, region in enumerate(regions, start=1):
        vertices = []
        for vertex in region.iter("Vertex"):
            try:
                x, y = float(vertex.attrib["X"]), float(vertex.attrib["Y"])
            except (KeyError, ValueError) as e:
                raise ValueError(f"{xml_path}: region {k} has a vertex without numeric X/Y ({e!r}).") from e
            if not (math.isfinite(x) and math.isfinite(y)):
                raise ValueError(f"{xml_path}: region {k} has a non-finite vertex ({x}, {y}).")
            vertices.append((x - 1.0, y - 1.0))
        polygons.append(np.asarray(vertices, dtype=np.float64).reshape(-1, 2))
    return polygons


def _fill_polygon(vertices: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Pixels whose centres lie inside a polygon (even-odd rule, half-open to the top-left).

    Parameters
    ----------
    vertices : np.ndarray
        ``(V, 2)`` float ``(x, y)`` in 0-based pixel coordinates (pixel ``(r, c)`` has its
        centre at ``x = c, y = r``); the polygon is closed implicitly.
    shape : tuple of int
        ``(H, W)`` of the image; pixels outside are dropped.

    Returns
    -------
    rows, cols : np.ndarray
        int64 indices of the pixels inside. A pixel centre on a left/top edge is outside,
        one on a right/bottom edge inside, so adjacent polygons sharing an edge do not overlap.
    """
    h, w = shape
    if len(vertices) < 3:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    x0, y0 = vertices[:, 0], vertices[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    lo, hi = np.minimum(y0, y1), np.maximum(y0, y1)
    r_first = max(0, math.floor(lo.min()) + 1)  # first row strictly below the top
    r_last = min(h - 1, math.floor(hi.max()))
    rows_out, cols_out = [], []
    for r in range(r_first, r_last + 1):
        crossing = (lo < r) & (r <= hi)  # horizontal edges never cross
        if not crossing.any():
            continue
        xa, ya, xb, yb = x0[crossing], y0[crossing], x1[crossing], y1[crossing]
        xs = np.sort(xa + (r - ya) * (xb - xa) / (yb - ya))
        for left, right in zip(xs[0::2], xs[1::2]):
            c0 = max(math.floor(left) + 1, 0)
            c1 = min(math.floor(right), w - 1)
            if c1 >= c0:
                cols_out.append(np.arange(c0, c1 + 1))
                rows_out.append(np.full(c1 - c0 + 1, r))
    if not rows_out:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    return np.concatenate(rows_out).astype(np.int64), np.concatenate(cols_out).astype(np.int64)


def xml_to_instance_map(xml_path: str | Path, shape: Sequence[int]) -> np.ndarray:
    """Rasterise a MoNuSeg (Aperio ImageScope) XML file to an instance label map.

    Parameters
    ----------
    xml_path : str or Path
        The annotation file: ``Region`` elements with ``Vertices/Vertex`` ``X``, ``Y``
        attributes in 1-based pixel coordinates (floats).
    shape : sequence of int
        ``(H, W)`` of the image in pixels (extra trailing entries, e.g. channels, are ignored).

    Returns
    -------
    np.ndarray
        uint16 ``(H, W)``: 0 background, ``k`` for the k-th ``Region`` in document order
        (1..N). Later regions overwrite earlier ones where they overlap; a region with no
        pixel centre inside (degenerate or outside the image) keeps its id but is absent.

    Raises
    ------
    ValueError
        Naming the file, when it is not valid XML, has no ``Region`` or a bad vertex, or
        has more than 65535 regions.
    """
    xml_path = Path(xml_path)
    if len(shape) < 2 or int(shape[0]) <= 0 or int(shape[1]) <= 0:
        raise ValueError(f"{xml_path}: image shape must be (H, W) with positive sizes, got {tuple(shape)}.")
    h, w = int(shape[0]), int(shape[1])
    polygons = _read_regions(xml_path)
    if len(polygons) > np.iinfo(np.uint16).max:
        raise ValueError(f"{xml_path}: {len(polygons)} regions do not fit a uint16 label map.")
    label = np.zeros((h, w), dtype=np.uint16)
    for k, vertices in enumerate(polygons, start=1):
        rows, cols = _fill_polygon(vertices, (h, w))
        label[rows, cols] = k
    return label


def _is_junk(path: Path) -> bool:
    """macOS resource forks (``__MACOSX/``, ``._name``) and hidden files shipped in the archives."""
    return path.name.startswith(".") or any(part == "__MACOSX" for part in path.parts)


def _find_pairs(raw_dir: Path) -> list[tuple[str, Path, Path]]:
    """``(id, image, xml)`` for every ``*.tif`` under ``raw_dir`` (any nesting), sorted by id."""
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"{raw_dir}: not a directory; expected the extracted official MoNuSeg archive.")
    images: dict[str, Path] = {}
    xmls: dict[str, Path] = {}
    for path in sorted(raw_dir.rglob("*")):
        rel = path.relative_to(raw_dir)
        if not path.is_file() or _is_junk(rel):
            continue
        suffix = path.suffix.lower()
        table = images if suffix in _IMAGE_SUFFIXES else xmls if suffix == ".xml" else None
        if table is None:
            continue
        if path.stem in table:
            raise ValueError(f"{raw_dir}: two files for id {path.stem!r}: {table[path.stem]} and {path}.")
        table[path.stem] = path
    if not images:
        raise FileNotFoundError(
            f"{raw_dir}: no *.tif images found. Expected the extracted official archive, e.g. "
            "'MoNuSeg 2018 Training Data/Tissue Images/*.tif' with 'Annotations/*.xml'."
        )
    missing = [p for stem, p in images.items() if stem not in xmls]
    if missing:
        raise FileNotFoundError(
            f"{missing[0]}: no annotation {missing[0].stem}.xml found anywhere under {raw_dir}"
            + (f" ({len(missing) - 1} more images lack one)" if len(missing) > 1 else "")
            + "."
        )
    return [(stem, images[stem], xmls[stem]) for stem in sorted(images)]


def convert_monuseg(raw_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Convert an extracted official MoNuSeg archive to the prepared layout.

    Parameters
    ----------
    raw_dir : str or Path
        Folder holding ``<id>.tif`` images and ``<id>.xml`` annotations at any depth
        (e.g. ``MoNuSeg 2018 Training Data/Tissue Images`` and ``.../Annotations``, or the
        flat ``MoNuSegTestData``). ``__MACOSX`` folders and ``._*`` files are ignored.
    out_dir : str or Path
        Receives ``images/<id>.png`` (RGB uint8 ``(H, W, 3)``, alpha dropped) and
        ``labels/<id>.png`` (uint16 ``(H, W)`` instance map, see :func:`xml_to_instance_map`).
        Each PNG is written to a temporary name and renamed, so no half-written file ever
        carries its final name; the label of an id is written before its image.

    Returns
    -------
    list of str
        The converted ids, sorted.

    Raises
    ------
    FileNotFoundError
        When ``raw_dir`` holds no ``*.tif``, or an image has no XML of the same stem (named).
    ValueError
        For duplicate ids, an unreadable image (named) or a malformed XML (named).
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    pairs = _find_pairs(raw_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "labels").mkdir(parents=True, exist_ok=True)
    for image_id, image_path, xml_path in pairs:
        try:
            with Image.open(image_path) as im:
                rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise ValueError(f"{image_path}: cannot be read as an image ({e}).") from e
        label = xml_to_instance_map(xml_path, rgb.shape[:2])
        write_atomic(out_dir / "labels" / f"{image_id}.png", lambda tmp: Image.fromarray(label).save(tmp, format="PNG"))
        write_atomic(out_dir / "images" / f"{image_id}.png", lambda tmp: Image.fromarray(rgb).save(tmp, format="PNG"))
    return [image_id for image_id, _, _ in pairs]


def _splits_for(ids: Iterable[str]) -> dict[str, list[str]] | None:
    """The paper's split restricted to ``ids`` (others under "extra"); None if it does not apply."""
    ids = list(ids)
    present = set(ids)
    splits = {name: [i for i in members if i in present] for name, members in MONUSEG_SPLITS.items()}
    if not all(splits.values()):
        return None
    known = {i for members in MONUSEG_SPLITS.values() for i in members}
    extra = [i for i in ids if i not in known]
    if extra:
        splits["extra"] = extra
    return splits


def _publish(staging: Path, root: Path) -> None:
    """Move a converted dataset from ``staging`` into ``root``: labels, splits.json, images last."""
    for sub in ("labels", "splits.json", "images"):
        src, dst = staging / sub, root / sub
        if not src.exists():
            continue
        if sub == "splits.json":
            if not dst.exists():  # never replace the user's split
                os.replace(src, dst)
            continue
        if dst.is_dir() and not any(dst.iterdir()):
            dst.rmdir()
        if not dst.exists():
            os.replace(src, dst)  # one rename: images/ appears complete or not at all
        else:
            for f in sorted(src.iterdir()):
                os.replace(f, dst / f.name)


def prepare_monuseg(raw_dir: str | Path, dataset_dir: str | Path) -> list[str]:
    """Convert an extracted archive into ``dataset_dir`` all at once.

    Converts into a hidden staging folder inside ``dataset_dir`` and moves ``labels/``,
    ``splits.json`` and finally ``images/`` into place only when every image is done, so
    a failed or interrupted run never leaves an ``images/`` that looks prepared.

    Parameters
    ----------
    raw_dir : str or Path
        The extracted official archive (see :func:`convert_monuseg`).
    dataset_dir : str or Path
        Destination of the prepared layout. ``splits.json`` is written (unless one exists)
        when the converted ids include the paper's 30 training images: :data:`MONUSEG_SPLITS`
        restricted to them, with any other id under ``"extra"``.

    Returns
    -------
    list of str
        The converted ids, sorted.
    """
    root = Path(dataset_dir)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".monuseg-staging-", dir=root))
    try:
        ids = convert_monuseg(raw_dir, staging)
        splits = _splits_for(ids)
        if splits is not None:
            (staging / "splits.json").write_text(json.dumps(splits, indent=1) + "\n")
        _publish(staging, root)
        return ids
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def has_prepared_data(dataset_dir: str | Path | None) -> bool:
    """True when ``dataset_dir/images/*.png`` exists (the prepared layout)."""
    if dataset_dir is None:
        return False
    image_dir = Path(dataset_dir) / "images"
    return image_dir.is_dir() and next(image_dir.glob("*.png"), None) is not None


def _one_line(error: BaseException, limit: int = 400) -> str:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _archive_name(url: str) -> str:
    name = Path(unquote(urlparse(url).path)).name or "monuseg.zip"
    return name if name.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz")) else name + ".zip"


def _download_and_extract(url: str, archive: Path, extract_dir: Path, hash_val: str | None, hash_type: str) -> None:
    """Download ``url`` to ``archive`` (kept, so a rerun does not download again) and extract it.

    Uses MONAI's ``download_url`` (Google Drive through gdown, hash check, atomic move) and
    ``extractall`` rather than ``download_and_extract``: the latter first sniffs the file
    name from the server (an extra HTTP request) and raises when the sniffed extension
    differs from ``archive``'s, which happens with Google Drive's ``uc?id=`` links. The
    extraction goes to a temporary folder renamed to ``extract_dir`` when complete.
    """
    from monai.apps.utils import download_url, extractall

    download_url(url, filepath=archive, hash_val=hash_val, hash_type=hash_type)
    if (extract_dir / ".complete").is_file():
        return
    shutil.rmtree(extract_dir, ignore_errors=True)
    partial = extract_dir.with_name(f".{extract_dir.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        extractall(archive, output_dir=partial, has_base=False)
        (partial / ".complete").touch()
        os.replace(partial, extract_dir)
    finally:
        shutil.rmtree(partial, ignore_errors=True)


def ensure_monuseg(
    dataset_dir: str | Path,
    download: bool = True,
    url: str | None = None,
    md5: str | None = None,
    archive: str = "train",
) -> str:
    """Return a folder holding prepared MoNuSeg data, downloading and converting it if needed.

    Parameters
    ----------
    dataset_dir : str or Path
        Returned as is when it already holds ``images/*.png``. Otherwise the archive is
        downloaded to and extracted under ``dataset_dir/raw/`` (kept for reruns) and
        converted into ``dataset_dir`` with :func:`prepare_monuseg`.
    download : bool
        False: never download; raise when no prepared data is there.
    url : str, optional
        Archive URL (zip or tar). Default: the official Google Drive file of ``archive``.
    md5 : str, optional
        md5 of the archive to check. With the default URL and no md5, the published sha256
        of :data:`MONUSEG_ARCHIVES` is checked; with a custom URL and no md5, none.
    archive : {"train", "test"}
        Which official archive the default URL refers to.

    Returns
    -------
    str
        ``dataset_dir``.

    Raises
    ------
    RuntimeError
        When no prepared data is there and it cannot be made (download disabled, no internet,
        hash mismatch, conversion error). The message names the folder, gives the underlying
        error in one line and says how to fix it (``--dataset_dir`` or
        ``scripts/prepare_monuseg.py``). Nothing that looks prepared (``images/``) is left behind.
    """
    root = Path(dataset_dir)
    if has_prepared_data(root):
        return str(dataset_dir)
    fix = _FIX_HINT.format(root=root)
    if not flag(download, "download"):
        raise RuntimeError(
            f"{root}: holds no prepared MoNuSeg data (images/*.png), and downloading is disabled (download=False). {fix}"
        )
    if archive not in MONUSEG_ARCHIVES:
        raise ValueError(f"archive must be one of {sorted(MONUSEG_ARCHIVES)}, got {archive!r}.")
    if url is None:
        spec = MONUSEG_ARCHIVES[archive]
        url, filename = str(spec["url"]), str(spec["filename"])
        hash_val, hash_type = (md5, "md5") if md5 else (spec["sha256"], "sha256")
    else:
        filename = _archive_name(url)
        hash_val, hash_type = md5, "md5"
    raw = root / "raw"
    created_raw = not raw.exists()
    try:
        raw.mkdir(parents=True, exist_ok=True)
        extract_dir = raw / filename.split(".")[0]
        _download_and_extract(url, raw / filename, extract_dir, hash_val, hash_type)
        prepare_monuseg(extract_dir, root)
    except Exception as e:
        if created_raw and raw.is_dir() and not any(raw.iterdir()):
            raw.rmdir()
        raise RuntimeError(
            f"{root}: holds no prepared MoNuSeg data (images/*.png), and preparing it from {url} failed: "
            f"{_one_line(e)}. {fix}"
        ) from e
    if not has_prepared_data(root):  # pragma: no cover - prepare_monuseg raises first
        raise RuntimeError(f"{root}: conversion produced no images/*.png. {fix}")
    return str(dataset_dir)
