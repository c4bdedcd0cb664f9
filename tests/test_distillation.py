"""custom.training.distillation: the student takes the teacher's state, the teacher's maps are the targets,
the loss compares maps at the inference slope; the distill.json workflow runs on real images."""

import pytest
import torch

from custom.model.networks import AttentionNet, CompactAttentionNet
from custom.training.distillation import DistillationLoss, StudentLogitsInferer, TeacherAttentiond, student_from_teacher
from tests.conftest import REPO, require_monuseg


def _teacher() -> AttentionNet:
    teacher = AttentionNet(width=4, dilations=(1, 2), eta=20.0, stain_prior="logit", stain_prior_gain=4.0)
    teacher.activation.running_tau.fill_(1.25)
    teacher.stain_target = [[50.0, 10.0, -5.0], [15.0, 8.0, 6.0]]
    teacher.stain_settings = {"brightness_percentile": None, "max_std_ratio": 1.5}
    teacher.postprocess = {"threshold": "otsu", "r": 1.0}
    return teacher.eval()


def test_the_student_takes_the_teachers_tau_stain_settings_and_post_processing():
    teacher = _teacher()
    student = student_from_teacher(CompactAttentionNet(stride=2, features=(4,) * 6), teacher)
    assert float(student.activation.running_tau) == 1.25 and student.activation.eta == 20.0
    assert student.stain_prior_gain == 4.0 and student.stain_target == teacher.stain_target
    assert student.stain_settings == teacher.stain_settings and student.postprocess == teacher.postprocess
    student.postprocess["threshold"] = 0.5  # a copy, not the teacher's dict
    assert teacher.postprocess["threshold"] == "otsu"
    # a student being fine-tuned (self-training, adaptation) keeps a post-processing of its own; one without takes the teacher's
    own = CompactAttentionNet(stride=2, features=(4,) * 6)
    own.postprocess = {"marker_h": 0.0, "r": 1.0}
    assert student_from_teacher(own, teacher, keep_postprocess=True).postprocess == {"marker_h": 0.0, "r": 1.0}
    assert student_from_teacher(own, teacher).postprocess == teacher.postprocess
    fresh = student_from_teacher(CompactAttentionNet(stride=2, features=(4,) * 6), teacher, keep_postprocess=True)
    assert fresh.postprocess == teacher.postprocess
    with pytest.raises(ValueError, match="stain_prior 'none' differs from the teacher's 'logit'"):
        student_from_teacher(CompactAttentionNet(stain_prior="none", features=(4,) * 6), teacher)


def test_loss_is_zero_on_the_teachers_own_map_and_uses_the_tuned_slope():
    teacher = _teacher()
    loss = DistillationLoss(teacher)
    assert loss.r == 1.0 and float(loss.tau) == 1.25
    logits = torch.randn(2, 1, 8, 8)
    target = torch.sigmoid(logits - 1.25)
    assert float(loss(logits, target)) == pytest.approx(0.0, abs=1e-12)
    assert float(loss(logits + 1.0, target)) > 1e-3


def test_teacher_maps_are_the_inferers_and_the_student_inferer_gives_logits():
    teacher = _teacher()
    image = torch.randn(3, 40, 48)
    out = TeacherAttentiond("image", teacher)({"image": image, "id": "a"})
    expected = torch.sigmoid(1.0 * (teacher.logits(image[None]) - 1.25))[0]
    torch.testing.assert_close(out["label"], expected.detach(), atol=1e-5, rtol=1e-5)
    student = student_from_teacher(CompactAttentionNet(stride=2, features=(4,) * 6), teacher).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(StudentLogitsInferer()(x, student), student.logits(x))


def test_distill_workflow_writes_a_student_that_loads_through_the_inference_config(tmp_path):
    """Two iterations of bundle/configs/distill.json on one real training image; the exported student
    loads from its file alone and carries the teacher's tuned post-processing."""
    data = require_monuseg()
    from monai.bundle import ConfigWorkflow

    from custom.model.checkpoint import load_attention_weights

    configs = [str(REPO / "bundle/configs/train.json"), str(REPO / "bundle/configs/distill.json")]
    out = tmp_path / "distill"
    workflow = ConfigWorkflow(config_file=configs, workflow_type="train", bundle_root=str(REPO / "bundle"), dataset_dir=str(data),
                              download=False, output_dir=str(out), distill_ids=["TCGA-A7-A13E-01Z-00-DX1"], distill_epochs=2,
                              crops_per_image=2, distill_batch_size=2, distill_crop_size=64, progress=False, num_workers=0,
                              **{"student_def#features": [4, 4, 8, 8, 8, 4]})
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    student = load_attention_weights(AttentionNet(), str(out / "model.pt"))
    teacher = torch.load(REPO / "bundle/models/attention.pt", weights_only=True)["_extra_state"]
    assert isinstance(student, CompactAttentionNet) and student.features == (4, 4, 8, 8, 8, 4)
    assert student.postprocess == teacher["postprocess"] and student.stain_target == teacher["stain_target"]
