import pytest
import torch

from custom.model.losses import ScaleAttentionLoss, equivariance_loss, smoothness_loss


def test_smoothness_on_hand_made_maps():
    # a vertical stripe: no vertical change; every row changes 0->1->0, so the mean
    # horizontal |difference| is (1 + 1) / 2 = 1; total 1
    stripe = torch.tensor([[0.0, 1.0, 0.0]] * 3).view(1, 1, 3, 3)
    assert smoothness_loss(stripe).item() == pytest.approx(1.0)
    # 2x2 checkerboard: every neighbour differs by 1 in both directions: 1 + 1
    checker = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    assert smoothness_loss(checker).item() == pytest.approx(2.0)
    # a ramp 0, .25, .5, .75 down the rows: vertical mean .25, horizontal 0
    ramp = torch.arange(4.0).div(4).view(1, 1, 4, 1).expand(1, 1, 4, 5)
    assert smoothness_loss(ramp).item() == pytest.approx(0.25)
    assert smoothness_loss(torch.full((2, 1, 5, 5), 0.3)).item() == 0.0
    with pytest.raises(ValueError):
        smoothness_loss(torch.zeros(1, 1, 1, 5))


def test_equivariance_loss_is_mse_and_detaches_target():
    a = torch.zeros(1, 1, 2, 2, requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2).requires_grad_()
    loss = equivariance_loss(a, t)
    assert loss.item() == pytest.approx(0.5)  # (1 + 0 + 0 + 1) / 4
    loss.backward()
    assert t.grad is None and a.grad is not None


def test_total_loss_weights_and_switches():
    torch.manual_seed(0)
    out = {
        "scale_logits": torch.randn(4, 3),
        "attention": torch.rand(4, 1, 8, 8),
        "equiv_target": torch.rand(4, 1, 8, 8),
    }
    y = torch.tensor([0, 1, 2, 0])
    full = ScaleAttentionLoss()(out, y)
    ce = torch.nn.functional.cross_entropy(out["scale_logits"], y)
    assert full["loss_scale"].item() == pytest.approx(ce.item())
    assert full["loss"].item() == pytest.approx((full["loss_scale"] + full["loss_smooth"] + full["loss_equiv"]).item(), rel=1e-6)
    weighted = ScaleAttentionLoss(scale_weight=2.0, smooth_weight=0.0, equiv_weight=0.5)(out, y)
    assert "loss_smooth" not in weighted
    assert weighted["loss"].item() == pytest.approx(2 * full["loss_scale"].item() + 0.5 * full["loss_equiv"].item(), rel=1e-6)
    no_target = {k: v for k, v in out.items() if k != "equiv_target"}
    with pytest.raises(KeyError, match="equivariance"):
        ScaleAttentionLoss()(no_target, y)
    assert "loss_equiv" not in ScaleAttentionLoss(equiv_weight=0.0)(no_target, y)
    with pytest.raises(ValueError, match="smooth_weight"):
        ScaleAttentionLoss(smooth_weight=-1)
