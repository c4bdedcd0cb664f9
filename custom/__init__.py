"""Self-supervised nuclei segmentation with attention (Sahasrabudhe et al., MICCAI 2020).

Packages, one per job
---------------------
model       the attention network F, its percentile sigmoid, the F+G scale model, losses,
            mixed precision, and the shipped model file (``model.pt``)
data        the prepared dataset layout (images/, labels/, splits.json) and MoNuSeg preparation
training    the self-supervised workflow: multi-magnification tiles, the training iteration,
            its Ignite handlers (checkpoints, resume, seeds, TensorBoard, model export)
inference   attention over a whole image (exact tiling, test-time augmentation) and the
            post-processing that turns it into nucleus instances
evaluation  AJI/AHD/Dice/PQ metrics, classical baselines, per-image reports, error analysis
wsi         whole slides: reading at a magnification, tissue, slide datasets, region loading,
            stitched outputs (QuPath GeoJSON, CSV, overlay, summary)

Modules shared by all of them
-----------------------------
transforms    dihedral group, Reinhard colour transfer, HED jitter (array + dict pairs)
command_line  checks of ``monai.bundle run`` overrides and boolean settings from the command line
atomic_write  whole-or-absent file writes

Config expressions reach them as ``$custom.model.networks.AttentionNet`` after ``import custom``:
each package is imported on first use, so a script needing only ``custom.command_line`` does not
pay for torch and MONAI.
"""

import importlib

_SUBMODULES = ("atomic_write", "command_line", "data", "evaluation", "inference", "model", "training", "transforms", "wsi")
__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_SUBMODULES))
