"""Losses of the paper (section 3): scale cross-entropy, smoothness (eq. 3),
equivariance (eq. 4). Attention maps are ``(B, 1, H, W)`` in [0, 1]."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['ScaleAttentionLoss', 'equivariance_loss', 'smoothness_loss']


def smoothness_loss(attention: torch.Tensor) -> torch.Tensor:
    """Mean absolute vertical plus mean absolute horizontal difference of neighbouring
    pixels (eq. 3): ``mean|A[i+1, j] - A[i, j]| + mean|A[i, j+1] - A[i, j]|``.

    Args:
        attention: ``(B, C, H, W)`` with H, W >= 2. Returns a scalar (attention units per pixel).
    """
    if attention.ndim != 4 or attention.shape[-1] < 2 or attention.shape[-2] < 2:
        raise ValueError(f"smoothness_loss needs (B, C, H, W) with H, W >= 2, got {tuple(attention.shape)}.")
    dy = (attention[..., 1:, :] - attention[..., :-1, :]).abs().mean()
    dx = (attention[..., :, 1:] - attention[..., :, :-1]).abs().mean()
    return dy + dx


def equivariance_loss(attention: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error between ``A(I)`` and ``t^-1(A(t(I)))`` (eq. 4), both ``(B, 1, H, W)``.
    The target is detached: gradients flow through ``attention`` only."""
    if attention.shape != target.shape:
        raise ValueError(f"equivariance_loss: shapes differ, {tuple(attention.shape)} vs {tuple(target.shape)}.")
    return F.mse_loss(attention.float(), target.detach().float())


class ScaleAttentionLoss(nn.Module):
    """Weighted sum ``w_scale L_scale + w_smooth L_smooth + w_equiv L_equiv``.

    A term with weight 0 is switched off (not computed). Sparsity has no term: it
    comes from the percentile sigmoid.

    Args:
        scale_weight, smooth_weight, equiv_weight: the weights (paper: all 1), >= 0.

    ``forward(outputs, labels)`` takes the dict of :class:`custom.model.networks.ScaleAttentionModel`
    and magnification indices ``(B,)`` and returns a dict with ``loss`` (the total, for
    backward) and each active term (``loss_scale``, ``loss_smooth``, ``loss_equiv``).
    """

    def __init__(self, scale_weight: float = 1.0, smooth_weight: float = 1.0, equiv_weight: float = 1.0):
        super().__init__()
        for name, w in (("scale_weight", scale_weight), ("smooth_weight", smooth_weight), ("equiv_weight", equiv_weight)):
            if w < 0:
                raise ValueError(f"{name} must be >= 0, got {w}.")
        self.scale_weight, self.smooth_weight, self.equiv_weight = float(scale_weight), float(smooth_weight), float(equiv_weight)

    def forward(self, outputs: dict, labels: torch.Tensor) -> dict:
        attention = outputs["attention"]
        terms: dict[str, torch.Tensor] = {}
        total = attention.new_zeros(())
        if self.scale_weight > 0:
            terms["loss_scale"] = F.cross_entropy(outputs["scale_logits"].float(), labels.long().view(-1))
            total = total + self.scale_weight * terms["loss_scale"]
        if self.smooth_weight > 0:
            terms["loss_smooth"] = smoothness_loss(attention)
            total = total + self.smooth_weight * terms["loss_smooth"]
        if self.equiv_weight > 0:
            if "equiv_target" not in outputs:
                raise KeyError("equiv_weight > 0 but the model gave no 'equiv_target': build it with equivariance=True.")
            terms["loss_equiv"] = equivariance_loss(attention, outputs["equiv_target"])
            total = total + self.equiv_weight * terms["loss_equiv"]
        return {"loss": total, **terms}
