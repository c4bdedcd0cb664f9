import pytest
import torch
from monai.engines import SupervisedTrainer

from custom.engine import ScaleAttentionIteration
from custom.losses import ScaleAttentionLoss
from custom.networks import AttentionNet, ScaleAttentionModel, scale_classifier


def _trainer(batches, sparse=True):
    torch.manual_seed(0)
    f = AttentionNet(width=4, dilations=(1, 2), sparse=sparse)
    model = ScaleAttentionModel(f, scale_classifier(), amp_dtype=None, channels_last=False)
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    return SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, train_data_loader=batches, network=model,
                             optimizer=opt, loss_function=ScaleAttentionLoss(), iteration_update=ScaleAttentionIteration(),
                             decollate=False)


def test_iteration_steps_and_reports_every_term():
    batches = [{"image": torch.randn(6, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0, 1, 2])} for _ in range(2)]
    trainer = _trainer(batches)
    before = trainer.network.attention.head.weight.clone()
    trainer.run()
    out = trainer.state.output
    assert {"loss", "loss_scale", "loss_smooth", "loss_equiv", "accuracy", "tau"} <= set(out)
    assert out["pred"].shape == (6, 3) and out["attention"].shape == (6, 1, 32, 32)
    assert out["loss"] == pytest.approx(out["loss_scale"] + out["loss_smooth"] + out["loss_equiv"], rel=1e-5)
    assert 0.0 <= out["accuracy"] <= 1.0
    assert not torch.equal(before, trainer.network.attention.head.weight)
    assert trainer.network.attention.activation.num_batches_tracked.item() == 2


def test_non_finite_loss_stops_with_iteration_named():
    good = {"image": torch.randn(3, 3, 32, 32), "label": torch.tensor([0, 1, 2])}
    bad = {"image": torch.full((3, 3, 32, 32), float("nan")), "label": torch.tensor([0, 1, 2])}
    trainer = _trainer([good, bad])
    with pytest.raises(FloatingPointError, match="iteration 2"):
        trainer.run()


def test_plain_sigmoid_reports_no_tau():
    batches = [{"image": torch.randn(3, 3, 32, 32), "label": torch.tensor([0, 1, 2])}]
    trainer = _trainer(batches, sparse=False)
    trainer.run()
    assert "tau" not in trainer.state.output and "loss_equiv" in trainer.state.output
