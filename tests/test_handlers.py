import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
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


# ---------------------------------------------------------------------------------------------------------
# evaluation report, overlays, best-only export
# ---------------------------------------------------------------------------------------------------------


def _pairs():
    """Two (id, gt, pred) instance maps (H, W): a good prediction, and one missing every nucleus."""
    gt_a = torch.zeros(24, 24, dtype=torch.int32)
    gt_a[2:8, 2:8], gt_a[12:20, 10:18] = 1, 2
    pred_a = torch.zeros_like(gt_a)
    pred_a[3:8, 2:9], pred_a[12:19, 11:18], pred_a[21:23, 21:23] = 5, 3, 9  # two matches and a false positive
    gt_b = torch.zeros(24, 24, dtype=torch.int32)
    gt_b[4:10, 4:10], gt_b[14:18, 14:18], gt_b[2:5, 18:22] = 1, 2, 3
    pred_b = torch.zeros_like(gt_b)
    pred_b[20:23, 2:6] = 1  # overlaps no true nucleus: AHD undefined for this image
    return [("img-a", gt_a, pred_a), ("img-b", gt_b, pred_b)]


def _report_engine(fail_at: int | None = None) -> Engine:
    """A plain engine shaped like the decollated evaluator: batch = list of {"id"}, output = list of
    {"label", "pred_instances"} with (1, H, W) maps."""
    maps = {i: (gt, pred) for i, gt, pred in _pairs()}

    def step(engine, batch):
        if fail_at is not None and engine.state.iteration == fail_at:
            raise RuntimeError("inference failed")
        return [{"label": maps[b["id"]][0][None], "pred_instances": maps[b["id"]][1][None]} for b in batch]

    return Engine(step)


def test_evaluation_report_rows_and_summary(tmp_path):
    import csv
    import json
    import math

    from custom.handlers import EvaluationReport
    from custom.metrics import COUNT_NAMES, METRIC_NAMES, aji, instance_metrics

    out = tmp_path / "eval" / "m"
    report = EvaluationReport(str(out), method="my_method", settings={"split": "val", "tta": False})
    engine = _report_engine()
    report.attach(engine)
    engine.run([[{"id": "img-a"}], [{"id": "img-b"}]], max_epochs=1)

    with open(out / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["img-a", "img-b"]
    assert list(rows[0]) == ["id", *METRIC_NAMES, *COUNT_NAMES]
    expected = {i: instance_metrics(gt.numpy(), pred.numpy()) for i, gt, pred in _pairs()}
    for r, (i, gt, pred) in zip(rows, _pairs()):
        assert float(r["aji"]) == pytest.approx(aji(gt.numpy(), pred.numpy()), abs=1e-12)
        for k in METRIC_NAMES:
            assert float(r[k]) == pytest.approx(expected[i][k], nan_ok=True)
    assert 0 < float(rows[0]["aji"]) < 1 and float(rows[1]["aji"]) == 0.0
    assert math.isnan(float(rows[1]["ahd"])) and not math.isnan(float(rows[0]["ahd"]))

    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "my_method" and summary["n_images"] == 2
    assert summary["settings"] == {"split": "val", "tta": False}
    assert summary["aji"] == pytest.approx((float(rows[0]["aji"]) + float(rows[1]["aji"])) / 2)
    assert summary["dice"] == pytest.approx(np.mean([float(r["dice"]) for r in rows]))
    assert summary["ahd"] == pytest.approx(float(rows[0]["ahd"]))  # mean over the images where it is defined
    assert (summary["n_true"], summary["n_pred"]) == (5, 4)
    assert summary == json.loads(json.dumps(report.summary()))
    with open(out / "summary.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:3] == ["method", "n_images", "aji"] and table[1][:2] == ["my_method", "2"]
    assert float(table[1][2]) == pytest.approx(summary["aji"])
    assert not list(out.glob("*.tmp"))


def test_evaluation_report_not_decollated(tmp_path):
    """Batched output dict (B, 1, H, W) and batch dict {"id": [...]}: split along the batch."""
    from custom.handlers import EvaluationReport
    from custom.metrics import aji

    pairs = _pairs()
    batch = {"id": [p[0] for p in pairs]}
    output = {"label": torch.stack([p[1][None] for p in pairs]), "pred_instances": torch.stack([p[2][None] for p in pairs])}
    engine = Engine(lambda e, b: output)
    report = EvaluationReport(str(tmp_path))
    report.attach(engine)
    engine.run([batch], max_epochs=1)
    assert [r["id"] for r in report.rows] == ["img-a", "img-b"]
    assert report.rows[0]["aji"] == pytest.approx(aji(pairs[0][1].numpy(), pairs[0][2].numpy()))
    assert report.summary()["method"] == "model"


def test_evaluation_report_removes_stale_results_at_start(tmp_path):
    from custom.handlers import EvaluationReport

    for name in ("summary.json", "summary.csv", "per_image.csv"):
        (tmp_path / name).write_text("from a previous run\n")
    report = EvaluationReport(str(tmp_path))
    engine = _report_engine(fail_at=2)
    report.attach(engine)
    with pytest.raises(RuntimeError, match="inference failed"):
        engine.run([[{"id": "img-a"}], [{"id": "img-b"}]], max_epochs=1)
    assert not (tmp_path / "summary.json").exists()  # the failed run leaves nothing that looks complete
    assert not (tmp_path / "summary.csv").exists() and not (tmp_path / "per_image.csv").exists()
    with pytest.raises(RuntimeError, match="no image"):
        EvaluationReport(str(tmp_path)).summary()


def test_overlay_writer_writes_one_png_per_image(tmp_path):
    from PIL import Image

    from custom.handlers import OverlayWriter

    h, w = 20, 30
    rgb = torch.full((3, h, w), 100, dtype=torch.uint8)
    label = torch.zeros(1, h, w, dtype=torch.int32)
    label[0, 2:8, 2:8] = 1
    pred = torch.zeros(1, h, w, dtype=torch.int32)
    pred[0, 10:18, 15:25] = 4
    batch = [{"id": "first", "rgb": rgb}, {"id": "second", "rgb": rgb.numpy()}]
    engine = Engine(lambda e, b: [{"label": label, "pred_instances": pred}, {"pred_instances": pred}])
    OverlayWriter(str(tmp_path / "overlays")).attach(engine)
    engine.run([batch], max_epochs=1)
    assert sorted(p.name for p in (tmp_path / "overlays").iterdir()) == ["first.png", "second.png"]
    first = np.asarray(Image.open(tmp_path / "overlays" / "first.png"))
    assert first.shape == (h, w, 3) and first.dtype == np.uint8
    assert tuple(first[2, 2]) == (0, 200, 0)  # true outline: green
    assert tuple(first[10, 20]) == (255, 230, 0)  # predicted outline: yellow
    assert tuple(first[5, 5]) == (100, 100, 100) and tuple(first[0, 0]) == (100, 100, 100)  # inside / outside: the image
    second = np.asarray(Image.open(tmp_path / "overlays" / "second.png"))  # no label in the output: prediction only
    assert tuple(second[2, 2]) == (100, 100, 100) and tuple(second[10, 20]) == (255, 230, 0)


def test_export_best_only_saves_when_best_epoch_is_this_epoch(tmp_path):
    f = AttentionNet(width=4, dilations=(1,))
    path = tmp_path / "model.pt"
    handler = ExportAttentionNetwork(f, str(path), epoch_level=True, best_only=True)

    def run_validation(best_epoch: int) -> None:
        engine = Engine(lambda e, b: None)
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: setattr(e.state, "best_metric_epoch", best_epoch))
        handler.attach(engine)
        engine.run([0], max_epochs=1)  # state.epoch == 1 at completion

    run_validation(best_epoch=0)  # an earlier epoch is still the best: nothing to export
    assert not path.exists()
    run_validation(best_epoch=1)
    assert path.is_file()
    saved = torch.load(path, weights_only=True)["head.weight"].clone()
    with torch.no_grad():
        f.head.weight.add_(1.0)
    run_validation(best_epoch=0)  # not the best: the exported file keeps the best weights
    assert torch.equal(torch.load(path, weights_only=True)["head.weight"], saved)
    run_validation(best_epoch=1)
    assert torch.equal(torch.load(path, weights_only=True)["head.weight"], f.head.weight)
