"""Nucleus instance map -> MONAI Label's polygon result, for QuPath and DSA.

MONAI Label's pathology clients read polygons from ``result["annotation"]`` in the layout
that ``monailabel.transform.post.FindContoursd`` writes and ``PolygonWriter`` /
``create_dsa_annotations_json`` / ``create_asap_annotations_xml`` consume::

    {"location": [x, y], "size": [w, h],
     "elements": [{"label": "Nucleus", "contours": [[[x, y], ...], ...]}],
     "labels": {"Nucleus": [r, g, b]}}

``FindContoursd`` traces one mask per label value, which would merge touching nuclei of an
instance map; :class:`NucleiToPolygonsd` gives one polygon per nucleus instead, from the
bundle's own :func:`custom.wsi.export.instance_polygons` (as in the whole-slide GeoJSON), in
level-0 slide pixels. Nothing here imports MONAI Label, so it runs (and is tested) without it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from custom.wsi.export import instance_polygons
from custom.inference.postprocess import keep_centred

__all__ = ["NucleiToPolygonsd", "polygon_area"]


def polygon_area(ring: Sequence[Sequence[float]]) -> float:
    """Absolute shoelace area of a ring ``[[x, y], ...]`` (closed or not), in squared coordinate units."""
    xy = np.asarray(ring, dtype=np.float64)
    if len(xy) < 3:
        return 0.0
    x, y = xy[:, 0], xy[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


class NucleiToPolygonsd(MapTransform):
    """One polygon per nucleus of an instance map, in level-0 pixels, as MONAI Label's annotation result.

    Reads ``data[key]``, the ``(1, H, W)`` or ``(H, W)`` integer instance map of the array
    that :class:`custom.wsi.load_region.LoadRegiond` read (0 = background), and that transform's
    ``region_origin`` (y, x analysis pixels), ``region_core`` (y0, x0, y1, x1 in the array),
    ``scale_to_level0`` and ``analysis_mpp`` (defaults: the whole array, origin 0, scale 1).
    Nuclei whose centroid lies outside the core (they belong to the neighbouring tile, which
    sees them whole) or whose area exceeds ``max_nucleus_um2`` are dropped, as in the
    whole-slide workflow; so are polygons smaller than the request's ``min_poly_area``
    (level-0 pixels squared; QuPath/DSA send 80 by default).

    Writes ``data[key]`` = the kept instances ``(1, H, W)`` int32 renumbered 1..N, and
    ``data[result][result_output_key]`` = the annotation dict in the module docstring, each
    contour an open ring of ``[x, y]`` level-0 pixel-edge coordinates (rounded to 0.01 px).

    Args:
        keys: the instance-map key ("pred").
        label: the annotation class name shown in QuPath/DSA.
        color: its RGB colour.
        max_nucleus_um2: larger instances are dropped (0: no limit).
        tolerance: polygon simplification in analysis pixels (0: the exact pixel boundary).
        result, result_output_key: where the annotation goes (MONAI Label's "result" / "annotation").
    """

    def __init__(self, keys: KeysCollection = "pred", label: str = "Nucleus", color: Sequence[int] = (0, 200, 0), max_nucleus_um2: float = 400.0,
                 tolerance: float = 1.0, result: str = "result", result_output_key: str = "annotation"):
        super().__init__(keys)
        if max_nucleus_um2 < 0 or tolerance < 0:
            raise ValueError(f"max_nucleus_um2 and tolerance must be >= 0, got {max_nucleus_um2}, {tolerance}.")
        self.label, self.color = str(label), [int(c) for c in color]
        self.max_nucleus_um2, self.tolerance = float(max_nucleus_um2), float(tolerance)
        self.result, self.result_output_key = result, result_output_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            labels = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
            if labels.ndim == 3 and labels.shape[0] == 1:
                labels = labels[0]
            if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
                raise ValueError(f"{key!r} must be an integer instance map (1, H, W) or (H, W), got {labels.dtype} {labels.shape}.")
            core = d.get("region_core")
            core = (0, 0, *labels.shape) if core is None else tuple(int(v) for v in core)
            origin = tuple(int(v) for v in d.get("region_origin", (0, 0)))
            scale = float(d.get("scale_to_level0", 1.0))
            mpp = d.get("analysis_mpp")
            max_size = int(self.max_nucleus_um2 / float(mpp) ** 2) if mpp and self.max_nucleus_um2 else 0
            kept = keep_centred(labels, core, max_size)
            rings = instance_polygons(kept, offset=origin, scale=scale, tolerance=self.tolerance)
            min_area = float(d.get("min_poly_area") or 0)
            contours = [[[round(x, 2), round(y, 2)] for x, y in ring[:-1]] for ring in rings.values() if polygon_area(ring) >= min_area]
            d[key] = torch.as_tensor(kept[None].astype(np.int32))
            result = dict(d.get(self.result) or {})
            result[self.result_output_key] = {
                "location": list(d.get("location") or [0, 0]),
                "size": list(d.get("size") or [0, 0]),
                "elements": [{"label": self.label, "contours": contours}] if contours else [],
                "labels": {self.label: self.color},
            }
            d[self.result] = result
        return d
