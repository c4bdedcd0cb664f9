"""MONAI Label app serving the nuclei bundle to QuPath and DSA (polygons, one per nucleus).

    monailabel start_server --app monailabel_app --studies SLIDES_DIR --conf models nuclei_attention

``--conf models`` names the model: ``nuclei_attention`` is this repository's ``bundle/``;
any other name is a bundle folder ``monailabel_app/model/<name>`` (a copy or a link of a
bundle with the same layout). ``--conf mpp 0.25`` / ``--conf base_magnification 40`` give
the pixel size of plain images (PNG/JPEG) whose files do not carry one. See README.md here.
"""

import logging
import os
from pathlib import Path
from typing import Dict

import torch
from lib.infers import NucleiBundleInferTask

import monailabel
from monailabel.datastore.dsa import DSADatastore
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.activelearning.random import Random

# the repository; the bundle's Python package custom/ comes from `pip install -r requirements.txt` (pip install -e .)
REPO = Path(__file__).resolve().parents[1]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "nuclei_attention"


def bundle_paths(app_dir: str, conf: Dict[str, str]) -> Dict[str, str]:
    """``{model name: bundle folder}`` for ``--conf models a,b`` (default: this repository's bundle)."""
    names = [m.strip() for m in (conf.get("models") or DEFAULT_MODEL).split(",") if m.strip()]
    paths = {}
    for name in names:
        local = os.path.join(app_dir, "model", name)
        path = local if os.path.isdir(local) else str(REPO / "bundle") if name == DEFAULT_MODEL else None
        if path is None:
            raise ValueError(f"--conf models {name}: no bundle folder {local}; the built-in model is {DEFAULT_MODEL!r}.")
        paths[name] = path
    return paths


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.bundles = bundle_paths(app_dir, conf)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name=f"MONAILabel - self-supervised nuclei ({monailabel.__version__})",
            description="Nucleus polygons from the self-supervised attention network (MONAI bundle) for QuPath and DSA",
            version=monailabel.__version__,
        )

    def init_remote_datastore(self) -> Datastore:
        """``--studies http://<dsa>/api/v1 --conf dsa_folder <id> [--conf dsa_api_key ... --conf dsa_asset_store_path ...]``:
        slides from a Digital Slide Archive, as in MONAI Label's pathology sample app."""
        return DSADatastore(
            api_url=self.studies,
            api_key=self.conf.get("dsa_api_key"),
            folder=self.conf.get("dsa_folder"),
            annotation_groups=self.conf.get("dsa_groups"),
            asset_store_path=self.conf.get("dsa_asset_store_path"),
        )

    def init_infers(self) -> Dict[str, InferTask]:
        infers: Dict[str, InferTask] = {}
        for name, path in self.bundles.items():
            task = NucleiBundleInferTask(path, self.conf)
            if not task.is_valid():
                raise ValueError(f"{path}: not a loadable bundle (configs/inference.json and models/model.pt are needed).")
            logger.info(f"+++ Adding Inferer:: {name} => {path}")
            infers[name] = task
        return infers

    def init_strategies(self) -> Dict[str, Strategy]:
        return {"random": Random()}

    def infer_wsi(self, request, datastore=None):
        """MONAI Label's tiling of a slide region; on a server without CUDA, tiles run on the
        requested device (its default spreads them over CUDA devices, of which there are none)."""
        if not torch.cuda.is_available():
            request = {**request, "multi_gpu": False}
        return super().infer_wsi(request, datastore)


def main():
    """Run one inference without a server: ``python monailabel_app/main.py --studies DIR --image ID``."""
    import argparse
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("-s", "--studies", required=True, help="folder of slides / images")
    parser.add_argument("-i", "--image", required=True, help="image id (file name without extension) in --studies")
    parser.add_argument("-m", "--model", default=DEFAULT_MODEL)
    parser.add_argument("--location", type=int, nargs=2, default=[0, 0], help="level-0 x y")
    parser.add_argument("--size", type=int, nargs=2, default=[1024, 1024], help="width height")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", default="json", choices=("json", "dsa", "asap"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] [%(levelname)s] (%(name)s) - %(message)s")
    app = MyApp(os.path.dirname(os.path.abspath(__file__)), args.studies, {"models": args.model})
    res = app.infer_wsi({"model": args.model, "image": args.image, "device": args.device, "location": args.location,
                         "size": args.size, "tile_size": [1024, 1024], "output": args.output, "min_poly_area": 80})
    params = res["params"]
    n = sum(len(e["contours"]) for a in params.get("annotations", []) if a for e in (a.get("annotation") or {}).get("elements", []))
    print(json.dumps({"file": res["file"], "nuclei": n, "latencies": params.get("latencies")}))


if __name__ == "__main__":
    main()
