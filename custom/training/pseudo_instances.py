"""Self-training (issue 29): the confident nucleus instances of a teacher as a student's targets.

The teacher (stage 1, the attention network F, or a student of an earlier round) is run on an
unlabeled image under the 8 dihedral transforms; each map is mapped back and turned into instances
by the teacher's stored post-processing (:func:`custom.inference.postprocess.attention_to_instances`).
An instance of the identity view is kept when it is confident (:func:`instance_confidence`): its area
is within ``[min_area, max_area]``, its solidity at least ``min_solidity``, its mean attention at least
``min_margin`` above the threshold, and the other 7 views find it again (mean of their best IoU with
it at least ``min_agreement``). :func:`pseudo_instance_target` makes the student's target of it:

- channel 0, foreground: the kept instances, with a gap carved where two of them touch (the pixels of
  a kept instance within ``gap_radius`` pixels of another kept one are background), so that a single
  foreground output learns to separate touching nuclei and the watershed of the post-processing
  splits them;
- channel 1, weight: 0 ("ignore") on the rejected instances dilated by ``ignore_dilation`` pixels and on
  the background whose mean attention over the 8 views lies within ``uncertain_band`` of the mean
  threshold; 1 elsewhere (kept instances always 1).

:class:`PseudoInstanceLoss` compares the student's attention ``sigmoid(r (logits - tau))`` (its own
running tau and tuned slope, so inference is unchanged) with channel 0 on the weight-1 pixels.
No label file is read. Workflow: ``bundle/configs/selftrain.json``.

Shapes: images ``(3, H, W)`` ImageNet-normalised (the teacher's input); targets ``(2, H, W)`` float32
in {0, 1}; instance maps ``(H, W)`` int32, 0 background, instances 1..N.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.transforms import MapTransform, Transform
from scipy import ndimage
from skimage.measure import regionprops
from skimage.morphology import disk
from torch import nn

from custom.atomic_write import write_atomic
from custom.evaluation.metrics import InstanceOverlap
from custom.inference.inferer import TiledAttentionInferer
from custom.inference.postprocess import PostprocessParams, attention_foreground, attention_to_instances, foreground_to_instances
from custom.training.distillation import DistillationLoss, tuned_slope
from custom.transforms import DIHEDRAL_NAMES, dihedral, dihedral_inverse

__all__ = ['REJECTION_REASONS', 'PseudoInstanceLoss', 'PseudoInstances', 'PseudoInstancesd', 'SecondOpiniond', 'carve_touching',
           'dihedral_attention', 'instance_confidence', 'pseudo_instance_target', 'second_opinion_target', 'summarise_stats']

REJECTION_REASONS = ("area", "solidity", "margin", "agreement")
_STAT_COUNTS = ("instances", "kept", "rejected", *(f"rejected_{r}" for r in REJECTION_REASONS))


def dihedral_attention(teacher: nn.Module, image: torch.Tensor, inferer: TiledAttentionInferer,
                       views: Sequence[int] = tuple(range(len(DIHEDRAL_NAMES)))) -> list[np.ndarray]:
    """The teacher's attention of ``image`` ``(3, H, W)`` under each dihedral transform of ``views``,
    mapped back onto the image: ``t^-1(A(t(image)))``, a list of ``(H, W)`` float32 arrays (view 0 first)."""
    device = next(teacher.parameters()).device
    x = torch.as_tensor(image, dtype=torch.float32)[None].to(device)
    maps = []
    with torch.no_grad():
        for t in views:
            maps.append(dihedral_inverse(inferer(dihedral(x, t).contiguous(), teacher), t)[0, 0].float().cpu().numpy())
    return maps


def _best_iou(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """For each instance 1..N of ``reference`` (consecutive ids), its best IoU with an instance of ``other``."""
    n = int(reference.max(initial=0))
    best = np.zeros(n)
    if n and other.any():
        ov = InstanceOverlap(reference, other)
        np.maximum.at(best, ov.pair_g, ov.iou)
    return best


def instance_confidence(instances: Sequence[np.ndarray], attention: np.ndarray, threshold: float) -> dict[str, np.ndarray]:
    """Per instance of ``instances[0]`` (the identity view, ids 1..N): ``area`` (pixels), ``solidity`` (area
    over convex-hull area), ``margin`` (mean of ``attention``, the identity view's map the threshold applies
    to, inside minus ``threshold``) and ``agreement`` (mean over the other views ``instances[1:]`` of the
    best IoU with one of their instances; 1.0 without other views). Each an array ``(N,)``."""
    labels = np.asarray(instances[0])
    n = int(labels.max(initial=0))
    flat = labels.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        margin = np.bincount(flat, np.asarray(attention, np.float64).ravel(), minlength=n + 1)[1:] / area - threshold
    solidity = np.zeros(n)
    for region in regionprops(labels):
        solidity[region.label - 1] = region.solidity
    others = [_best_iou(labels, np.asarray(v)) for v in instances[1:]]
    agreement = np.mean(others, axis=0) if others else np.ones(n)
    return {"area": area, "solidity": solidity, "margin": margin, "agreement": agreement}


def carve_touching(labels: np.ndarray, radius: int = 1) -> np.ndarray:
    """Bool ``(H, W)``: the pixels of an instance within ``radius`` pixels (a square neighbourhood) of a
    pixel of another instance. Removing them leaves a gap of about ``2 radius`` pixels between touching
    instances (0: nothing carved)."""
    labels = np.asarray(labels)
    if radius <= 0 or not labels.any():
        return np.zeros(labels.shape, bool)
    size = 2 * int(radius) + 1
    lab = labels.astype(np.int64)
    top = int(lab.max()) + 1  # background above every label for the minimum
    highest = ndimage.maximum_filter(lab, size=size, mode="nearest")
    lowest = ndimage.minimum_filter(np.where(lab > 0, lab, top), size=size, mode="nearest")
    return (lab > 0) & ((highest != lab) | (lowest != lab))


def pseudo_instance_target(labels: np.ndarray, keep: np.ndarray, mean_attention: np.ndarray, threshold: float,
                           gap_radius: int = 1, ignore_dilation: int = 2, uncertain_band: float = 0.05) -> np.ndarray:
    """The student's target ``(2, H, W)`` float32 of the identity view's instances ``labels`` (ids 1..N)
    of which ``keep`` ``(N,)`` bool are confident: channel 0 the kept instances minus
    :func:`carve_touching` among them, channel 1 the weight (0 on the rejected instances dilated by
    ``ignore_dilation`` pixels and on background pixels whose ``mean_attention`` is within ``uncertain_band``
    of ``threshold``; 1 on the kept instances and elsewhere)."""
    labels = np.asarray(labels)
    lut = np.concatenate([[False], np.asarray(keep, bool)])
    kept_labels = np.where(lut[labels], labels, 0)
    kept = kept_labels > 0
    rejected = (labels > 0) & ~kept
    foreground = kept & ~carve_touching(kept_labels, gap_radius)
    weight = np.ones(labels.shape, bool)
    if uncertain_band > 0:
        weight &= ~((labels == 0) & (np.abs(np.asarray(mean_attention) - threshold) < uncertain_band))
    if rejected.any():
        if ignore_dilation > 0:
            rejected = ndimage.binary_dilation(rejected, disk(int(ignore_dilation)).astype(bool))
        weight &= ~rejected
    weight |= kept
    return np.stack([foreground, weight]).astype(np.float32)


def _check_range(name: str, value, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not np.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}.")
    return float(value)


class PseudoInstances(Transform):
    """Array transform: an ImageNet-normalised image ``(3, H, W)`` -> the target ``(2, H, W)`` float32 of
    the teacher's confident instances (module docstring); the counts of the latest call are ``last_stats``.

    Args:
        teacher: the attention network whose instances are the targets (its stored post-processing is used).
        postprocess: overrides of single post-processing values (as the bundle's ``postprocess`` key).
        min_area, max_area: the kept instances' area range, pixels (``max_area`` 0: no upper bound).
        min_solidity: least area over convex-hull area.
        min_margin: least mean attention inside minus the threshold (attention units).
        min_agreement: least mean best IoU over the other dihedral views.
        gap_radius: pixels carved on each side where two kept instances touch.
        ignore_dilation: pixels by which the rejected instances' "ignore" region exceeds them.
        uncertain_band: background within this of the threshold (mean attention of the views) is ignored.
        views: how many dihedral views (1..8, the first ``views`` of ``DIHEDRAL_NAMES``; 1: no agreement test).
        roi_size: tile size of the teacher's inferer.
    """

    def __init__(self, teacher: nn.Module, postprocess: Mapping | None = None, min_area: int = 120, max_area: int = 1500,
                 min_solidity: float = 0.8, min_margin: float = 0.15, min_agreement: float = 0.9, gap_radius: int = 1,
                 ignore_dilation: int = 2, uncertain_band: float = 0.05, views: int = 8, roi_size: int = 1024):
        if not 1 <= int(views) <= len(DIHEDRAL_NAMES):
            raise ValueError(f"views must be in 1..{len(DIHEDRAL_NAMES)}, got {views!r}.")
        self.teacher = teacher
        self.params = PostprocessParams.from_stored(getattr(teacher, "postprocess", None), postprocess)
        self.criteria = {"min_area": int(_check_range("min_area", min_area)), "max_area": int(_check_range("max_area", max_area)),
                         "min_solidity": _check_range("min_solidity", min_solidity),
                         "min_margin": _check_range("min_margin", min_margin, -1.0),
                         "min_agreement": _check_range("min_agreement", min_agreement),
                         "gap_radius": int(_check_range("gap_radius", gap_radius)),
                         "ignore_dilation": int(_check_range("ignore_dilation", ignore_dilation)),
                         "uncertain_band": _check_range("uncertain_band", uncertain_band), "views": int(views)}
        self.inferer = TiledAttentionInferer(roi_size=roi_size, tta=False, r=tuned_slope(teacher), channels_last=True)
        self.last_stats: dict = {}

    def settings(self) -> dict:
        """The criteria and post-processing: what, with the teacher's weights, determines the targets."""
        return {**self.criteria, "postprocess": self.params.as_dict(with_unmarked=True), "r": self.inferer.r}

    def reject(self, confidence: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per reason of :data:`REJECTION_REASONS`, which instances fail it (bool arrays ``(N,)``)."""
        c = self.criteria
        area = confidence["area"]
        return {"area": (area < c["min_area"]) | ((area > c["max_area"]) if c["max_area"] else False),
                "solidity": confidence["solidity"] < c["min_solidity"],
                "margin": ~(confidence["margin"] >= c["min_margin"]),
                "agreement": confidence["agreement"] < c["min_agreement"]}

    def __call__(self, img) -> torch.Tensor:
        maps = dihedral_attention(self.teacher, img, self.inferer, range(self.criteria["views"]))
        masks, thresholds, blurred = zip(*(attention_foreground(m, self.params) for m in maps), strict=True)
        instances = [foreground_to_instances(mask, self.params) for mask in masks]
        confidence = instance_confidence(instances, blurred[0], thresholds[0])
        failed = self.reject(confidence)
        keep = ~np.any(np.stack(list(failed.values())), axis=0)
        c = self.criteria
        target = pseudo_instance_target(instances[0], keep, np.mean(maps, axis=0), float(np.mean(thresholds)), c["gap_radius"],
                                        c["ignore_dilation"], c["uncertain_band"])
        self.last_stats = {"instances": int(keep.size), "kept": int(keep.sum()), "rejected": int((~keep).sum()),
                           **{f"rejected_{r}": int(failed[r].sum()) for r in REJECTION_REASONS},
                           "foreground_fraction": float(target[0].mean()), "ignore_fraction": float(1.0 - target[1].mean())}
        return torch.from_numpy(target)


def summarise_stats(stats: Mapping[str, Mapping]) -> dict:
    """Totals of per-image ``last_stats`` (a mapping id -> stats): the counts summed, the fractions averaged."""
    rows = list(stats.values())
    out = {k: int(sum(r[k] for r in rows)) for k in _STAT_COUNTS}
    for k in ("foreground_fraction", "ignore_fraction"):
        out[k] = float(np.mean([r[k] for r in rows])) if rows else 0.0
    out["images"] = len(rows)
    return out


def _fingerprint(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
    return digest.hexdigest()


def _save_target(path: Path, target: torch.Tensor, stats: dict) -> None:
    with open(path, "wb") as f:  # a file object: numpy would add ".npz" to the temporary name
        np.savez_compressed(f, target=target.numpy().astype(np.uint8), stats=json.dumps(stats))


class PseudoInstancesd(MapTransform):
    """Dictionary version of :class:`PseudoInstances`: the target of ``keys`` (one image key) goes to
    ``output_key``. Each image's counts are logged, kept in ``stats`` (id -> counts; :meth:`summary`
    totals them, and logs the totals when training starts if the transform is one of the trainer's
    handlers) and, with ``stats_key``, added to the item.

    With ``cache_dir`` the targets are also stored there (uint8 ``.npz``), named by a hash of the
    teacher's weights and state, the settings and the image, and read back by later runs: another
    teacher (the next round) or other settings make other files.

    Args:
        keys: the image key (one).
        teacher, **kwargs: see :class:`PseudoInstances`.
        output_key: where the target goes (the trainer's label).
        id_key: the item's id (for the log and ``stats``).
        stats_key: also put the counts in the item under this key (None: not).
        cache_dir: folder of stored targets (None: none).
    """

    def __init__(self, keys: KeysCollection, teacher: nn.Module, output_key: str = "label", id_key: str = "id",
                 stats_key: str | None = None, cache_dir: str | None = None, **kwargs):
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"PseudoInstancesd takes one image key, got {self.keys}.")
        self.transform = PseudoInstances(teacher, **kwargs)
        self.output_key, self.id_key, self.stats_key = output_key, id_key, stats_key
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self._key_prefix = None
        self.stats: dict[str, dict] = {}

    def _cache_path(self, image: torch.Tensor) -> Path:
        if self._key_prefix is None:
            settings = json.dumps(self.transform.settings(), sort_keys=True, default=str)
            self._key_prefix = hashlib.sha256((_fingerprint(self.transform.teacher) + settings).encode()).hexdigest()
        digest = hashlib.sha256(self._key_prefix.encode())
        digest.update(str(tuple(image.shape)).encode())
        digest.update(image.detach().cpu().float().contiguous().numpy().tobytes())
        return self.cache_dir / f"{digest.hexdigest()[:40]}.npz"

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = torch.as_tensor(d[self.keys[0]], dtype=torch.float32)
        path = self._cache_path(image) if self.cache_dir is not None else None
        if path is not None and path.is_file():
            with np.load(path) as stored:
                target, stats = torch.from_numpy(stored["target"].astype(np.float32)), json.loads(str(stored["stats"]))
        else:
            target = self.transform(image)
            stats = dict(self.transform.last_stats)
            if path is not None:
                write_atomic(path, lambda tmp: _save_target(tmp, target, stats))
        name = str(d.get(self.id_key, len(self.stats)))
        self.stats[name] = stats
        logging.getLogger(__name__).info(
            f"pseudo-instances {name}: kept {stats['kept']} of {stats['instances']} (rejected by area {stats['rejected_area']}, "
            f"solidity {stats['rejected_solidity']}, margin {stats['rejected_margin']}, agreement {stats['rejected_agreement']}); "
            f"foreground {stats['foreground_fraction']:.1%}, ignored {stats['ignore_fraction']:.1%}")
        d[self.output_key] = target
        if self.stats_key is not None:
            d[self.stats_key] = stats
        return d

    def summary(self, engine: Engine | None = None) -> dict:
        """The counts over every image seen (:func:`summarise_stats`), also logged."""
        out = summarise_stats(self.stats)
        logging.getLogger(__name__).info(f"pseudo-instances over {out['images']} images: {json.dumps(out)}")
        return out

    def attach(self, engine: Engine) -> None:
        """As a handler of the trainer: :meth:`summary` when training starts (the targets are cached by then)."""
        engine.add_event_handler(Events.STARTED, self.summary)


def second_opinion_target(target: np.ndarray, other: np.ndarray, min_overlap: float = 0.5, ignore_dilation: int = 2) -> np.ndarray:
    """``target`` ``(2, H, W)`` (foreground, weight; :func:`pseudo_instance_target`) where a second,
    independent method agrees: a foreground piece (a connected component of channel 0) of which less
    than ``min_overlap`` lies on ``other``'s foreground, and a piece of ``other``'s foreground of which
    less than ``min_overlap`` lies on the target's, get weight 0 (dilated by ``ignore_dilation`` pixels);
    the unconfirmed foreground becomes background there (ignored). ``other``: ``(H, W)``, non-zero = nucleus."""
    out = np.array(target, dtype=np.float32, copy=True)
    mine, theirs = out[0] > 0, np.asarray(other) != 0
    unconfirmed = np.zeros(mine.shape, bool)
    for a, b in ((mine, theirs), (theirs, mine)):
        pieces, n = ndimage.label(a)
        if n:
            area = np.bincount(pieces.ravel(), minlength=n + 1)
            shared = np.bincount(pieces[b], minlength=n + 1)
            lonely = shared < min_overlap * area
            lonely[0] = False
            unconfirmed |= lonely[pieces]
    if ignore_dilation > 0 and unconfirmed.any():
        unconfirmed = ndimage.binary_dilation(unconfirmed, disk(int(ignore_dilation)))
    out[0][unconfirmed] = 0.0
    out[1][unconfirmed] = 0.0
    return out


class SecondOpiniond(MapTransform):
    """Keeps only the pseudo-instance targets (``label_key``, :class:`PseudoInstancesd`) that a second
    method finds too (:func:`second_opinion_target`): ``method`` (e.g. the hematoxylin local-threshold
    baseline, :mod:`custom.evaluation.baselines`) maps the ImageNet-normalised image ``keys`` ``(3, H, W)``
    to a foreground map that ``postprocess`` (its tuned parameters) turns into instances.

    Args:
        keys: the image key (one), ImageNet-normalised.
        method: an ``nn.Module`` ``(B, 3, H, W) -> (B, 1, H, W)``.
        postprocess: its :class:`PostprocessParams` fields (e.g. ``bundle/configs/baselines/hematoxylin_local_tuned.json``'s).
        label_key: the target to filter.
        min_overlap, ignore_dilation: see :func:`second_opinion_target`.
    """

    def __init__(self, keys: KeysCollection, method: nn.Module, postprocess: Mapping | None = None, label_key: str = "label",
                 min_overlap: float = 0.5, ignore_dilation: int = 2):
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"SecondOpiniond takes one image key, got {self.keys}.")
        self.method, self.label_key = method, label_key
        self.params = PostprocessParams.from_mapping(postprocess).as_dict(with_unmarked=True)
        self.min_overlap = _check_range("min_overlap", min_overlap)
        self.ignore_dilation = int(_check_range("ignore_dilation", ignore_dilation))

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = torch.as_tensor(d[self.keys[0]], dtype=torch.float32)[None]
        with torch.no_grad():
            other = attention_to_instances(self.method(image)[0, 0].numpy(), **self.params)
        target = np.asarray(d[self.label_key], dtype=np.float32)
        d[self.label_key] = torch.from_numpy(second_opinion_target(target, other, self.min_overlap, self.ignore_dilation))
        return d


class PseudoInstanceLoss(DistillationLoss):
    """Weighted binary cross-entropy (plus ``dice_weight`` times a weighted soft Dice loss) between the
    student's attention ``sigmoid(r (logits - tau))`` and the target's foreground (channel 0), over the
    pixels of weight 1 (channel 1); weight-0 pixels add nothing, not even gradient.

    Args:
        network: gives tau (``network.activation.running_tau``) and the slope: the student, which carries
            the teacher's (:func:`custom.training.distillation.student_from_teacher`).
        r: slope; None: the tuned slope (stored ``postprocess["r"]``), else ``activation.r``.
        dice_weight: weight of the soft Dice term (0: cross-entropy alone).
    """

    def __init__(self, network: nn.Module, r: float | None = None, dice_weight: float = 0.0):
        super().__init__(network, r)
        self.dice_weight = _check_range("dice_weight", dice_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim != 4 or target.shape[1] != 2:
            raise ValueError(f"target must be (B, 2, H, W) (foreground, weight), got {tuple(target.shape)}.")
        z = self.r * (logits.float() - self.tau)
        foreground, weight = target[:, :1].float(), target[:, 1:].float()
        total = weight.sum().clamp_min(1.0)
        loss = F.binary_cross_entropy_with_logits(z, foreground, weight=weight, reduction="sum") / total
        if self.dice_weight:
            p = torch.sigmoid(z) * weight
            dice = (2.0 * (p * foreground).sum() + 1.0) / (p.sum() + (foreground * weight).sum() + 1.0)
            loss = loss + self.dice_weight * (1.0 - dice)
        return loss
