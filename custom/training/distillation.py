"""Distillation: a compact attention network (the student) trained to reproduce a trained F (the teacher).

No label is read: the targets are the teacher's attention maps on unlabeled images, computed once
(:class:`TeacherAttentiond`, cached by the dataset) and cropped with the images. The student takes
over everything the teacher's file carries besides its weights (running tau, stain target and
settings, tuned post-processing: :func:`student_from_teacher`), so the two are used the same way
and their maps are compared at the slope inference uses (:class:`DistillationLoss`).
Workflow: ``bundle/configs/distill.json``.

Shapes: images ``(B, 3, H, W)`` ImageNet-normalised; logits and maps ``(B, 1, H, W)``.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.inferers import Inferer
from monai.transforms import MapTransform
from torch import nn

from custom.inference.inferer import TiledAttentionInferer
from custom.model.networks import check_sigmoid_slope

__all__ = ['DistillationLoss', 'StudentLogitsInferer', 'TeacherAttentiond', 'student_from_teacher', 'tuned_slope']


def tuned_slope(teacher: nn.Module) -> float:
    """The sigmoid slope the teacher's post-processing was tuned at (its stored ``postprocess["r"]``),
    else its own ``activation.r``: the slope of the maps inference thresholds."""
    return float((teacher.postprocess or {}).get("r", teacher.activation.r))


def student_from_teacher(student: nn.Module, teacher: nn.Module, keep_postprocess: bool = False) -> nn.Module:
    """``student`` (in place) given the teacher's percentile sigmoid (its running tau included), stain
    prior gain, stain target and settings and stored post-processing; returned.

    Args:
        keep_postprocess: a student that stores a post-processing of its own keeps it (self-training and
            adaptation fine-tune the shipped student, which ships with its own set); one without takes
            the teacher's.

    Raises:
        ValueError: when the two use different stain priors.
    """
    if student.stain_prior != teacher.stain_prior:
        raise ValueError(f"the student's stain_prior {student.stain_prior!r} differs from the teacher's {teacher.stain_prior!r}.")
    student.activation = copy.deepcopy(teacher.activation).to(next(student.parameters()).device)
    student.stain_prior_gain = teacher.stain_prior_gain
    student.stain_target = copy.deepcopy(teacher.stain_target)
    student.stain_settings = copy.deepcopy(teacher.stain_settings)
    if not (keep_postprocess and getattr(student, "postprocess", None)):
        student.postprocess = copy.deepcopy(teacher.postprocess)
    return student


class TeacherAttentiond(MapTransform):
    """Adds the teacher's attention map of ``image`` (``(3, H, W)`` ImageNet-normalised) as ``output_key``
    (``(1, H, W)`` float32 in [0, 1]), computed whole-image by :class:`TiledAttentionInferer`.

    Args:
        keys: the image key (one).
        teacher: the trained attention network.
        output_key: where the map goes (the trainer's label).
        r: sigmoid slope of the map; None: the teacher's tuned slope (its stored ``postprocess["r"]``), else its own.
        tta: average the teacher over the 7 dihedral transforms.
        roi_size: tile size of the inferer.
    """

    def __init__(self, keys: KeysCollection, teacher: nn.Module, output_key: str = "label", r: float | None = None,
                 tta: bool = False, roi_size: int = 1024):
        super().__init__(keys)
        if len(self.keys) != 1:
            raise ValueError(f"TeacherAttentiond takes one image key, got {self.keys}.")
        self.teacher, self.output_key = teacher, output_key
        r = tuned_slope(teacher) if r is None else r
        self.inferer = TiledAttentionInferer(roi_size=roi_size, tta=tta, r=r, channels_last=True)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        image = torch.as_tensor(d[self.keys[0]], dtype=torch.float32)
        device = next(self.teacher.parameters()).device
        with torch.no_grad():
            d[self.output_key] = self.inferer(image[None].to(device), self.teacher)[0].cpu()
        return d


class StudentLogitsInferer(Inferer):
    """The trainer's inferer: the student's logits (``network.logits``), so that training leaves its
    percentile sigmoid, taken from the teacher, as it is."""

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args, **kwargs) -> torch.Tensor:
        return network.logits(inputs)


class DistillationLoss(nn.Module):
    """Mean squared difference between the student's attention ``sigmoid(r (a - tau))`` and the teacher's map,
    with the teacher's running tau and the slope ``r`` inference uses.

    Args:
        teacher: gives tau (``teacher.activation.running_tau``).
        r: slope; None: the teacher's tuned slope (stored ``postprocess["r"]``), else its own ``activation.r``.
    """

    def __init__(self, teacher: nn.Module, r: float | None = None):
        super().__init__()
        self.r = check_sigmoid_slope(tuned_slope(teacher) if r is None else r, "r")
        self.register_buffer("tau", teacher.activation.running_tau.detach().clone().float())

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        attention = torch.sigmoid(self.r * (logits.float() - self.tau))
        return torch.mean((attention - target.float()) ** 2)
