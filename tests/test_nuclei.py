"""Per-nucleus output: polygons, measurements, GeoJSON features, atomic writers."""

from __future__ import annotations

import csv
import json
import math
import uuid

import numpy as np
import pytest
from scipy import ndimage
from shapely.geometry import Polygon

from custom.wsi.export import CSV_COLUMNS, GeoJSONWriter, NucleusCSVWriter, instance_polygons, nucleus_feature, nucleus_measurements


def _disc(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def _shapes() -> np.ndarray:
    """Disc, rectangle, L, single pixel, horizontal and vertical lines, two touching squares."""
    lab = np.zeros((40, 60), np.int32)
    lab[_disc(lab.shape, 10, 10, 6)] = 1
    lab[2:5, 20:27] = 2  # rectangle 3 x 7
    lab[10:18, 20:23] = 3  # L: vertical bar ...
    lab[15:18, 23:28] = 3  # ... and foot
    lab[30, 5] = 4  # single pixel
    lab[25, 30:40] = 5  # 1-px horizontal line
    lab[20:32, 45] = 6  # 1-px vertical line
    lab[30:35, 50:54] = 7  # two squares sharing an edge
    lab[30:35, 54:58] = 8
    return lab


def _check_ring(ring, count, bbox, tolerance):
    """bbox = (x0, y0, x1, y1) in edge coordinates."""
    assert ring[0] == ring[-1], "ring not closed"
    assert len({tuple(p) for p in ring}) >= 4
    poly = Polygon(ring)
    assert poly.is_valid, "self-intersecting ring"
    assert poly.exterior.is_ccw, "positive shoelace area expected"
    assert abs(poly.area - count) <= tolerance * poly.length + 1e-9
    x0, y0, x1, y1 = poly.bounds
    assert x0 >= bbox[0] and y0 >= bbox[1] and x1 <= bbox[2] and y1 <= bbox[3]


@pytest.mark.parametrize("tolerance", [0.0, 0.5, 1.0])
def test_polygons_of_shapes_are_valid_and_trace_the_pixels(tolerance):
    lab = _shapes()
    polys = instance_polygons(lab, tolerance=tolerance)
    assert sorted(polys) == list(range(1, 9))
    for i, sl in enumerate(ndimage.find_objects(lab)):
        count = int((lab == i + 1).sum())
        bbox = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        _check_ring(polys[i + 1], count, bbox, tolerance)
    # shapes without staircases are exact at any of these tolerances
    for lab_id in (2, 3, 4, 5, 6, 7, 8):
        assert Polygon(polys[lab_id]).area == (lab == lab_id).sum()
    assert sorted(map(tuple, polys[4][:-1])) == [(5.0, 30.0), (5.0, 31.0), (6.0, 30.0), (6.0, 31.0)]
    assert Polygon(polys[7]).touches(Polygon(polys[8]))  # shared edge, no overlap


def test_polygons_exact_without_simplification():
    lab = _shapes()
    for lab_id, ring in instance_polygons(lab, tolerance=0).items():
        assert Polygon(ring).area == (lab == lab_id).sum()


def test_offset_and_scale():
    lab = _shapes()
    plain = instance_polygons(lab)
    moved = instance_polygons(lab, offset=(100, 7), scale=4.0)
    assert plain.keys() == moved.keys()
    for k in plain:
        expected = (np.asarray(plain[k]) + [7, 100]) * 4.0
        np.testing.assert_allclose(moved[k], expected)


def test_disconnected_instance_gives_largest_piece_and_holes_are_filled():
    lab = np.zeros((30, 30), np.int32)
    lab[2:7, 2:7] = 1  # 25 px
    lab[20:22, 20:22] = 1  # 4 px, same id
    lab[10:20, 10:20] = 2
    lab[13:16, 13:16] = 0  # hole
    lab[25, 25] = 3  # diagonal neighbours only: two 4-connected pieces
    lab[26, 26] = 3
    lab[26, 27] = 3
    pinched = np.full((3, 3), 4)  # a loop whose hole meets the outside at a corner only
    pinched[0, 0] = pinched[1, 1] = 0
    polys = instance_polygons(lab)
    assert Polygon(polys[1]).area == 25 and Polygon(polys[1]).bounds == (2, 2, 7, 7)
    assert Polygon(polys[2]).area == 100
    assert Polygon(polys[3]).is_valid and Polygon(polys[3]).area == 2
    for k in range(4):
        for variant in (np.rot90(pinched, k), np.rot90(pinched, k)[:, ::-1]):
            ring = instance_polygons(np.ascontiguousarray(variant))[4]
            assert Polygon(ring).is_valid and Polygon(ring).area == 8


@pytest.mark.parametrize("tolerance", [0.5, 2.0, 4.0])
def test_random_blobs_stay_valid_under_strong_simplification(tolerance):
    rng = np.random.default_rng(0)
    for _ in range(10):
        mask = ndimage.gaussian_filter(rng.random((40, 40)), 1.5) > 0.5
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))  # 8-connected: diagonal joints
        polys = instance_polygons(lab, tolerance=tolerance)
        assert len(polys) == n
        for ring in polys.values():
            poly = Polygon(ring)
            assert poly.is_valid and poly.exterior.is_ccw and poly.area > 0 and len(ring) >= 5


def test_polygon_input_errors():
    with pytest.raises(ValueError, match="labels"):
        instance_polygons(np.zeros((4, 4), float))
    with pytest.raises(ValueError, match="labels"):
        instance_polygons(np.zeros((4, 4, 1), int))
    with pytest.raises(ValueError, match="scale"):
        instance_polygons(np.ones((4, 4), int), scale=0)
    with pytest.raises(ValueError, match="tolerance"):
        instance_polygons(np.ones((4, 4), int), tolerance=-1)
    assert instance_polygons(np.zeros((4, 4), int)) == {}


def _painted(lab, colours):
    rgb = np.full(lab.shape + (3,), 255, np.uint8)
    for lab_id, colour in colours.items():
        rgb[lab == lab_id] = colour
    return rgb


def test_measurements_of_disc_and_ellipse():
    lab = np.zeros((61, 141), np.int32)
    r = 20
    lab[_disc(lab.shape, 30, 40, r)] = 1
    yy, xx = np.mgrid[:61, :141]
    lab[((yy - 30) / 5.0) ** 2 + ((xx - 105) / 25.0) ** 2 <= 1] = 2
    mpp = 0.25
    rows = nucleus_measurements(lab, _painted(lab, {1: (80, 40, 130), 2: (240, 190, 210)}), mpp)
    assert [row["label"] for row in rows] == [1, 2]
    assert all(list(row) == ["label", "centroid_y", "centroid_x", "area_um2", "perimeter_um", "eccentricity", "mean_hematoxylin"] for row in rows)
    assert all(type(v) is float for row in rows for k, v in row.items() if k != "label")
    disc, ellipse = rows
    assert disc["area_um2"] == pytest.approx(math.pi * r * r * mpp * mpp, rel=0.02)
    assert disc["perimeter_um"] == pytest.approx(2 * math.pi * r * mpp, rel=0.05)
    assert (disc["centroid_y"], disc["centroid_x"]) == (30.0, 40.0)
    assert (ellipse["centroid_y"], ellipse["centroid_x"]) == (30.0, 105.0)
    assert disc["eccentricity"] < 0.1
    assert ellipse["eccentricity"] > 0.95
    assert disc["mean_hematoxylin"] > ellipse["mean_hematoxylin"]  # dark purple vs pale pink


def test_measurement_input_errors():
    lab = np.ones((4, 4), np.int32)
    with pytest.raises(ValueError, match="rgb"):
        nucleus_measurements(lab, np.zeros((4, 5, 3), np.uint8), 0.5)
    with pytest.raises(ValueError, match="rgb"):
        nucleus_measurements(lab, np.zeros((4, 4, 3), np.float32), 0.5)
    with pytest.raises(ValueError, match="mpp"):
        nucleus_measurements(lab, np.zeros((4, 4, 3), np.uint8), 0.0)


def test_nucleus_feature_structure():
    ring = [[0, 0], [2, 0], [2, 2], [0, 2]]  # not closed: closed by the function
    feat = nucleus_feature(ring, {"area_um2": np.float32(3.5), "eccentricity": float("nan"), "n": np.int64(2)}, name="Tumor", color=(255, 0, 0))
    assert set(feat) == {"type", "id", "geometry", "properties"}
    assert feat["type"] == "Feature"
    uuid.UUID(feat["id"])  # a valid uuid
    assert feat["geometry"] == {"type": "Polygon", "coordinates": [[[0.0, 0.0], [2.0, 0.0], [2.0, 2.0], [0.0, 2.0], [0.0, 0.0]]]}
    props = feat["properties"]
    assert props["objectType"] == "detection"
    assert props["classification"] == {"name": "Tumor", "color": [255, 0, 0]}
    assert props["measurements"] == {"area_um2": 3.5, "n": 2.0}  # NaN dropped
    assert all(type(v) is float for v in props["measurements"].values())
    json.dumps(feat, allow_nan=False)
    assert nucleus_feature(ring, object_id="abc")["id"] == "abc"
    assert nucleus_feature(ring)["properties"]["classification"] == {"name": "Nucleus", "color": [0, 200, 0]}
    with pytest.raises(ValueError, match="polygon"):
        nucleus_feature([[0, 0], [1, 1]])
    with pytest.raises(ValueError, match="color"):
        nucleus_feature(ring, color=(0, 300, 0))


def test_geojson_writer(tmp_path):
    path = tmp_path / "nuclei.geojson"
    lab = _shapes()
    with GeoJSONWriter(path) as writer:
        for ring in instance_polygons(lab).values():
            writer.add(nucleus_feature(ring, {"area_um2": 1.0}))
        assert not path.exists() and writer.partial.exists()
    assert writer.count == 8
    assert not writer.partial.exists()
    data = json.loads(path.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 8
    assert all(f["properties"]["objectType"] == "detection" and f["geometry"]["type"] == "Polygon" for f in data["features"])
    assert len(path.read_text().splitlines()) == 8 + 2  # one feature per line
    with pytest.raises(ValueError):
        writer.add(nucleus_feature([[0, 0], [1, 0], [1, 1]]))


def test_geojson_writer_empty_and_failure(tmp_path):
    empty = tmp_path / "empty.geojson"
    assert GeoJSONWriter(empty).close() == empty
    assert json.loads(empty.read_text()) == {"type": "FeatureCollection", "features": []}

    path = tmp_path / "failed.geojson"
    with pytest.raises(RuntimeError):
        with GeoJSONWriter(path) as writer:
            writer.add(nucleus_feature([[0, 0], [1, 0], [1, 1]]))
            raise RuntimeError("inference crashed")
    assert not path.exists() and not writer.partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.geojson"]

    # an aborted rerun leaves the previous complete file untouched
    writer = GeoJSONWriter(empty)
    writer.add(nucleus_feature([[0, 0], [1, 0], [1, 1]]))
    writer.abort()
    assert json.loads(empty.read_text())["features"] == []


def test_csv_writer(tmp_path):
    path = tmp_path / "nuclei.csv"
    meas = {"area_um2": 12.3456789, "perimeter_um": 13.0, "eccentricity": 0.5, "mean_hematoxylin": float("nan")}
    with NucleusCSVWriter(path) as writer:
        writer.add(1, 1234.5678, 10.0, meas)
        writer.add(2, 0.0, 5.25, {**meas, "mean_hematoxylin": 0.1})
    assert writer.count == 2
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_COLUMNS == ("id", "centroid_x", "centroid_y", "area_um2", "perimeter_um", "eccentricity", "mean_hematoxylin")
    assert rows[1] == ["1", "1234.57", "10.00", "12.3457", "13", "0.5", ""]
    assert rows[2] == ["2", "0.00", "5.25", "12.3457", "13", "0.5", "0.1"]

    failed = tmp_path / "failed.csv"
    with pytest.raises(KeyError):
        with NucleusCSVWriter(failed) as writer:
            writer.add(1, 0.0, 0.0, meas)
            raise KeyError("boom")
    assert not failed.exists() and not writer.partial.exists()
    writer = NucleusCSVWriter(failed)
    writer.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nuclei.csv"]


def test_polygons_traced_together_equal_one_by_one():
    """instance_polygons traces all instances at once; each ring is the one the per-instance
    tracing of its crop gives (touching instances, several pieces, holes, corner contacts)."""
    from custom.wsi.export import _trace_all, _trace_outer

    rng = np.random.default_rng(3)
    for k in range(40):
        labels = (rng.random((30, 40)) < 0.6) * rng.integers(1, 7, (30, 40))
        labels = ndimage.median_filter(labels, 3) if k % 2 else labels
        objects = ndimage.find_objects(labels)
        traced = _trace_all(labels, objects)
        for idx, sl in enumerate(objects):
            if sl is not None:
                expected = _trace_outer(labels[sl] == idx + 1) + np.array([sl[1].start, sl[0].start])
                assert np.array_equal(traced[idx + 1], expected)
