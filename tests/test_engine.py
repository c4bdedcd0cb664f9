import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer

from custom.training.engine import ScaleAttentionIteration
from custom.model.losses import ScaleAttentionLoss
from custom.model.networks import AttentionNet, ScaleAttentionModel, scale_classifier


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


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def test_non_finite_loss_leaves_the_model_as_after_the_previous_iteration():
    """NaN pixels reach BatchNorm's running statistics and the running tau during the forward pass;
    the iteration puts those buffers back, so weights and buffers are those after iteration 1."""
    good = {"image": torch.randn(3, 3, 32, 32), "label": torch.tensor([0, 1, 2])}
    bad = {"image": good["image"].clone(), "label": good["label"]}
    bad["image"][0, :, :4, :4] = float("nan")
    trainer = _trainer([good, bad])
    after_first = {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=1), lambda e: after_first.update(_state(e.network)))
    with pytest.raises(FloatingPointError, match="iteration 2"):
        trainer.run()
    state = _state(trainer.network)
    assert state.keys() == after_first.keys() and "attention.activation.running_tau" in state
    for k in state:
        assert torch.equal(state[k], after_first[k]), k
    assert trainer.network.attention.activation.num_batches_tracked.item() == 1


def test_non_finite_gradient_stops_before_the_step():
    """A finite loss whose gradient overflows (here: a hook scales one gradient by inf) is not stepped."""
    batches = [{"image": torch.randn(3, 3, 32, 32), "label": torch.tensor([0, 1, 2])}]
    trainer = _trainer(batches)
    before = _state(trainer.network)
    trainer.network.attention.head.weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(FloatingPointError, match=r"non-finite gradients at iteration 1 .*attention\.head\.weight"):
        trainer.run()
    state = _state(trainer.network)
    for k in state:
        assert torch.equal(state[k], before[k]), k
    assert all(p.grad is None for p in trainer.network.parameters())
