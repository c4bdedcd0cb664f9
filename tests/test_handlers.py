import torch
from ignite.engine import Engine
from torch.utils.tensorboard import SummaryWriter

from custom.data import BalancedMagnificationBatchSampler
from custom.handlers import AttentionMapTensorBoardHandler, BatchSamplerEpochHandler, ExportAttentionNetwork
from custom.networks import AttentionNet, ScaleAttentionModel, scale_classifier


def test_export_writes_attention_net_only(tmp_path):
    f = AttentionNet(width=4)
    f.train()(torch.randn(2, 3, 16, 16))  # sets the running tau
    model = ScaleAttentionModel(f, scale_classifier(), channels_last=False)
    path = tmp_path / "models" / "model.pt"
    ExportAttentionNetwork(model, str(path))()
    assert path.is_file() and not (tmp_path / "models" / "model.pt.tmp").exists()
    g = AttentionNet(width=4)
    g.load_state_dict(torch.load(path, weights_only=True))
    assert g.activation.running_tau.item() == f.activation.running_tau.item() != 0
    # non-finite weights are refused and nothing is written
    with torch.no_grad():
        f.head.weight.fill_(float("nan"))
    bad = tmp_path / "bad.pt"
    try:
        ExportAttentionNetwork(f, str(bad))()
        raise AssertionError("expected FloatingPointError")
    except FloatingPointError as e:
        assert "head.weight" in str(e)
    assert not bad.exists()


def test_batch_sampler_epoch_follows_engine():
    sampler = BalancedMagnificationBatchSampler(3, 3, 6, 2)
    seen = []
    engine = Engine(lambda e, b: seen.append(sampler.epoch))
    BatchSamplerEpochHandler(sampler).attach(engine)
    engine.run([0, 1], max_epochs=3)
    assert seen == [0, 0, 1, 1, 2, 2]


def test_attention_images_once_per_validation_run(tmp_path):
    writer = SummaryWriter(str(tmp_path))
    written = []
    writer.add_images = lambda tag, img, step: written.append((tag, tuple(img.shape), step))

    def step(engine, batch):
        return {"image": torch.randn(4, 3, 8, 8), "pred": {"attention": torch.rand(4, 1, 8, 8)}}

    engine = Engine(step)
    AttentionMapTensorBoardHandler(writer, max_images=3).attach(engine)
    engine.run([0, 1, 2], max_epochs=2)
    assert [w[0] for w in written] == ["val_attention/image", "val_attention/attention", "val_attention/attended"] * 2
    assert written[0][1] == (3, 3, 8, 8) and written[1][1] == (3, 1, 8, 8)
    assert [w[2] for w in written] == [1, 1, 1, 2, 2, 2]
