"""custom.training.pseudo_instances: dihedral views mapped back, confidence of the teacher's instances,
the student's target (carved gaps, ignored rejects and uncertain background), the loss over weight-1
pixels, the target cache, and the selftrain.json workflow on real images without their labels."""

import numpy as np
import pytest
import torch
from scipy import ndimage

from custom.inference.postprocess import attention_to_instances
from custom.model.checkpoint import load_attention_weights, stain_settings_of, stain_target_of
from custom.model.networks import AttentionNet, CompactAttentionNet
from custom.training.pseudo_instances import (
    PseudoInstanceLoss,
    PseudoInstances,
    PseudoInstancesd,
    carve_touching,
    dihedral_attention,
    instance_confidence,
    pseudo_instance_target,
)
from custom.transforms import IMAGENET_MEAN, IMAGENET_STD, ReinhardNormalize, dihedral
from tests.conftest import REPO, require_monuseg

TRAIN_ID = "TCGA-A7-A13E-01Z-00-DX1"


def _real_crop(teacher, height: int = 256, width: int = 256, y: int = 300, x: int = 300) -> torch.Tensor:
    """A crop of a real MoNuSeg training image normalised as the teacher was trained: ``(3, H, W)``."""
    from custom.data.prepared import load_rgb

    rgb = load_rgb(require_monuseg() / "images" / f"{TRAIN_ID}.png")[y : y + height, x : x + width]
    means, stds = stain_target_of(teacher)
    settings = stain_settings_of(teacher)
    img = ReinhardNormalize(means, stds, settings["brightness_percentile"], settings["max_std_ratio"])(np.moveaxis(rgb, -1, 0) / 255.0)
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return ((torch.as_tensor(img, dtype=torch.float32) - mean) / std).float()


def _stage1() -> AttentionNet:
    return load_attention_weights(AttentionNet(), str(REPO / "bundle/models/attention.pt")).eval()


def _pixelwise_teacher(random_head: bool = False) -> AttentionNet:
    """A small F whose head starts at zero: its logits are the hematoxylin prior, pixel by pixel (equivariant);
    with ``random_head`` its convolutions count too (not equivariant)."""
    torch.manual_seed(0)
    teacher = AttentionNet(width=4, dilations=(1, 2), stain_prior="logit", stain_prior_gain=4.0)
    if random_head:
        torch.nn.init.normal_(teacher.head.weight, std=1.0)
    teacher.stain_target = [[56.3, 27.4, -11.8], [18.0, 9.1, 7.6]]
    teacher.stain_settings = {"brightness_percentile": None, "max_std_ratio": 1.5}
    teacher.activation.running_tau.fill_(2.9)
    teacher.postprocess = {"threshold": "otsu", "r": 1.0, "min_size": 30}
    return teacher.eval()


def test_carving_cuts_a_gap_where_instances_touch_and_nowhere_else():
    labels = np.zeros((20, 30), np.int32)
    labels[5:15, 2:10] = 1
    labels[5:15, 10:18] = 2  # touches 1 along a column
    labels[5:15, 22:28] = 3  # alone
    carved = carve_touching(labels, radius=1)
    assert carved[5:15, 9].all() and carved[5:15, 10].all()  # one pixel on each side of the contact
    assert not carved[:, :9].any() and not carved[:, 11:].any()
    pieces, n = ndimage.label((labels > 0) & ~carved, structure=np.ones((3, 3)))
    assert n == 3
    assert not carve_touching(labels, radius=0).any()
    assert carve_touching(labels, radius=2)[5:15, 8:12].all()


def test_target_keeps_confident_instances_ignores_rejects_and_uncertain_background():
    labels = np.zeros((40, 40), np.int32)
    labels[5:15, 5:12] = 1
    labels[5:15, 12:20] = 2  # kept, touching 1
    labels[25:33, 25:33] = 3  # rejected
    attention = np.full(labels.shape, 0.1, np.float32)
    attention[labels > 0] = 0.9
    attention[30:38, 2:10] = 0.52  # background close to the threshold
    target = pseudo_instance_target(labels, np.array([True, True, False]), attention, threshold=0.5,
                                    gap_radius=1, ignore_dilation=2, uncertain_band=0.05)
    foreground, weight = target
    assert target.dtype == np.float32 and set(np.unique(target)) <= {0.0, 1.0}
    assert foreground[labels == 3].sum() == 0 and weight[25:33, 25:33].sum() == 0  # the reject is ignored, dilated by a disk(2)
    assert weight[23:35, 29].sum() == 0 and weight[29, 23:35].sum() == 0 and weight[22, 29] == 1 and weight[29, 35] == 1
    assert weight[23, 23] == 1  # a disk, not a square
    assert (weight[30:38, 2:10] == 0).all()  # uncertain background
    assert (weight[(labels == 1) | (labels == 2)] == 1).all()  # kept instances, their carved gap included
    assert (foreground[5:15, 11:13] == 0).all() and ndimage.label(foreground)[1] == 2
    assert weight[0, 0] == 1 and foreground[0, 0] == 0  # sure background


def test_confidence_measures_area_solidity_margin_and_agreement():
    ref = np.zeros((30, 30), np.int32)
    ref[2:12, 2:12] = 1  # a 10x10 square
    ref[15:25, 15:25] = 2
    ref[15:20, 20:25] = 0  # an L: 75 pixels
    shifted = np.roll(np.where(ref == 1, 1, 0), 1, axis=1)  # a view finding the square one pixel to the right, not the L
    empty = np.zeros_like(ref)  # a view finding nothing
    attention = np.where(ref == 1, 0.8, np.where(ref == 2, 0.55, 0.0))
    c = instance_confidence([ref, shifted, empty], attention, threshold=0.5)
    np.testing.assert_allclose(c["area"], [100, 75])
    assert c["solidity"][0] == pytest.approx(1.0) and c["solidity"][1] < 0.9
    np.testing.assert_allclose(c["margin"], [0.3, 0.05], atol=1e-6)
    np.testing.assert_allclose(c["agreement"], [(90 / 110 + 0.0) / 2, 0.0])
    transform = PseudoInstances(_pixelwise_teacher(), min_area=80, min_solidity=0.9, min_margin=0.1, min_agreement=0.3)
    reasons = transform.reject(c)
    for reason in ("area", "solidity", "margin", "agreement"):
        assert list(reasons[reason]) == [False, True], reason
    none = instance_confidence([np.zeros_like(ref)] * 2, attention, threshold=0.5)  # a view without nuclei
    assert all(v.shape == (0,) for v in none.values()) and all(v.shape == (0,) for v in transform.reject(none).values())
    assert (pseudo_instance_target(np.zeros_like(ref), np.zeros(0, bool), attention, 0.5)[1] == 1).all()


def test_views_are_mapped_back_exactly():
    """A pixelwise teacher gives the same map in every view; for a teacher that is not equivariant, view t
    of an image, transformed by t, is the identity view of the transformed image (a non-square crop)."""
    teacher = _pixelwise_teacher()
    x = _real_crop(teacher, height=96, width=64)
    inferer = PseudoInstances(teacher).inferer
    maps = dihedral_attention(teacher, x, inferer)
    assert len(maps) == 8 and all(m.shape == (96, 64) for m in maps)
    for m in maps[1:]:
        np.testing.assert_allclose(m, maps[0], atol=1e-6)
    teacher = _pixelwise_teacher(random_head=True)
    maps = dihedral_attention(teacher, x, inferer)
    assert np.abs(maps[4] - maps[0]).max() > 1e-3  # not equivariant: the check below means something
    for t in range(8):
        rotated = dihedral_attention(teacher, dihedral(x, t), inferer, views=(0,))[0]
        np.testing.assert_allclose(dihedral(maps[t], t), rotated, atol=1e-5)


def test_stage1_targets_on_a_real_crop():
    """F's confident instances on a 256x256 crop: counts add up, rejects are ignored, the foreground lies in
    kept instances with no two of them joined."""
    teacher = _stage1()
    x = _real_crop(teacher)
    transform = PseudoInstances(teacher)
    target = transform(x).numpy()
    stats = transform.last_stats
    assert target.shape == (2, 256, 256) and set(np.unique(target)) <= {0.0, 1.0}
    assert stats["kept"] + stats["rejected"] == stats["instances"] and stats["kept"] > 5 and stats["rejected"] > 0
    assert stats["rejected"] <= sum(stats[f"rejected_{r}"] for r in ("area", "solidity", "margin", "agreement"))
    labels = attention_to_instances(dihedral_attention(teacher, x, transform.inferer, views=(0,))[0],
                                    **transform.params.as_dict(with_unmarked=True))
    assert labels.max() == stats["instances"]
    kept_ids = [i for i in range(1, labels.max() + 1) if target[0][labels == i].any()]
    rejected = (labels > 0) & ~np.isin(labels, kept_ids)
    assert len(kept_ids) == stats["kept"] and (target[1][rejected] == 0).all() and (target[0][rejected] == 0).all()
    pieces, n = ndimage.label(target[0], structure=np.ones((3, 3)))
    owners = [np.unique(labels[pieces == p]) for p in range(1, n + 1)]
    assert all(len(o) == 1 and o[0] in kept_ids for o in owners)


def test_loss_ignores_weight_zero_pixels():
    teacher = _pixelwise_teacher()
    loss_fn = PseudoInstanceLoss(teacher, dice_weight=0.5)
    assert loss_fn.r == 1.0 and float(loss_fn.tau) == pytest.approx(2.9)
    torch.manual_seed(1)
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)
    target = torch.stack([(torch.rand(2, 16, 16) > 0.5).float(), (torch.rand(2, 16, 16) > 0.3).float()], dim=1)
    loss = loss_fn(logits, target)
    loss.backward()
    ignored = target[:, 1:] == 0
    assert (logits.grad[ignored] == 0).all() and (logits.grad[~ignored] != 0).any()
    changed = logits.detach().clone()
    changed[ignored] += 100.0
    assert float(loss_fn(changed, target)) == pytest.approx(float(loss.detach()))
    plain = PseudoInstanceLoss(teacher)
    w = target[:, 1:]
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits.detach() - 2.9, target[:, :1], reduction="none")
    assert float(plain(logits.detach(), target)) == pytest.approx(float((expected * w).sum() / w.sum()), rel=1e-5)
    agreeing = torch.where(target[:, :1] > 0, 10.0, -5.0)
    assert float(plain(agreeing, target)) < 0.01 < float(plain(-agreeing, target))


def test_cached_targets_are_read_back_and_belong_to_their_teacher(tmp_path, monkeypatch):
    teacher = _pixelwise_teacher()
    x = _real_crop(teacher, height=64, width=64)
    first = PseudoInstancesd("image", teacher, cache_dir=str(tmp_path), stats_key="stats")({"image": x, "id": "a"})
    assert len(list(tmp_path.glob("*.npz"))) == 1 and first["label"].shape == (2, 64, 64)
    again = PseudoInstancesd("image", teacher, cache_dir=str(tmp_path), stats_key="stats")
    monkeypatch.setattr(again.transform, "__call__", None)  # a recomputation would fail
    second = again({"image": x, "id": "a"})
    torch.testing.assert_close(second["label"], first["label"])
    assert second["stats"] == first["stats"] and again.summary()["instances"] == first["stats"]["instances"]
    other = _pixelwise_teacher()
    other.activation.running_tau.fill_(3.5)
    PseudoInstancesd("image", other, cache_dir=str(tmp_path))({"image": x, "id": "a"})
    PseudoInstancesd("image", teacher, cache_dir=str(tmp_path), min_margin=0.2)({"image": x, "id": "a"})
    assert len(list(tmp_path.glob("*.npz"))) == 3


def test_selftrain_workflow_reads_no_training_label_and_writes_a_loadable_student(tmp_path, monkeypatch):
    """One epoch of bundle/configs/selftrain.json on one real training image, the shipped student as the
    teacher (fast); validation reads only the validation image's label."""
    data = require_monuseg()
    from monai.bundle import ConfigWorkflow

    import custom.data.prepared as prepared

    read = []
    original = prepared.load_label
    monkeypatch.setattr(prepared, "load_label", lambda path, *a, **k: read.append(str(path)) or original(path, *a, **k))
    val_id = prepared.list_ids(data, split="val")[0]
    configs = [str(REPO / f"bundle/configs/{name}.json") for name in ("train", "distill", "selftrain")]
    out = tmp_path / "selftrain"
    workflow = ConfigWorkflow(config_file=configs, workflow_type="train", bundle_root=str(REPO / "bundle"), dataset_dir=str(data),
                              download=False, output_dir=str(out), teacher_path=str(REPO / "bundle/models/model.pt"),
                              selftrain_ids=[TRAIN_ID], selftrain_val_ids=[val_id], selftrain_epochs=1, selftrain_crops_per_image=2,
                              selftrain_batch_size=2, selftrain_crop_size=128, pseudo_views=2, progress=False, num_workers=0)
    workflow.initialize()
    workflow.run()
    stats = workflow.parser.get_parsed_content("selftrain#pseudo_labels").stats
    workflow.finalize()
    assert list(stats) == [TRAIN_ID] and stats[TRAIN_ID]["kept"] > 50
    assert read and all(val_id in path for path in read)
    student = load_attention_weights(AttentionNet(), str(out / "model.pt"))
    shipped = torch.load(REPO / "bundle/models/model.pt", weights_only=True)
    assert isinstance(student, CompactAttentionNet) and student.architecture() == shipped["_extra_state"]["architecture"]
    assert student.postprocess == shipped["_extra_state"]["postprocess"] and student.stain_target == shipped["_extra_state"]["stain_target"]
    assert float(student.activation.running_tau) == pytest.approx(float(shipped["activation.running_tau"]))
    assert not torch.equal(student.state_dict()["unet.final_conv.weight"], shipped["unet.final_conv.weight"])


def test_second_opinion_ignores_what_only_one_method_finds():
    """A target piece the second method confirms stays; a piece only the target has, and a nucleus only the
    second method has, become ignored (weight 0, with the dilation); the rest of the weight is untouched."""
    from custom.training.pseudo_instances import second_opinion_target

    target = np.zeros((2, 40, 40), np.float32)
    target[1] = 1
    target[0, 5:12, 5:12] = 1
    target[0, 25:32, 5:12] = 1
    other = np.zeros((40, 40))
    other[6:12, 5:12] = 1  # 6 of the 7 rows: confirmed
    other[25:32, 25:32] = 1  # only the second method
    out = second_opinion_target(target, other, min_overlap=0.5, ignore_dilation=1)
    assert out[0, 8, 8] == 1 and out[1, 8, 8] == 1
    assert out[0, 28, 8] == 0 and out[1, 28, 8] == 0 and out[1, 28, 24] == 0
    assert out[1, 28, 28] == 0 and out[1, 20, 20] == 1 and out[1, 0, 0] == 1
    assert np.array_equal(target[0, 25:32, 5:12], np.ones((7, 7)))  # the input is not changed
    strict = second_opinion_target(target, other, min_overlap=0.9, ignore_dilation=0)
    assert strict[1, 8, 8] == 0  # 6/7 of it confirmed is below 0.9
