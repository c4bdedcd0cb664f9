"""Self-supervised nuclei segmentation with attention (Sahasrabudhe et al., MICCAI 2020).

Modules
-------
config      boolean settings as they arrive from the command line
files       atomic file writes (whole or absent)
networks    attention network F, percentile sigmoid, the F+G scale model
losses      scale, smoothness and equivariance losses
transforms  dihedral group, Reinhard colour transfer, HED jitter (array + dict pairs)
data        prepared-layout reading, multi-magnification datasets, balanced batch sampler
monuseg     MoNuSeg download and XML-to-label conversion
engine      the training iteration run by MONAI's SupervisedTrainer
handlers    Ignite handlers: TensorBoard attention maps, model export
inference   whole-image attention inference: exact tiling, test-time augmentation
postprocess attention map -> nucleus instances (the paper's watershed), transform + handler
metrics     AJI, AHD, ADC (the authors' definitions), AJI+, PQ, F1 as MONAI/Ignite metrics
nuclei      nucleus polygons and measurements, streaming GeoJSON (QuPath) and CSV writers
wsi         whole-slide reading (cuCIM / OpenSlide) at a magnification, tissue detection, slide lists
wsi_data    whole-slide datasets: multi-magnification training tiles, inference windows
wsi_outputs whole-slide inference outputs: stitched nuclei, GeoJSON/CSV/overlay/summary per slide
"""

import importlib

_SUBMODULES = ("baselines", "config", "data", "engine", "files", "handlers", "inference", "losses", "metrics", "monuseg", "networks",
               "nuclei", "postprocess", "regions", "transforms", "wsi", "wsi_data", "wsi_outputs")
__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    """Config expressions (``"$custom.data.list_ids(...)"`` after ``import custom``) reach the submodules as
    attributes: each is imported on first use, so that a script needing one light module (e.g.
    ``custom.config``) does not pay for torch and MONAI."""
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
