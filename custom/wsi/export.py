"""Per-nucleus output of an instance segmentation: polygons, measurements, QuPath files.

Whole-slide inference writes one record per nucleus; this module turns an instance
map into those records and writes them safely.

- :func:`instance_polygons`: instance map -> one simple polygon per instance, traced
  along the pixel boundary, simplified, in output (level-0) coordinates;
- :func:`nucleus_measurements`: area, perimeter, eccentricity, mean hematoxylin
  optical density per instance;
- :func:`nucleus_feature`: a GeoJSON Feature in QuPath's import convention
  (``objectType`` ``"detection"``, ``classification`` with ``name``/``color``,
  ``measurements`` as a ``{name: value}`` object);
- :class:`GeoJSONWriter`, :class:`NucleusCSVWriter`: streaming writers that write to
  ``<path>.tmp`` and rename to ``path`` only on a successful ``close()``, so a
  failed run never leaves a complete-looking file behind.

Coordinates: pixel ``(r, c)`` covers ``x in [c, c + 1]``, ``y in [r, r + 1]`` (pixel-edge
coordinates, x right, y down). Rings are closed (first == last) and oriented so that
the shoelace signed area computed on the coordinates as written is positive
(counter-clockwise in the RFC 7946 / shapely ``is_ccw`` sense; on screen, with y
pointing down, this looks clockwise).
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed
from skimage.measure import regionprops

from custom.atomic_write import AtomicTextWriter

__all__ = ['instance_polygons', 'nucleus_measurements', 'nucleus_feature', 'GeoJSONWriter', 'NucleusCSVWriter', 'CSV_COLUMNS']


CSV_COLUMNS = ("id", "centroid_x", "centroid_y", "area_um2", "perimeter_um", "eccentricity", "mean_hematoxylin")
_CSV_MEASUREMENTS = CSV_COLUMNS[3:]


def _check_labels(labels) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 2-D integer instance map, got shape {labels.shape} dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels must be non-negative (0 = background)")
    return labels


def _trace_outer(mask: np.ndarray) -> np.ndarray:
    """Outer pixel-edge boundary of the largest 4-connected piece of ``mask`` (holes filled).

    Returns an (N, 2) int array of (x, y) corners in ``mask``'s edge coordinates, not
    closed, collinear vertices removed, positive shoelace area. After keeping one
    4-connected piece and filling the holes not 4-connected to the outside, the
    boundary never touches itself, so every corner has exactly one outgoing edge.
    """
    p = np.pad(mask, 1)
    pieces, n = ndimage.label(p)
    if n > 1:
        p = pieces == (np.argmax(np.bincount(pieces.ravel())[1:]) + 1)
    background, _ = ndimage.label(~p)
    p = background != background[0, 0]  # fill holes: keep only the outside as background
    m, w1 = p[1:-1, 1:-1], p.shape[1] - 1  # w1: corners per row of ``mask``
    r, c = np.nonzero(m & ~p[:-2, 1:-1])  # top edges: (c, r) -> (c+1, r)
    starts, ends = [r * w1 + c], [r * w1 + c + 1]
    r, c = np.nonzero(m & ~p[1:-1, 2:])  # right edges: (c+1, r) -> (c+1, r+1)
    starts.append(r * w1 + c + 1), ends.append((r + 1) * w1 + c + 1)
    r, c = np.nonzero(m & ~p[2:, 1:-1])  # bottom edges: (c+1, r+1) -> (c, r+1)
    starts.append((r + 1) * w1 + c + 1), ends.append((r + 1) * w1 + c)
    r, c = np.nonzero(m & ~p[1:-1, :-2])  # left edges: (c, r+1) -> (c, r)
    starts.append((r + 1) * w1 + c), ends.append(r * w1 + c)
    starts, ends = np.concatenate(starts), np.concatenate(ends)
    succ = dict(zip(starts.tolist(), ends.tolist()))
    first = int(starts.min())
    ring, v = [first], succ[first]
    for _ in range(len(succ)):
        if v == first:
            break
        ring.append(v)
        v = succ[v]
    else:  # unreachable while the boundary is one simple loop; guards against a hang
        raise RuntimeError("pixel boundary tracing did not close")
    ring = np.asarray(ring)
    xy = np.stack([ring % w1, ring // w1], axis=1)
    d_in = xy - np.roll(xy, 1, 0)
    d_out = np.roll(xy, -1, 0) - xy
    return xy[d_in[:, 0] * d_out[:, 1] != d_in[:, 1] * d_out[:, 0]]


def _simplify(xy: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on the closed ring through the (N, 2) vertices ``xy`` (not closed).

    The algorithm and distance of ``skimage.measure.approximate_polygon`` applied to the
    closed ring (perpendicular distance where the projection falls inside the chord,
    else distance to the nearer end), in plain Python: skimage's per-step numpy
    overhead dominates for rings of a few dozen vertices. Returns the kept vertices.
    """
    pts = xy.tolist()
    pts.append(pts[0])
    keep = [False] * len(pts)
    keep[0] = keep[-1] = True
    stack = [(0, len(pts) - 1)]
    while stack:
        s, e = stack.pop()
        if e - s < 2:
            continue
        (x0, y0), (x1, y1) = pts[s], pts[e]
        dx, dy = x1 - x0, y1 - y0
        length = math.hypot(dx, dy)
        best, at = -1.0, -1
        for i in range(s + 1, e):
            x, y = pts[i]
            if (x - x0) * dx + (y - y0) * dy > 0 and (x1 - x) * dx + (y1 - y) * dy > 0:
                d = abs(dx * (y - y0) - dy * (x - x0)) / length
            else:
                d = min(math.hypot(x - x0, y - y0), math.hypot(x - x1, y - y1))
            if d > best:
                best, at = d, i
        if best > tolerance:
            keep[at] = True
            stack += [(at, e), (s, at)]
    return xy[np.asarray(keep[:-1])]


def _signed_area(xy: np.ndarray) -> float:
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * float(np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def _is_simple(xy: np.ndarray) -> bool:
    """True when the closed ring through the (N, 2) vertices ``xy`` (not closed) has no
    self-intersection or touching (exact for the integer vertices used here)."""
    n = len(xy)
    a, b = xy, np.roll(xy, -1, 0)  # segment i: a[i] -> b[i]

    def orient(p, q, s):
        return np.sign((q[..., 0] - p[..., 0]) * (s[..., 1] - p[..., 1]) - (q[..., 1] - p[..., 1]) * (s[..., 0] - p[..., 0]))

    # adjacent segments must not fold back onto each other
    d0, d1 = b - a, np.roll(b - a, -1, 0)
    if np.any((d0[:, 0] * d1[:, 1] - d0[:, 1] * d1[:, 0] == 0) & ((d0 * d1).sum(1) < 0)):
        return False
    P, Q = a[:, None], b[:, None]
    R, S = a[None], b[None]
    cross = (orient(P, Q, R) * orient(P, Q, S) <= 0) & (orient(R, S, P) * orient(R, S, Q) <= 0)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    overlap = np.all(np.maximum(lo[:, None], lo[None]) <= np.minimum(hi[:, None], hi[None]), axis=-1)
    i, j = np.triu_indices(n, 2)
    keep = ~((i == 0) & (j == n - 1))  # the first and last segments are adjacent
    return not np.any((cross & overlap)[i[keep], j[keep]])


def instance_polygons(labels, offset: Sequence[float] = (0.0, 0.0), scale: float = 1.0, tolerance: float = 0.5) -> dict[int, list[list[float]]]:
    """Outer boundary polygon of every instance, in output coordinates.

    Args:
        labels: (H, W) integer instance map, 0 = background.
        offset: (row, col) of the array's top-left in the analysis grid, analysis pixels.
        scale: output units (level-0 pixels) per analysis pixel, > 0.
        tolerance: Douglas-Peucker tolerance in analysis pixels (0 = no simplification).

    Returns:
        ``{instance id: [[x, y], ...]}``: closed exterior ring (first == last) with
        ``x_out = (x + offset[1]) * scale``, ``y_out = (y + offset[0]) * scale``, where
        (x, y) are pixel-edge coordinates in ``labels``. The ring traces the pixel
        boundary of the instance with its holes filled (before simplification, its
        area equals the pixel count); an instance in several pieces gives its largest
        4-connected piece. Rings are simple (valid), have >= 4 distinct vertices and a
        positive shoelace area on the coordinates as written (see the module docstring);
        where simplification would break this, the unsimplified ring is kept.
    """
    labels = _check_labels(labels)
    if len(offset) != 2 or not all(math.isfinite(float(o)) for o in offset):
        raise ValueError(f"offset must be a finite (row, col) pair, got {offset!r}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance!r}")
    oy, ox = float(offset[0]), float(offset[1])
    out: dict[int, list[list[float]]] = {}
    for idx, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None:
            continue
        lab = idx + 1
        xy = _trace_outer(labels[sl] == lab)
        if tolerance > 0:
            simple = _simplify(xy, tolerance)
            if len(simple) >= 4 and _signed_area(simple) > 0 and _is_simple(simple):
                xy = simple
        ring = np.concatenate([xy, xy[:1]]).astype(float)
        ring[:, 0] = (ring[:, 0] + sl[1].start + ox) * scale
        ring[:, 1] = (ring[:, 1] + sl[0].start + oy) * scale
        out[lab] = ring.tolist()
    return out


def nucleus_measurements(labels, rgb, mpp: float) -> list[dict]:
    """Shape and stain measurements of every instance.

    Args:
        labels: (H, W) integer instance map, 0 = background.
        rgb: (H, W, 3) uint8 image, unnormalised.
        mpp: micrometres per pixel of these arrays, > 0.

    Returns:
        One dict per instance, ascending id, with keys ``label`` (int id),
        ``centroid_y``, ``centroid_x`` (pixels in this array, pixel centres at integer
        coordinates), ``area_um2``, ``perimeter_um`` (regionprops' perimeter times
        ``mpp``), ``eccentricity`` (0 = circle, -> 1 elongated) and
        ``mean_hematoxylin`` (mean hematoxylin optical density from
        ``skimage.color.rgb2hed``). Values are plain Python ints/floats.
    """
    labels = _check_labels(labels)
    rgb = np.asarray(rgb)
    if rgb.shape != labels.shape + (3,) or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be a uint8 array of shape {labels.shape + (3,)}, got shape {rgb.shape} dtype {rgb.dtype}")
    if not (math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a finite number > 0, got {mpp!r}")
    hematoxylin = rgb2hed(rgb)[..., 0]
    rows = []
    for p in regionprops(labels, intensity_image=hematoxylin):
        cy, cx = p.centroid
        rows.append(
            {
                "label": int(p.label),
                "centroid_y": float(cy),
                "centroid_x": float(cx),
                "area_um2": float(p.area) * mpp * mpp,
                "perimeter_um": float(p.perimeter) * mpp,
                "eccentricity": float(p.eccentricity),
                "mean_hematoxylin": float(p.intensity_mean),
            }
        )
    return rows


def nucleus_feature(polygon, measurements: Mapping[str, float] | None = None, object_id: str | None = None, name: str = "Nucleus", color: Sequence[int] = (0, 200, 0)) -> dict:
    """A GeoJSON Feature for one nucleus, in QuPath's import convention.

    Args:
        polygon: exterior ring ``[[x, y], ...]`` in level-0 pixels (closed here if it
            is not), at least 3 distinct positions.
        measurements: ``{name: number}`` stored as QuPath measurements; NaN/inf dropped.
        object_id: feature id (QuPath expects a UUID string); a new uuid4 if None.
        name: classification name.
        color: classification colour, three ints in [0, 255].

    Returns:
        ``{"type": "Feature", "id", "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "detection", "classification": {"name", "color"},
        "measurements": {...}}}`` with plain JSON-serialisable values.
    """
    ring = [[float(x), float(y)] for x, y in polygon]
    if ring and ring[0] != ring[-1]:
        ring.append(list(ring[0]))
    if len(ring) < 4 or not all(math.isfinite(v) for pt in ring for v in pt):
        raise ValueError(f"polygon must be a ring of >= 3 distinct finite [x, y] positions, got {len(ring)} positions")
    color = [int(v) for v in color]
    if len(color) != 3 or not all(0 <= v <= 255 for v in color):
        raise ValueError(f"color must be three ints in [0, 255], got {color!r}")
    meas = {}
    for key, value in (measurements or {}).items():
        value = float(value)
        if math.isfinite(value):
            meas[str(key)] = value
    return {
        "type": "Feature",
        "id": str(object_id) if object_id is not None else str(uuid.uuid4()),
        "geometry": {"type": "Polygon", "coordinates": [ring]},
        "properties": {"objectType": "detection", "classification": {"name": str(name), "color": color}, "measurements": meas},
    }


class GeoJSONWriter(AtomicTextWriter):
    """Streaming GeoJSON FeatureCollection writer, one feature per line.

    ``GeoJSONWriter(path)`` opens ``<path>.tmp``; ``add(feature)`` appends a feature
    dict (serialised with ``json.dumps``, NaN rejected); ``count`` is the number
    written; ``close()`` renames to ``path`` (valid JSON, also with 0 features);
    ``abort()`` deletes the partial. As a context manager it closes on success and
    aborts on an exception.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._file.write('{"type": "FeatureCollection", "features": [')

    def add(self, feature: dict) -> None:
        """Append one GeoJSON Feature dict."""
        self._check_open()
        text = json.dumps(feature, allow_nan=False)
        self._file.write(("\n" if self.count == 0 else ",\n") + text)
        self.count += 1

    def _footer(self) -> str:
        return "\n]}\n"


class NucleusCSVWriter(AtomicTextWriter):
    """Streaming per-nucleus CSV writer with columns :data:`CSV_COLUMNS`.

    Same contract as :class:`GeoJSONWriter` (``<path>.tmp`` + rename on ``close()``,
    ``abort()``, context manager, ``count``). Centroids are written with 2 decimals,
    measurements with 6 significant digits; a missing or non-finite measurement is an
    empty field.
    """

    _newline = ""

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__(path)
        self._file.write(",".join(CSV_COLUMNS) + "\n")

    def add(self, nucleus_id: int, centroid_x: float, centroid_y: float, measurements: Mapping[str, float]) -> None:
        """Append one row; centroid in output (level-0) pixels, measurements as from
        :func:`nucleus_measurements` (``area_um2`` in um^2, ``perimeter_um`` in um)."""
        self._check_open()
        fields = [str(int(nucleus_id)), f"{float(centroid_x):.2f}", f"{float(centroid_y):.2f}"]
        for key in _CSV_MEASUREMENTS:
            value = measurements.get(key)
            fields.append(f"{float(value):.6g}" if value is not None and math.isfinite(float(value)) else "")
        self._file.write(",".join(fields) + "\n")
        self.count += 1
