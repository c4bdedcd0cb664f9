"""Whole slides: reading at a magnification (slide), tissue detection (tissue), training tiles and
inference windows (datasets), the region loader of the inference workflow (load_region), nucleus
polygons and GeoJSON/CSV export (export), and the stitched per-slide outputs (writer)."""

from . import datasets, export, load_region, slide, tissue, writer

__all__ = ["datasets", "export", "load_region", "slide", "tissue", "writer"]
