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

import functools
import json
import math
import os
import uuid
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage
from skimage.color import rgb2hed

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


def _ring_edges(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed pixel-boundary edges of every instance of ``labels`` at once.

    Returns ``(label, start, end)`` int64 arrays, one entry per edge, sorted by label; corners
    are numbered ``row * (W + 1) + column`` in ``labels``' edge coordinates. Edges go as in
    :func:`_trace_outer` (interior on the right when y points down, so rings have positive
    shoelace area): top (c, r) -> (c+1, r), right (c+1, r) -> (c+1, r+1), bottom
    (c+1, r+1) -> (c, r+1), left (c, r+1) -> (c, r).
    """
    w1 = labels.shape[1] + 1
    p = np.pad(labels, 1)
    lab = p[1:-1, 1:-1]
    parts = []
    for neighbour, start, end in (
        (p[:-2, 1:-1], (0, 0), (0, 1)),  # top
        (p[1:-1, 2:], (0, 1), (1, 1)),  # right
        (p[2:, 1:-1], (1, 1), (1, 0)),  # bottom
        (p[1:-1, :-2], (1, 0), (0, 0)),  # left
    ):
        r, c = np.nonzero((lab != neighbour) & (lab > 0))
        parts.append((lab[r, c], (r + start[0]) * w1 + c + start[1], (r + end[0]) * w1 + c + end[1]))
    labs, starts, ends = (np.concatenate([q[i] for q in parts]).astype(np.int64) for i in range(3))
    order = np.argsort(labs, kind="stable")
    return labs[order], starts[order], ends[order]


def _trace_all(labels: np.ndarray, objects: list) -> dict[int, np.ndarray]:
    """:func:`_trace_outer` of every instance, traced together on the whole map.

    An instance whose boundary edges form one closed loop (one 4-connected piece without
    holes: then every corner has one outgoing edge) is traced from its top-left corner, as
    :func:`_trace_outer` does, by list ranking over all instances' edges at once (pointer
    doubling: log2 of the longest loop numpy steps); any other instance (several pieces,
    holes, pixels touching only at a corner) is handed to :func:`_trace_outer` itself.
    Returns ``{label: (N, 2) int array of (x, y) corners in labels' edge coordinates}``
    (not closed, collinear vertices removed).
    """
    w1 = labels.shape[1] + 1
    labs, starts, ends = _ring_edges(labels)
    if not len(labs):
        return {}
    n_corners = (labels.shape[0] + 1) * w1
    keys = labs * n_corners + starts  # a corner of one instance: instances that touch share corners, not edges
    order = np.argsort(keys, kind="stable")
    labs, starts, keys, end_keys = labs[order], starts[order], keys[order], (labs * n_corners + ends)[order]
    first = np.concatenate([[0], np.flatnonzero(np.diff(labs)) + 1])  # each instance's top-left corner: its smallest key
    counts = np.diff(np.append(first, len(labs)))
    nxt = np.minimum(np.searchsorted(keys, end_keys), len(keys) - 1)
    closes = keys[nxt] == end_keys  # every edge leads to an edge of the same instance (else: not one loop)
    # list ranking: cut each loop before its first edge, then rank = steps to the loop's last edge
    owner = np.repeat(np.arange(len(first)), counts)
    tail = nxt == first[owner]
    nxt = np.where(tail | ~closes, np.arange(len(keys)), nxt)
    rank = (~tail & closes).astype(np.int64)
    for _ in range(int(counts.max()).bit_length()):
        rank += rank[nxt]
        nxt = nxt[nxt]
    # one loop through all of an instance's edges: its first edge is count - 1 steps from the end, corners distinct
    unique = np.append(keys[1:] != keys[:-1], True)
    good = (rank[first] == counts - 1) & np.logical_and.reduceat(unique & closes, first)
    ordered = np.lexsort((-rank, owner))  # each instance's edges from its first one, in loop order
    corner = starts[ordered]
    xy = np.stack([corner % w1, corner // w1], axis=1)
    seg, pos = _segments(counts)
    prev = first[seg] + (pos - 1) % counts[seg]
    succ = first[seg] + (pos + 1) % counts[seg]
    d_in, d_out = xy - xy[prev], xy[succ] - xy
    turn = d_in[:, 0] * d_out[:, 1] != d_in[:, 1] * d_out[:, 0]  # collinear vertices removed
    out: dict[int, np.ndarray] = {}
    for k, (lab, f, n) in enumerate(zip(labs[first].tolist(), first.tolist(), counts.tolist())):
        if good[k]:
            out[lab] = xy[f : f + n][turn[f : f + n]]
        else:  # not one simple loop: the general route
            sl = objects[lab - 1]
            out[lab] = _trace_outer(labels[sl] == lab) + np.array([sl[1].start, sl[0].start])
    return out


def _segments(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of the given lengths (all > 0) laid end to end: each element's segment
    number and its position within the segment."""
    seg = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return seg, np.arange(int(lengths.sum())) - starts[seg]


def _simplify_all(rings: list[np.ndarray], tolerance: float) -> list[np.ndarray]:
    """Douglas-Peucker on each closed ring through the (N, 2) integer vertices of ``rings``
    (not closed), all rings together; returns each ring's kept vertices.

    The algorithm and distance of ``skimage.measure.approximate_polygon`` applied to the
    closed ring: the farthest vertex of a chord (the first of equals) is kept while its
    distance exceeds ``tolerance``, perpendicular where the projection falls inside the chord,
    else to the nearer end. Every chord still open is processed in one vectorised step, so the
    cost is a few numpy calls per level of the recursion, not per vertex. Distances are
    computed as ``math.hypot``-based scalar code would (``sqrt(dx*dx + dy*dy)`` of integer
    differences is the correctly rounded hypot, which ``math.hypot`` returns for them: checked
    exhaustively for differences up to 1500 pixels), so the kept vertices are the same.
    """
    if not rings:
        return []
    sizes = np.array([len(r) + 1 for r in rings])  # closed: first vertex repeated at the end
    offsets = np.cumsum(sizes) - sizes
    pts = np.concatenate([np.concatenate([r, r[:1]]) for r in rings]).astype(np.float64)
    x, y = pts[:, 0], pts[:, 1]
    keep = np.zeros(len(pts), bool)
    keep[offsets] = keep[offsets + sizes - 1] = True
    s, e = offsets, offsets + sizes - 1
    with np.errstate(invalid="ignore", divide="ignore"):  # zero-length chords (a closed ring's ends) take the end distance
        while True:
            open_ = e - s >= 2
            s, e = s[open_], e[open_]
            if not len(s):
                break
            seg, pos = _segments(e - s - 1)
            i = s[seg] + 1 + pos
            x0, y0, x1, y1 = x[s][seg], y[s][seg], x[e][seg], y[e][seg]
            dx, dy = x1 - x0, y1 - y0
            xi, yi = x[i], y[i]
            inside = ((xi - x0) * dx + (yi - y0) * dy > 0) & ((x1 - xi) * dx + (y1 - yi) * dy > 0)
            d = np.where(inside, np.abs(dx * (yi - y0) - dy * (xi - x0)) / np.sqrt(dx * dx + dy * dy),
                         np.minimum(np.sqrt((xi - x0) ** 2 + (yi - y0) ** 2), np.sqrt((xi - x1) ** 2 + (yi - y1) ** 2)))
            first = np.concatenate([[0], np.flatnonzero(np.diff(seg)) + 1])
            best = np.maximum.reduceat(d, first)
            at = np.minimum.reduceat(np.where(d == best[seg], i, len(pts)), first)
            split = best > tolerance
            keep[at[split]] = True
            s, e = np.concatenate([s[split], at[split]]), np.concatenate([at[split], e[split]])
    return [pts[o : o + n - 1][keep[o : o + n - 1]].astype(rings[0].dtype) for o, n in zip(offsets.tolist(), sizes.tolist())]


def _valid_simplified(rings: list[np.ndarray]) -> np.ndarray:
    """For each ring of (N, 2) integer vertices (not closed): True when it has >= 4 vertices,
    a positive shoelace area and is simple: no self-intersection or touching, no pair of
    adjacent edges folding back onto each other (exact integer arithmetic). All rings are
    tested together: every pair of non-adjacent edges of a ring in one vectorised step."""
    ok = np.array([len(r) >= 4 for r in rings], bool)
    idx = np.flatnonzero(ok)
    if not len(idx):
        return ok
    sizes = np.array([len(rings[k]) for k in idx])
    a = np.concatenate([rings[k] for k in idx]).astype(np.int64)
    offsets = np.cumsum(sizes) - sizes
    ring, pos = _segments(sizes)
    nxt = offsets[ring] + (pos + 1) % sizes[ring]
    b = a[nxt]  # edge j: a[j] -> b[j]
    area2 = np.bincount(ring, a[:, 0] * b[:, 1] - b[:, 0] * a[:, 1], minlength=len(idx))
    d0 = b - a
    d1 = d0[nxt]
    fold = np.bincount(ring, (d0[:, 0] * d1[:, 1] - d0[:, 1] * d1[:, 0] == 0) & ((d0 * d1).sum(1) < 0), minlength=len(idx)) > 0
    # pairs (j, k) of one ring with k >= j + 2, except its first and last edge (adjacent)
    i_all, j_all = [], []
    for off, n in zip(offsets.tolist(), sizes.tolist()):
        i, j = _pairs(n)
        i_all.append(i + off)
        j_all.append(j + off)
    i, j = np.concatenate(i_all), np.concatenate(j_all)

    def orient(p, q, r):
        return np.sign((q[:, 0] - p[:, 0]) * (r[:, 1] - p[:, 1]) - (q[:, 1] - p[:, 1]) * (r[:, 0] - p[:, 0]))

    P, Q, R, S = a[i], b[i], a[j], b[j]
    cross = (orient(P, Q, R) * orient(P, Q, S) <= 0) & (orient(R, S, P) * orient(R, S, Q) <= 0)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    overlap = np.all(np.maximum(lo[i], lo[j]) <= np.minimum(hi[i], hi[j]), axis=1)
    touching = np.bincount(ring[i], cross & overlap, minlength=len(idx)) > 0 if len(i) else np.zeros(len(idx), bool)
    ok[idx] = (area2 > 0) & ~fold & ~touching
    return ok


@functools.lru_cache(maxsize=256)
def _pairs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (j, k), k >= j + 2, of the edges of an n-gon, without (0, n - 1)."""
    i, j = np.triu_indices(n, 2)
    keep = ~((i == 0) & (j == n - 1))
    return i[keep], j[keep]


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
    traced = _trace_all(labels, ndimage.find_objects(labels))
    ids = sorted(traced)
    rings = [traced[lab] for lab in ids]
    if tolerance > 0 and rings:
        simple = _simplify_all(rings, tolerance)
        ok = _valid_simplified(simple)
        rings = [s if good else r for r, s, good in zip(rings, simple, ok.tolist())]
    out: dict[int, list[list[float]]] = {}
    for lab, xy in zip(ids, rings):
        ring = np.concatenate([xy, xy[:1]]).astype(float)
        ring[:, 0] = (ring[:, 0] + ox) * scale
        ring[:, 1] = (ring[:, 1] + oy) * scale
        out[lab] = ring.tolist()
    return out


# skimage.measure.perimeter's weights of the codes of its 3x3 neighbourhood convolution (4-neighbourhood border)
_PERIMETER_WEIGHTS = np.zeros(50, dtype=np.float64)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1
_PERIMETER_WEIGHTS[[21, 33]] = math.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + math.sqrt(2)) / 2
_PERIMETER_CODES = ((-1, -1, 10), (-1, 0, 2), (-1, 1, 10), (0, -1, 2), (0, 1, 2), (1, -1, 10), (1, 0, 2), (1, 1, 10))


def _perimeters(labels: np.ndarray, n: int) -> np.ndarray:
    """``skimage.measure.perimeter(labels == i, 4)`` for every instance ``i`` in 1..n at once.

    skimage marks the border pixels of one region (those with a 4-neighbour outside it), codes
    each as 1 plus 2 per border 4-neighbour and 10 per border diagonal neighbour of the same
    region, and returns the histogram of the codes times its weights (a dot product, made
    here per instance with the same arrays: the same sum). Only border pixels have odd codes,
    the only ones with non-zero weights, so a histogram of the border pixels alone gives the
    same result. Returns ``(n + 1,)`` float64 (entry 0 unused).
    """
    p = np.pad(labels, 1)
    lab = p[1:-1, 1:-1]
    h, w = labels.shape
    border = np.pad((lab > 0) & ((p[:-2, 1:-1] != lab) | (p[2:, 1:-1] != lab) | (p[1:-1, :-2] != lab) | (p[1:-1, 2:] != lab)), 1)
    code = border[1:-1, 1:-1].astype(np.int64)
    for dy, dx, weight in _PERIMETER_CODES:
        code += weight * (border[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] & (p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == lab))
    at = border[1:-1, 1:-1]
    histogram = np.bincount(lab[at].astype(np.int64) * 50 + code[at], minlength=(n + 1) * 50).reshape(n + 1, 50)
    return np.array([0.0] + [histogram[i] @ _PERIMETER_WEIGHTS for i in range(1, n + 1)])


def _eccentricities(flat: np.ndarray, rr: np.ndarray, cc: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Eccentricity of every instance at once (``(n + 1,)``, entry 0 unused), as ``regionprops`` defines it:
    ``sqrt(1 - l2 / l1)`` of the eigenvalues ``l1 >= l2 >= 0`` of the inertia tensor
    ``[[mu_cc, -mu_rc], [-mu_rc, mu_rr]] / n`` (central second moments over the instance's pixels), 0 where
    ``l1`` is 0. The moments come from sums of integer coordinates (exact in float64), so values agree
    with skimage's per-instance computation to rounding (about 1e-12)."""
    size = len(counts)
    n = np.maximum(counts, 1).astype(np.float64)
    sum_r, sum_c = np.bincount(flat, rr, size), np.bincount(flat, cc, size)
    mu_rr = np.bincount(flat, rr * rr, size) - sum_r * sum_r / n
    mu_cc = np.bincount(flat, cc * cc, size) - sum_c * sum_c / n
    mu_rc = np.bincount(flat, rr * cc, size) - sum_r * sum_c / n
    a, c, b = mu_cc / n, mu_rr / n, -mu_rc / n
    half_trace, spread = (a + c) / 2, np.sqrt(((a - c) / 2) ** 2 + b * b)
    l1, l2 = np.maximum(half_trace + spread, 0.0), np.maximum(half_trace - spread, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / np.where(l1 > 0, l1, 1.0), 0.0, 1.0)), 0.0)


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
    # only the instances' pixels, in raster order (the sums add the same values in the same order as over the whole array)
    at = np.flatnonzero(labels)
    flat = labels.ravel()[at].astype(np.int64)
    counts = np.bincount(flat, minlength=int(labels.max(initial=0)) + 1)
    rr, cc = (a.astype(np.float64) for a in np.divmod(at, labels.shape[1]))
    # sums of integer coordinates are exact in float64: the centroids equal regionprops' coordinate means
    sum_r, sum_c = np.bincount(flat, rr, len(counts)), np.bincount(flat, cc, len(counts))
    perimeters = _perimeters(labels, len(counts) - 1)
    eccentricity = _eccentricities(flat, rr, cc, counts)
    hematoxylin = rgb2hed(rgb.reshape(-1, 3)[at][None])[0, :, 0]  # per pixel: the same values as over the whole image
    sum_h = np.bincount(flat, hematoxylin, len(counts))
    rows = []
    for lab in np.flatnonzero(counts[1:]) + 1:
        n = counts[lab]
        rows.append(
            {
                "label": int(lab),
                "centroid_y": float(sum_r[lab] / n),
                "centroid_x": float(sum_c[lab] / n),
                "area_um2": float(n) * mpp * mpp,
                "perimeter_um": float(perimeters[lab]) * mpp,
                "eccentricity": float(eccentricity[lab]),
                "mean_hematoxylin": float(sum_h[lab] / n),
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
