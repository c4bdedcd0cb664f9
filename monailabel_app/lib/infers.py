"""MONAI Label inference task for the nuclei bundle: the bundle's own keys, polygons out.

:class:`NucleiBundleInferTask` is MONAI Label's ``BundleInferTask`` (what the stock
``monaibundle`` app uses) on ``bundle/``: network from ``network_def`` + ``models/model.pt``,
``preprocessing``, ``inferer`` and ``postprocessing`` from ``configs/inference.json``. It
adds what a pathology client needs: ``info()["pathology"] = True``, context around each
requested tile (the bundle's halo plus the network's receptive radius, so nuclei on tile
borders are whole and counted once), :class:`lib.transforms.NucleiToPolygonsd` after the
bundle's post-processing, and MONAI Label's ``PolygonWriter`` (DSA JSON, ASAP XML or plain
JSON, as the request's ``output`` asks) instead of a label-image file.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.bundle import BundleInferTask
from monailabel.transform.writer import PolygonWriter

from custom.inference.inferer import receptive_field_radius

from .transforms import NucleiToPolygonsd

LABEL = "Nucleus"
LABEL_COLOR = (0, 200, 0)


class NucleiBundleInferTask(BundleInferTask):
    """``BundleInferTask`` on the nuclei bundle returning one polygon per nucleus (level-0 pixels).

    Args:
        path: the bundle folder (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``).
        conf: the server's ``--conf`` values; ``mpp`` / ``base_magnification`` set the level-0
            pixel size of images whose metadata lacks one (plain PNG/JPEG tiles).
        **kwargs: passed to ``BundleInferTask``.
    """

    def __init__(self, path: str, conf: Dict[str, str], **kwargs):
        kwargs.setdefault("type", InferType.SEGMENTATION)
        kwargs.setdefault("load_strict", True)  # model.pt is this network's exact state dict: a mismatch is an error
        super().__init__(path, conf, **kwargs)
        if not self.valid:
            return
        self.labels = {LABEL: 1}
        context = int(self.bundle_config.get_parsed_content("halo")) + receptive_field_radius(self.network)
        self._config.update({"context": context, "label_colors": {LABEL: list(LABEL_COLOR)}})
        for key in ("mpp", "base_magnification"):
            if conf.get(key):
                self._config[key] = float(conf[key])

    def info(self) -> Dict[str, Any]:
        i = super().info()
        i["pathology"] = True
        return i

    def post_transforms(self, data=None) -> Sequence[Callable]:
        post = list(super().post_transforms(data))
        post.append(NucleiToPolygonsd(
            keys=self.key_pred,
            label=LABEL,
            color=LABEL_COLOR,
            max_nucleus_um2=float(self.bundle_config.get_parsed_content("max_nucleus_um2")),
            tolerance=float(self.bundle_config.get_parsed_content("polygon_tolerance")),
        ))
        return post

    def writer(self, data, extension=None, dtype=None):
        return PolygonWriter(label=self.output_label_key, json=self.output_json_key)(data)
