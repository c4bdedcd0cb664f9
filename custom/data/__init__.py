"""Datasets on disk: the prepared layout every dataset is converted to (prepared) and the
MoNuSeg download and XML-to-label conversion (monuseg)."""

from . import monuseg, prepared

__all__ = ["monuseg", "prepared"]
