import sys

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from torch.utils.tensorboard import SummaryWriter

from custom.training.tiles import BalancedMagnificationBatchSampler
from custom.training.handlers import AttentionMapTensorBoardHandler, BatchSamplerEpochHandler, ExportAttentionNetwork
from custom.model.networks import AttentionNet, ScaleAttentionModel, scale_classifier


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

    from custom.evaluation.reports import EvaluationReport
    from custom.evaluation.metrics import COUNT_NAMES, METRIC_NAMES, aji, instance_metrics

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
    from custom.evaluation.reports import EvaluationReport
    from custom.evaluation.metrics import aji

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
    from custom.evaluation.reports import EvaluationReport

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

    from custom.evaluation.reports import OverlayWriter

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


# ---------------------------------------------------------------------------------------------------------
# interruptions: batch order, reseeding per epoch, best metric, checked resume, checkpoint on exception
# ---------------------------------------------------------------------------------------------------------


def _sampler_run(sampler, max_epochs: int = 3, state: dict | None = None) -> list[tuple[int, list[int]]]:
    """(epoch, batch indices) of every iteration of an Ignite run over a DataLoader with ``sampler``
    (optionally resumed from a trainer ``state`` dict, as CheckpointLoader does)."""
    from torch.utils.data import DataLoader

    seen = []
    engine = Engine(lambda e, b: seen.append((e.state.epoch, [int(i) for i in b])))
    BatchSamplerEpochHandler(sampler).attach(engine)
    if state is not None:
        engine.load_state_dict(state)
    engine.run(DataLoader(range(12), batch_sampler=sampler, collate_fn=list), max_epochs=max_epochs)
    return seen


def test_batch_sampler_through_a_data_loader_draws_epoch_e_order_in_epoch_e():
    """Ignite stops an epoch after epoch_length batches, so the sampler's generator of epoch e ends
    only at the start of epoch e + 1 (after set_epoch): epoch e + 1 must still draw its own order."""
    full = _sampler_run(BalancedMagnificationBatchSampler(4, 3, 6, 2, seed=1))
    expected = []
    for e in range(3):
        s = BalancedMagnificationBatchSampler(4, 3, 6, 2, seed=1)
        s.set_epoch(e)
        expected += [(e + 1, b) for b in s]
    assert full == expected
    # resumed from the epoch-2 checkpoint (iteration 4): epoch 3 as in the full run
    assert _sampler_run(BalancedMagnificationBatchSampler(4, 3, 6, 2, seed=1), state={"iteration": 4, "epoch_length": 2, "max_epochs": 3}) == full[4:]
    # resumed in the middle of epoch 2 (a checkpoint written after iteration 3): the rest of epoch 2, then epoch 3
    assert _sampler_run(BalancedMagnificationBatchSampler(4, 3, 6, 2, seed=1), state={"iteration": 3, "epoch_length": 2, "max_epochs": 3}) == full[3:]


@pytest.mark.parametrize("num_workers", [0, 1])
def test_epoch_seed_handler_makes_each_epoch_a_function_of_seed_and_epoch(num_workers):
    """Random crops (a MONAI Randomizable transform, in the main process or a worker), torch's and
    NumPy's global generators: epoch 3 of a run resumed at epoch 2 draws what the full run drew."""
    from monai.data import DataLoader, Dataset
    from monai.transforms import RandSpatialCropd

    from custom.training.handlers import EpochSeedHandler

    def run(state: dict | None = None, seed: int | None = 7) -> list:
        torch.manual_seed(123 if state is None else 456)  # a different start: only the handler makes epochs agree
        data = Dataset([{"image": np.arange(256.0).reshape(1, 16, 16)} for _ in range(4)],
                       transform=RandSpatialCropd(keys="image", roi_size=(4, 4), random_size=False))
        loader = DataLoader(data, batch_size=2, num_workers=num_workers)
        drawn = []
        engine = Engine(lambda e, b: drawn.append((e.state.epoch, b["image"][:, 0, 0, 0].tolist(), torch.rand(1).item(), np.random.rand())))
        EpochSeedHandler(seed, data).attach(engine)
        if state is not None:
            engine.load_state_dict(state)
        engine.run(loader, max_epochs=3)
        return drawn

    full = run()
    assert len(full) == 6 and full[0][1:] != full[2][1:] != full[4][1:]  # epochs differ from each other
    assert run(state={"iteration": 4, "epoch_length": 2, "max_epochs": 3}) == full[4:]
    assert run(seed=None)[4:] != full[4:]  # without the handler the epochs depend on the start


@pytest.mark.parametrize("num_workers", [0, 1])
def test_resume_in_the_middle_of_an_epoch_draws_what_the_full_run_drew(num_workers):
    """A checkpoint after iteration 4 (the middle of epoch 2 of 3 iterations): the resumed run's
    iterations 5.. get the same batches, the same random crops (the data loader's transforms, in this
    process or a worker, replayed by BatchSamplerEpochHandler) and the same global draws (torch,
    NumPy, Python: restored by EpochSeedHandler) as the uninterrupted run."""
    import random

    from monai.data import DataLoader, Dataset
    from monai.transforms import RandSpatialCropd

    from custom.training.handlers import EpochSeedHandler

    def run(resume: dict | None = None, stop_after: int | None = None):
        torch.manual_seed(123 if resume is None else 456)  # a different start: only the handlers make the runs agree
        data = Dataset([{"image": np.arange(256.0).reshape(1, 16, 16) + 1000 * i} for i in range(12)],
                       transform=RandSpatialCropd(keys="image", roi_size=(4, 4), random_size=False))
        sampler = BalancedMagnificationBatchSampler(4, 3, 6, 3, seed=1)
        loader = DataLoader(data, batch_sampler=sampler, num_workers=num_workers)
        drawn, saved = [], {}
        engine = Engine(lambda e, b: drawn.append((e.state.iteration, b["image"][:, 0, 0, 0].tolist(), torch.rand(1).item(),
                                                   np.random.rand(), random.random())))
        BatchSamplerEpochHandler(sampler).attach(engine)
        seeding = EpochSeedHandler(7, data)
        seeding.attach(engine)
        if stop_after:
            engine.add_event_handler(Events.ITERATION_COMPLETED(once=stop_after),
                                     lambda e: saved.update(trainer=e.state_dict(), seeding=seeding.state_dict()))
        if resume is not None:
            engine.load_state_dict(resume["trainer"])
            seeding.load_state_dict(resume["seeding"])
        engine.run(loader, max_epochs=3)
        return drawn, saved

    full, saved = run(stop_after=4)
    assert len(full) == 9 and saved["trainer"]["iteration"] == 4
    resumed, _ = run(resume=saved)
    assert resumed == full[4:]
    # without the random state (an older checkpoint): the same batches and crops, other global draws
    older, _ = run(resume={"trainer": saved["trainer"], "seeding": {"rng": None}})
    assert [d[:2] for d in older] == [d[:2] for d in full[4:]] and older[0][2:] != full[4][2:]


def test_latest_checkpoint_saver_interval_epochs_and_exceptions(tmp_path, caplog):
    """Every 2 iterations within an epoch of 3 and after each epoch's EPOCH_COMPLETED handlers (the
    validation), one file overwritten; nothing written when the run stops on an exception, whose log
    names the iteration to resume from."""
    import logging

    from custom.training.handlers import LatestCheckpointSaver, attach_checkpoint_saver

    net = torch.nn.Linear(1, 1)
    saves = []

    def step(engine, batch):
        with torch.no_grad():
            net.weight.fill_(float(engine.state.iteration))
        if engine.state.iteration == 8:
            raise KeyboardInterrupt

    engine = Engine(step)
    validated = []
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: validated.append(e.state.iteration))
    saver = LatestCheckpointSaver(str(tmp_path / "ckpt"), {"network": net, "trainer": engine}, interval=2)
    original = saver.save
    saver.save = lambda e: (saves.append((e.state.iteration, list(validated))), original(e))
    attach_checkpoint_saver(saver, engine)
    with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
        engine.run(range(3), max_epochs=3)
    # iteration 2 (interval), 3 (epoch end, after its validation), 4, 6 (epoch end; not at iteration 6's ITERATION_COMPLETED)
    assert [i for i, _ in saves] == [2, 3, 4, 6] and saves[1][1] == [3] and saves[3][1] == [3, 6]
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint_latest.pt"]
    latest = torch.load(tmp_path / "ckpt" / "checkpoint_latest.pt", weights_only=True)
    assert latest["trainer"]["iteration"] == 6 and latest["network"]["weight"].item() == 6.0  # not the interrupted iteration 8
    assert f"holds iteration 6: go on from there with --resume_from {tmp_path / 'ckpt' / 'checkpoint_latest.pt'}" in caplog.text
    with pytest.raises(ValueError, match="checkpoint_interval must be >= 0"):
        LatestCheckpointSaver(str(tmp_path), {}, interval=-1)


def test_progress_bar_shows_the_loss_and_closes_before_the_epoch_ends(capsys):
    from custom.training.handlers import ProgressBar

    order = []
    engine = Engine(lambda e, b: {"loss": 0.25})
    ProgressBar("training", lambda x: {"loss": x["loss"]}).attach(engine)
    engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: order.append(sys.modules["tqdm"].tqdm._instances.__len__()))
    engine.run(range(4), max_epochs=2)
    assert order == [0, 0]  # no bar open when the epoch's handlers (validation, metric logs) run
    err = capsys.readouterr().err
    assert "training" in err and "loss=0.25" in err and "4/4" in err
    quiet = Engine(lambda e, b: {"loss": 0.25})
    ProgressBar("training", enabled="false").attach(quiet)  # a config's --progress false
    quiet.run(range(4), max_epochs=1)
    assert "training" not in capsys.readouterr().err


def _selection(save_dir, weight: float):
    """A MONAI SupervisedEvaluator (Dice of a 1x1 convolution's output thresholded at 0.5 against a
    square mask, 1.0 with ``weight`` 1, 0.0 with -1), its key-metric CheckpointSaver ``best.pt`` and
    a best-only export ``model.pt``, all in ``save_dir``."""
    from monai.data import DataLoader
    from monai.engines import SupervisedEvaluator
    from monai.handlers import CheckpointSaver, MeanDice, from_engine
    from monai.transforms import AsDiscreted

    net = torch.nn.Conv2d(1, 1, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(weight)
    image = torch.zeros(1, 8, 8)
    image[:, 2:6, 2:6] = 1.0
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=DataLoader([{"image": image, "label": image.clone()}], batch_size=1),
        network=net, postprocessing=AsDiscreted(keys="pred", threshold=0.5),
        key_val_metric={"dice": MeanDice(output_transform=from_engine(["pred", "label"]))},
    )
    saver = CheckpointSaver(save_dir=str(save_dir), save_dict={"network": net}, save_key_metric=True, key_metric_filename="best.pt")
    saver.attach(evaluator)
    ExportAttentionNetwork(net, str(save_dir / "model.pt"), best_only=True).attach(evaluator)
    return evaluator, saver


def test_evaluator_state_keeps_the_best_model_across_a_resume(tmp_path):
    from custom.training.handlers import EvaluatorState

    evaluator, saver = _selection(tmp_path, weight=1.0)
    evaluator.run(1)
    assert evaluator.state.best_metric == 1.0
    files = {p: p.read_bytes() for p in (tmp_path / "best.pt", tmp_path / "model.pt")}
    torch.save({"evaluators": EvaluatorState({"select": evaluator}, {"select": saver}).state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["evaluators"]  # plain numbers: weights_only loads it
    assert state["select"]["best_metric"] == 1.0 and state["select"]["best_metric_epoch"] == 1 and len(state["select"]["saved"]) == 1

    # a new process resumes: fresh evaluator and saver, the state loaded, a worse model (Dice 0) validated
    evaluator, saver = _selection(tmp_path, weight=-1.0)
    EvaluatorState({"select": evaluator}, {"select": saver}).load_state_dict(state)
    evaluator.run(2)
    assert evaluator.state.metrics["dice"] == 0.0
    assert (evaluator.state.best_metric, evaluator.state.best_metric_epoch) == (1.0, 1)
    assert {p: p.read_bytes() for p in files} == files  # neither best.pt nor model.pt replaced

    # the same without the state: the worse model overwrites both (what a resume did before)
    evaluator, saver = _selection(tmp_path, weight=-1.0)
    evaluator.run(2)
    assert all(p.read_bytes() != files[p] for p in files)


def test_evaluator_state_resumed_into_another_folder(tmp_path):
    from custom.training.handlers import EvaluatorState

    evaluator, saver = _selection(tmp_path / "first", weight=1.0)
    evaluator.run(1)
    state = EvaluatorState({"select": evaluator}, {"select": saver}).state_dict()
    evaluator, saver = _selection(tmp_path / "second", weight=-1.0)
    EvaluatorState({"select": evaluator}, {"select": saver}).load_state_dict(state)
    evaluator.run(2)  # no best.pt there to replace: the saver writes one; the best metric is still the earlier one
    assert (tmp_path / "second" / "best.pt").is_file() and not (tmp_path / "second" / "model.pt").exists()
    assert evaluator.state.best_metric == 1.0
    with pytest.raises(ValueError, match="name no evaluator"):
        EvaluatorState({"select": evaluator}, {"other": saver})


def _resume_objects():
    from custom.training.handlers import EvaluatorState

    torch.manual_seed(1)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    engine = Engine(lambda e, b: None)
    return net, opt, engine, {"network": net, "optimizer": opt, "trainer": engine, "evaluators": EvaluatorState({})}


def test_resume_loader_loads_checks_and_refuses(tmp_path):
    from custom.training.handlers import ResumeCheckpointLoader

    net, opt, _, _ = _resume_objects()
    net(torch.randn(4, 3)).sum().backward()
    opt.step()  # optimiser moments exist
    good = {"network": net.state_dict(), "optimizer": opt.state_dict(), "trainer": {"iteration": 4, "epoch_length": 2, "max_epochs": 3}}
    torch.save(good, tmp_path / "good.pt")  # written before the evaluator state existed: "evaluators" is optional

    net2, opt2, engine, load_dict = _resume_objects()
    ResumeCheckpointLoader(str(tmp_path / "good.pt"), load_dict, optional=["evaluators"]).attach(engine)
    engine.run(range(2), max_epochs=3)
    assert engine.state.iteration == 6 and torch.equal(net2.weight, net.weight)
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])

    # NaN in a weight or an optimiser moment: refused at attach (before the run), naming the file and the entry
    for entry, tensor in (("network.weight", good["network"]["weight"]), ("optimizer.state.0.exp_avg_sq", good["optimizer"]["state"][0]["exp_avg_sq"])):
        bad = {k: (dict(v) if isinstance(v, dict) else v) for k, v in good.items()}
        original = tensor.clone()
        tensor.view(-1)[0] = float("inf") if "optimizer" in entry else float("nan")
        torch.save(bad, tmp_path / "bad.pt")
        tensor.copy_(original)
        _, _, engine, load_dict = _resume_objects()
        with pytest.raises(FloatingPointError, match=f"{tmp_path / 'bad.pt'}.*non-finite.*{entry}"):
            ResumeCheckpointLoader(str(tmp_path / "bad.pt"), load_dict, optional=["evaluators"]).attach(engine)
        assert not engine.has_event_handler(ResumeCheckpointLoader.__call__)  # nothing attached
    # a required entry missing (model.pt, F's weights alone), an unreadable file, no file
    torch.save(good["network"], tmp_path / "weights_only.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    for name, error, match in (("weights_only.pt", ValueError, "no \\['network', 'optimizer'"), ("garbage.pt", ValueError, "cannot be read"),
                               ("absent.pt", FileNotFoundError, "no such file")):
        _, _, engine, load_dict = _resume_objects()
        with pytest.raises(error, match=match):
            ResumeCheckpointLoader(str(tmp_path / name), load_dict, optional=["evaluators"]).attach(engine)


def test_checkpoint_saver_writes_its_final_checkpoint_on_an_exception(tmp_path):
    """MONAI's StatsHandler re-raises in EXCEPTION_RAISED, so a saver attached after it never ran there."""
    from monai.handlers import CheckpointSaver, StatsHandler

    from custom.training.handlers import attach_checkpoint_saver

    def fail_at_2(engine, batch):
        if engine.state.iteration == 2:
            raise FloatingPointError("non-finite training loss at iteration 2")

    for attach, folder in ((lambda s, e, h: s.attach(e), "plain"), (attach_checkpoint_saver, "ordered")):
        engine = Engine(fail_at_2)
        stats = StatsHandler(iteration_log=False)
        stats.attach(engine)
        saver = CheckpointSaver(save_dir=str(tmp_path / folder), save_dict={"network": torch.nn.Linear(1, 1)}, save_final=True,
                                final_filename="checkpoint_final.pt")
        attach(saver, engine, [stats])
        with pytest.raises(FloatingPointError, match="iteration 2"):
            engine.run(range(3), max_epochs=1)
    assert not (tmp_path / "plain" / "checkpoint_final.pt").exists()
    assert (tmp_path / "ordered" / "checkpoint_final.pt").is_file()


def test_checkpoint_saver_writes_atomically(tmp_path, monkeypatch):
    """attach_checkpoint_saver makes every file of the saver go through a temporary file and a
    rename: a save that dies half-way leaves no truncated file (MONAI deletes the previous final
    checkpoint before writing the new one, so that one is gone; the epoch checkpoint stays whole)."""
    from monai.handlers import CheckpointSaver

    from custom.training.handlers import attach_checkpoint_saver

    net = torch.nn.Linear(1, 1)
    engine = Engine(lambda e, b: None)
    saver = CheckpointSaver(save_dir=str(tmp_path), save_dict={"network": net}, save_final=True, final_filename="checkpoint_final.pt",
                            save_interval=1, epoch_level=True, n_saved=2)
    attach_checkpoint_saver(saver, engine)
    engine.run(range(2), max_epochs=1)
    before = torch.load(tmp_path / "checkpoint_final.pt", weights_only=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and "checkpoint_final.pt" in names and any("epoch=1" in n for n in names), names

    def dies_half_way(obj, f, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with torch.no_grad():
        net.weight.fill_(7.0)
    with pytest.raises(KeyboardInterrupt):
        saver.completed(engine)
    monkeypatch.undo()
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [n for n in names if n != "checkpoint_final.pt"], left  # no truncated final, no temporary file
    epoch = torch.load(tmp_path / left[0], weights_only=True)
    assert torch.equal(epoch["weight"], before["weight"])  # one object saved: its state dict at the top level


def test_error_analysis_report_files_and_ceilings(tmp_path):
    import csv
    import json

    from custom.evaluation.error_analysis import ERROR_NAMES, oracle_split
    from custom.evaluation.reports import ERROR_SCORES, ErrorAnalysisReport
    from custom.evaluation.metrics import aji
    from custom.inference.postprocess import mask_to_instances

    params = {"threshold": 0.5, "morphology_radii": [], "sigma": 0.0, "footprint_radius": 3, "min_size": 0, "marker_h": 0.0,
              "fill_holes": 0, "otsu_range": [0.4, 0.6]}
    (tmp_path / "errors_summary.json").write_text("from a previous run\n")
    report = ErrorAnalysisReport(str(tmp_path), params, method="m")
    engine = _report_engine()
    report.attach(engine)
    engine.run([[{"id": "img-a"}], [{"id": "img-b"}]], max_epochs=1)
    with open(tmp_path / "errors.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["img-a", "img-b"] and list(rows[0]) == ["id", *ERROR_SCORES, *ERROR_NAMES]
    _, gt, pred = _pairs()[0]
    gt, pred = gt.numpy().astype(np.int64), pred.numpy().astype(np.int64)
    assert float(rows[0]["aji"]) == pytest.approx(aji(gt, pred))
    assert float(rows[0]["aji_oracle_split"]) == pytest.approx(aji(gt, oracle_split(gt, pred)))
    truth = mask_to_instances(gt > 0, [], 0.0, 3, 0)
    assert float(rows[0]["aji_true_foreground"]) == pytest.approx(aji(gt, truth))
    assert int(rows[0]["false_pred"]) == 1 and int(rows[1]["missed_true"]) == 3
    summary = json.loads((tmp_path / "errors_summary.json").read_text())
    assert summary["method"] == "m" and summary["n_images"] == 2 and summary["false_pred"] == 2
    assert summary["aji"] == pytest.approx(np.mean([float(r["aji"]) for r in rows]))
    assert "threshold" not in summary["mask_params"]


def test_error_analysis_report_refuses_incomplete_params(tmp_path):
    from custom.evaluation.reports import ErrorAnalysisReport

    with pytest.raises(ValueError, match="marker_h"):
        ErrorAnalysisReport(str(tmp_path), {"morphology_radii": [], "sigma": 1.0, "footprint_radius": 3, "min_size": 0, "fill_holes": 0})
