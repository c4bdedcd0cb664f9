"""The shipped model file (``model.pt``): writing and reading F's weights, running tau, stain target,
normalisation settings and tuned post-processing, with errors that name the file."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from custom.atomic_write import write_atomic
from custom.model.networks import ATTENTION_NETWORKS, AttentionNet

__all__ = ['build_attention_network', 'load_attention_weights', 'save_attention_network', 'stored_postprocess', 'stain_settings_of', 'stain_target_of']


def build_attention_network(architecture: dict, source: str = "the model file") -> torch.nn.Module:
    """The attention network an ``architecture`` record describes (``{"_target_": "custom.model.networks.<class>",
    **constructor arguments}``, as written by the network's ``architecture()``); only the classes of
    :data:`custom.model.networks.ATTENTION_NETWORKS` are built.

    Raises:
        ValueError: naming ``source`` when the record names another class or arguments the class does not take.
    """
    record = dict(architecture)
    name = str(record.pop("_target_", "")).rsplit(".", 1)[-1]
    if name not in ATTENTION_NETWORKS:
        raise ValueError(f"{source}: its architecture record names {architecture.get('_target_')!r}, not one of "
                         f"{sorted(ATTENTION_NETWORKS)}.")
    try:
        return ATTENTION_NETWORKS[name](**record)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: cannot build its {name} from the stored architecture {architecture!r}: {e}") from e


def save_attention_network(net: torch.nn.Module, path: str | os.PathLike) -> Path:
    """Write F's state dict (weights, BatchNorm statistics, running tau, stain target and
    tuned post-processing) to ``path`` atomically (temporary name, then rename).

    Raises:
        FloatingPointError: when a weight or buffer is NaN/Inf (nothing is written).
    """
    state = {k: (v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v) for k, v in net.state_dict().items()}
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"not exporting {path}: non-finite values in {bad[:3]}.")
    path = Path(path)
    write_atomic(path, lambda tmp: torch.save(state, tmp))
    return path


def _read_attention_state(path: str | os.PathLike) -> dict:
    """F's state dict from ``model.pt`` or a training checkpoint, with the errors of :func:`load_attention_weights`."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"model weights {path}: no such file. Pass --model_path (or --model) the model.pt to use.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (zip/pickle errors of torch.load come in many types)
        raise ValueError(
            f"model weights {path}: not a readable PyTorch checkpoint ({type(e).__name__}: {str(e).splitlines()[0][:200]}). "
            "The file is truncated or not a model; copy or export it again."
        ) from None  # the first line of torch's message is kept above; its traceback adds nothing for the user
    if isinstance(state, dict) and isinstance(state.get("network"), dict):
        state = {k[len("attention."):]: v for k, v in state["network"].items() if k.startswith("attention.")}
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{path}: holds no attention-network weights (expected model.pt or a training checkpoint).")
    return state


def stored_postprocess(path: str | os.PathLike) -> dict:
    """The tuned post-processing stored in a model file by ``scripts/tune_postprocess.py --write_model``.

    Returns:
        the keyword arguments of :func:`custom.inference.postprocess.attention_to_instances` plus
        ``r`` (the sigmoid slope the maps were tuned at) and ``tuned_on``, as stored.

    Raises:
        FileNotFoundError, ValueError: as :func:`load_attention_weights`; ValueError also when
            the file stores no tuned post-processing (the message says how to tune it).
    """
    extra = _read_attention_state(path).get("_extra_state") or {}
    postprocess = dict(extra.get("postprocess") or {}) if isinstance(extra, dict) else {}
    if not postprocess:
        raise ValueError(f"{path}: stores no tuned post-processing; run scripts/tune_postprocess.py --checkpoint {path} --write_model.")
    return postprocess


def load_attention_weights(net: AttentionNet, path: str) -> torch.nn.Module:
    """Load F's weights and running tau from ``path`` into ``net`` (in place) and return it.

    A file that records its architecture (bundle 0.14.0 on) gets the network it records: when
    that differs from ``net`` (another class, e.g. the compact student, or another width), the
    recorded network is built, loaded and returned instead, so ``--model_path`` alone selects a
    model. Files without the record are loaded into ``net`` (the config's ``network_def``).

    Accepts the exported ``model.pt`` (F's state dict) or a training checkpoint
    (``{"network": state of ScaleAttentionModel, ...}``, F's keys under ``attention.``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is not a readable PyTorch checkpoint, holds no attention-network
            weights, or weights of another width/architecture (each message names the file).
        FloatingPointError: a weight or buffer in ``path`` is NaN or infinite.
    """
    state = _read_attention_state(path)
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise FloatingPointError(f"model weights {path}: NaN or infinite values in {bad[:3]}; use an earlier checkpoint.")
    if "_extra_state" not in state:  # saved before stain target / post-processing were stored: keep the net's own
        state = {**state, "_extra_state": net.get_extra_state()}
    extra = state["_extra_state"] or {}
    if "stain_prior_gain" not in extra:
        raise ValueError(f"{path}: stores no stain_prior_gain (exported before bundle 0.6.0), so the gain its weights were "
                         "trained with is unknown; retrain it with this version of the bundle.")
    architecture = extra.get("architecture")
    if architecture and architecture != net.architecture():
        net = build_attention_network(architecture, f"model weights {path}")
        logging.getLogger(__name__).info(f"{path}: {architecture['_target_'].rsplit('.', 1)[-1]} as the file records it "
                                          f"(not the config's network_def): {architecture}")
    stored_prior = extra.get("stain_prior")
    if stored_prior is not None and stored_prior != net.stain_prior:  # "logit" and "none" have the same weights: check by name
        raise ValueError(f"{path}: was trained with stain_prior={stored_prior!r}, the network is built with "
                         f"stain_prior={net.stain_prior!r}. Set --stain_prior {stored_prior}.")
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(
            f"{path}: does not fit this attention network ({net.architecture()}): {str(e).splitlines()[0]} "
            "Files exported before bundle 0.14.0 do not record their architecture: set the config's network "
            "(train.json's --width/--dilations/--stain_prior) to the one it was trained with."
        ) from e
    return net


def stain_target_of(network, source: str = "the model") -> tuple[list, list]:
    """The Reinhard target ``(LAB means, LAB stds)`` stored in an attention network's
    state (``network.stain_target``), for normalising new images as in training.

    Raises:
        ValueError: naming ``source`` when the weights carry no stain target (exported
        before it was stored): re-export them with ``scripts/tune_postprocess.py``.
    """
    target = getattr(network, "stain_target", None)
    if not target or len(target) != 2:
        raise ValueError(
            f"{source}: the weights carry no Reinhard stain target; re-export them with scripts/tune_postprocess.py "
            "(which stores the training images' target) or train with this version of the bundle."
        )
    return target[0], target[1]


STAIN_SETTING_KEYS = ("brightness_percentile", "max_std_ratio")


def stain_settings_of(network, source: str = "the model") -> dict:
    """The Reinhard settings an attention network was trained with, ``{"brightness_percentile":
    float or None, "max_std_ratio": float or None}``, from its state (``network.stain_settings``).

    Raises:
        ValueError: naming ``source`` when the weights store no settings (exported before
            bundle 0.5.0: retrain or re-export them), lack a key or hold an unusable value.
    """
    stored = getattr(network, "stain_settings", None)
    if stored is None:
        raise ValueError(f"{source}: the weights store no stain normalisation settings (exported before bundle 0.5.0); "
                         "retrain, or re-export them with scripts/tune_postprocess.py --write_model.")
    missing = set(STAIN_SETTING_KEYS) - set(stored)
    if missing:
        raise ValueError(f"{source}: the model's stain_settings lack {sorted(missing)}: got {stored!r}.")
    return {key: None if stored[key] is None else float(stored[key]) for key in STAIN_SETTING_KEYS}
