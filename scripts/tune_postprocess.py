"""Tune the post-processing on the validation images (paper 3.4), never on test labels.

The attention maps of the chosen images are computed once with the evaluation
workflow's own preprocessing, network and inferer (``train.json`` + ``evaluate.json``);
then the threshold (a number, or ``"otsu"``: one per image), the blur of the attention
before it, the local threshold (neighbourhood and offset; block 0: none), the opening/closing
radii (``morphology_radii``, the paper's (2, 1) or fewer; []: none), the largest hole filled
(``fill_holes``, 0: none), the marker footprint radius and least
height (``marker_h``, 0: none), the blur of the distance map and the minimum
size are searched by coordinate ascent on mean AJI (the authors' definition), starting
from the paper's values. ``--r`` sets the slope of the percentile
sigmoid the maps are computed with (default: the network's own; about 1 gives the soft
maps a per-image Otsu threshold needs) and is stored with the result. The result is written

- into a config override (``--out_config``) that ``evaluate.json`` layers on, and
- with ``--write_model``, into the model file itself (``postprocess`` in its state,
  with the Reinhard stain target of the training images if the file lacks one), so
  that inference and evaluation use the tuned values by default.

Usage::

    python scripts/tune_postprocess.py --dataset_dir ../shared/data/monuseg --checkpoint bundle/runs/train/model.pt \
        --r 1 --write_model
    python scripts/tune_postprocess.py --dataset_dir ../shared/data/monuseg --method hematoxylin_otsu \
        --out_config bundle/configs/baselines/hematoxylin_otsu_tuned.json
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import fire
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from custom.command_line import flag  # noqa: E402
from custom.atomic_write import write_atomic  # noqa: E402
from custom.evaluation.metrics import instance_metrics  # noqa: E402
from custom.model.networks import check_sigmoid_slope  # noqa: E402
from custom.inference.postprocess import OTSU, PostprocessParams, attention_to_instances  # noqa: E402

CONFIGS = REPO / "bundle" / "configs"
GRID = {
    "threshold": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, OTSU],
    "attention_sigma": [0.0, 0.5, 1.0, 1.5, 2.0],
    "local_block_size": [0, 51, 75, 101, 151, 201],
    "local_offset": [0.0, 0.02, 0.05, 0.08, 0.12],
    "morphology_radii": [[2, 1], [2], [1], []],
    "fill_holes": [0, 50, 100, 200, 400, 1000, 4000],
    "footprint_radius": [3, 4, 5, 6, 7, 9, 11],
    "marker_h": [0.0, 0.25, 0.5, 0.75, 1.0, 1.5],
    "sigma": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0],
    "min_size": [0, 10, 20, 40, 80, 120, 160],
}
# parameters of the map before it is binarised: not searched for a baseline, whose map is already binary
MAP_PARAMS = ("threshold", "attention_sigma", "local_block_size", "local_offset")
FORBIDDEN_SPLITS = ("test",)

_MAPS: list = []


def _init(maps):
    global _MAPS
    _MAPS = maps


def _score(params: dict) -> float:
    """Mean AJI over the cached (attention, label) pairs."""
    return float(np.mean([instance_metrics(gt, attention_to_instances(a, **params))["aji"] for a, gt in _MAPS]))


def attention_maps(parser) -> tuple[list, object]:
    """(attention (H, W), label (H, W)) for every image of the evaluation split of the
    evaluation config ``parser`` (a ``monai.bundle.ConfigParser``), and the network."""
    dataset, network, inferer = (parser.get_parsed_content(k) for k in ("eval#dataset", "eval#network", "eval#inferer"))
    device = parser.get_parsed_content("device")
    maps = []
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            t0 = time.time()
            a = inferer(torch.as_tensor(item["image"])[None].to(device), network)[0, 0].float().cpu().numpy()
            maps.append((a, np.asarray(item["label"])[0].astype(np.int64)))
            print(f"attention {dataset.ids[i]}: {time.time() - t0:.1f} s", flush=True)
    return maps, network


def main(
    dataset_dir: str,
    split: str = "val",
    method: str = "model",
    checkpoint: str | None = None,
    config: str | None = None,
    tta: bool = False,
    rounds: int = 2,
    workers: int = 2,
    out_config: str | None = None,
    write_model: bool = False,
    train_split: str = "train",
    r: float | None = None,
    start: str = "paper",
):
    """Search the post-processing parameters on ``split`` of ``dataset_dir``.

    Args:
        dataset_dir: prepared dataset with labels.
        split: the tuning split (validation ids); "test" is refused.
        method: "model" or a baseline name (``bundle/configs/baselines/<name>.json``).
        checkpoint: model weights (default: the bundle's ``models/model.pt``).
        config: an override file the model was trained with (e.g. ``bundle/configs/ablations/paper_settings.json``),
            layered on ``train.json`` so that the network matches the weights.
        tta: test-time augmentation for the attention maps, as at evaluation.
        rounds: passes of coordinate ascent over the parameters of ``GRID``.
        workers: processes for the search.
        out_config: where to write the override (default: ``bundle/runs/tune/<method>_tuned.json``;
            the committed ``bundle/configs/baselines/<method>_tuned.json`` changes only when named here).
        write_model: also store the values (and a missing stain target) in the model file, which must
            then be named with ``--checkpoint`` (the shipped ``bundle/models/model.pt`` too).
        train_split: the split whose images define the stain target if the model lacks one.
        r: slope of the percentile sigmoid for the maps (the inferer's ``r``; None:
            the network's ``r``); stored with the tuned values, so evaluation and inference use it.
        start: where the coordinate ascent starts: "paper" (the paper's values, no blur, no local
            threshold, no marker height, no hole filling) or "stored" (the values stored in the model file, e.g. to
            re-tune after a parameter was added; only for the model). The search finds a local
            optimum, so the two starts can end at different values.
    """
    try:
        slope = check_sigmoid_slope(r, "r")
    except ValueError as e:
        raise SystemExit(f"--r {r!r}: {e} Omit it for the network's own slope.") from None
    r = slope
    write_model = flag(write_model, "--write_model")
    if write_model and not checkpoint:
        raise SystemExit("--write_model: name the model file to store the values in with --checkpoint "
                         "(e.g. --checkpoint bundle/runs/train/model.pt; the shipped bundle/models/model.pt only by name).")
    if start not in ("paper", "stored") or (start == "stored" and method != "model"):
        raise SystemExit(f"--start {start!r}: 'paper', or 'stored' (the model file's tuned values; only with --method model).")
    if split in FORBIDDEN_SPLITS:
        raise SystemExit(f"split={split!r}: tuning on test labels is not allowed; tune on the validation split.")
    files = [str(CONFIGS / "train.json"), *([str(config)] if config else []), str(CONFIGS / "evaluate.json")]
    if method != "model":
        baseline = CONFIGS / "baselines" / f"{method}.json"
        if not baseline.is_file():
            raise SystemExit(f"--method {method!r}: no {baseline}; use 'model' or one of "
                             f"{sorted(p.stem for p in (CONFIGS / 'baselines').glob('*.json') if not p.stem.endswith('_tuned'))}.")
        files.append(str(baseline))
    from monai.bundle import ConfigParser

    tta = flag(tta, "--tta")
    parser = ConfigParser()
    parser.read_config(files)
    parser.update({"dataset_dir": dataset_dir, "download": False, "eval_split": split, "tta": tta and method == "model",
                   "eval#inferer#r": r})
    if checkpoint:
        parser["checkpoint"] = checkpoint
    model_path = Path(parser.get_parsed_content("checkpoint")) if method == "model" else None
    if model_path is not None and write_model:  # the file must carry its stain target before the evaluation reads it
        _ensure_stain_target(parser, model_path, dataset_dir, train_split)
    if start == "stored":  # before the maps (minutes): a model without stored values cannot start from them
        from custom.model.checkpoint import stored_postprocess

        try:
            stored_postprocess(model_path)
        except (OSError, ValueError) as e:
            raise SystemExit(f"--start stored: {e} Use --start paper.") from None
    maps, network = attention_maps(parser)

    # the paper's values (PostprocessParams' defaults) or the model's stored set; otsu_range is not searched
    best = PostprocessParams.from_stored(getattr(network, "postprocess", None) if start == "stored" else None).as_dict()
    with ProcessPoolExecutor(max_workers=workers, initializer=_init, initargs=(maps,)) as pool:
        best_score = pool.submit(_score, best).result()
        origin = "the stored values" if start == "stored" else "the paper's values"
        print(f"start ({origin} {best}): AJI {best_score:.4f}", flush=True)
        start = best_score
        for round_ in range(rounds):
            changed = False
            for name, values in GRID.items():
                if method != "model" and name in MAP_PARAMS:
                    continue  # a baseline's map is binary (its own pipeline blurs and thresholds)
                trials = [dict(best, **{name: v}) for v in values]
                scores = list(pool.map(_score, trials))
                k = int(np.argmax(scores))
                if scores[k] > best_score + 1e-6:
                    best, best_score, changed = trials[k], scores[k], True
                print(f"round {round_ + 1} {name}: " + ", ".join(f"{v}={s:.4f}" for v, s in zip(values, scores))
                      + f" -> {best[name]}", flush=True)
            if not changed:
                break
    print(f"tuned on {len(maps)} {split} images: AJI {start:.4f} -> {best_score:.4f} with {best}")

    out = Path(out_config) if out_config else REPO / "bundle" / "runs" / "tune" / f"{method}_tuned.json"
    override = {"postprocess": best}
    if method == "model":
        override["eval#inferer#r"] = r
    else:
        override["method"] = f"{method}_tuned"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda tmp: Path(tmp).write_text(json.dumps(override, indent=4) + "\n"))
    print(f"wrote {out}")
    if write_model and model_path is not None:
        from custom.model.checkpoint import save_attention_network

        network.postprocess = dict(best, r=r, tuned_on={"split": split, "n_images": len(maps), "aji": round(best_score, 4), "tta": tta})
        save_attention_network(network, model_path)
        print(f"stored the tuned parameters in {model_path}")


def _ensure_stain_target(parser, model_path: Path, dataset_dir: str, train_split: str) -> None:
    from custom.data.prepared import list_ids, load_rgb
    from custom.training.tiles import reinhard_target
    from custom.model.checkpoint import load_attention_weights, save_attention_network

    net = load_attention_weights(parser.get_parsed_content("network_def", instantiate=True), str(model_path))
    if net.stain_target:
        return
    ids = list_ids(dataset_dir, split=train_split)
    images = [load_rgb(Path(dataset_dir) / "images" / f"{i}.png") for i in ids]
    means, stds = reinhard_target(images, parser.get_parsed_content("reinhard_reference"), parser.get_parsed_content("brightness_percentile"))
    net.stain_target = [means, stds]
    save_attention_network(net, model_path)
    print(f"{model_path}: stored the Reinhard target of the {len(ids)} {train_split} images")


if __name__ == "__main__":
    fire.Fire(main)
