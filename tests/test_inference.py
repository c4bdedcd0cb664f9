import os

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from custom.inference.inferer import TiledAttentionInferer, cpu_cores, receptive_field_radius, set_cpu_threads
from custom.model.networks import AttentionNet, ScaleAttentionModel, scale_classifier
from custom.transforms import EQUIVARIANCE_TRANSFORMS, dihedral, dihedral_inverse

SMALL_DILATIONS = (1, 2, 3)  # receptive-field radius 13: cheap on CPU


def _net(dilations=SMALL_DILATIONS, width=4, seed=0) -> AttentionNet:
    """A small AttentionNet in eval mode with non-trivial BatchNorm statistics and running tau."""
    torch.manual_seed(seed)
    net = AttentionNet(width=width, dilations=dilations)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        net.activation.running_tau.fill_(0.05)
    return net.eval()


def _image(*shape, seed=1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_receptive_field_radius():
    assert receptive_field_radius(AttentionNet(width=1)) == 1 + 2 * 41 == 83  # paper dilations
    assert receptive_field_radius(AttentionNet(width=1, dilations=SMALL_DILATIONS)) == 13


def test_whole_image_is_the_network_in_eval_mode():
    net = _net()
    x = _image(1, 3, 40, 56)
    out = TiledAttentionInferer(roi_size=64, tta=False)(x, net)
    assert out.shape == (1, 1, 40, 56) and out.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(out, net(x), rtol=0, atol=0)


def test_tiled_equals_whole_image_paper_dilations():
    net = _net(dilations=(1, 2, 3, 5, 10, 20))
    x = _image(1, 3, 200, 180)
    whole = TiledAttentionInferer(roi_size=512, tta=False)(x, net)
    tiled = TiledAttentionInferer(roi_size=100, tta=False)(x, net)  # 2 x 2 tiles, margin 83
    assert tiled.shape == (1, 1, 200, 180)
    assert (tiled - whole).abs().max().item() < 1e-5
    assert 0.05 < whole.mean().item() < 0.95  # a non-trivial map
    # too little context changes the tile borders: the margin is what makes tiling exact
    short = TiledAttentionInferer(roi_size=100, margin=10, tta=False)(x, net)
    assert (short - whole).abs().max().item() > 1e-3


def test_tiled_tta_equals_whole_tta_non_square():
    net = _net()
    x = _image(1, 3, 150, 110)
    whole = TiledAttentionInferer(roi_size=256, tta=True)(x, net)
    # 4 x 3 tiles (interior ones cut on both sides); the transposed images are 110 x 150
    tiled = TiledAttentionInferer(roi_size=48, tta=True)(x, net)
    assert tiled.shape == whole.shape == (1, 1, 150, 110)
    assert (tiled - whole).abs().max().item() < 1e-5


def test_tta_is_the_dihedral_average():
    net = _net()
    x = _image(1, 3, 36, 52)
    out = TiledAttentionInferer(roi_size=64, tta=True)(x, net)
    with torch.no_grad():
        maps = [dihedral_inverse(net(dihedral(x, t).contiguous()), t) for t in (0, *EQUIVARIANCE_TRANSFORMS)]
    torch.testing.assert_close(out, torch.stack(maps).mean(0), rtol=0, atol=1e-6)
    plain = TiledAttentionInferer(roi_size=64, tta=False)(x, net)
    assert not torch.allclose(out, plain)  # a random network is not equivariant


def test_batch_of_two_matches_single_images():
    net = _net()
    x = _image(2, 3, 70, 50)
    inferer = TiledAttentionInferer(roi_size=32, tta=False)
    both = inferer(x, net)
    assert both.shape == (2, 1, 70, 50)
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], inferer(x[i : i + 1], net), rtol=0, atol=1e-5)


def test_mode_restored_and_no_running_stats_update():
    net = _net().train()
    tau, mean = net.activation.running_tau.clone(), net.stem[1].running_mean.clone()
    out = TiledAttentionInferer(roi_size=32, tta=False)(_image(1, 3, 40, 40), net)
    assert net.training and not out.requires_grad
    assert torch.equal(net.activation.running_tau, tau) and torch.equal(net.stem[1].running_mean, mean)


def test_unwraps_scale_model_and_keeps_meta():
    net = _net()
    model = ScaleAttentionModel(net, scale_classifier(), channels_last=False)
    x = MetaTensor(_image(1, 3, 40, 30), meta={"filename_or_obj": "tile.png"})
    out = TiledAttentionInferer(roi_size=32, tta=False)(x, model)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "tile.png"
    with torch.no_grad():
        torch.testing.assert_close(out.as_tensor(), net(x.as_tensor()), rtol=0, atol=1e-6)


def test_amp_and_channels_last_close_to_fp32():
    net = _net()
    x = _image(1, 3, 48, 40)
    ref = TiledAttentionInferer(roi_size=32, tta=False)(x, net)
    cl = TiledAttentionInferer(roi_size=32, tta=False, channels_last=True)(x, net)
    assert (cl - ref).abs().max().item() < 1e-5
    bf16 = TiledAttentionInferer(roi_size=32, tta=False, amp_dtype="bfloat16")(x, net)
    assert bf16.dtype == torch.float32 and bf16.shape == ref.shape
    assert (bf16 - ref).abs().mean().item() < 0.05


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"roi_size": 8}, "roi_size must be >= 16"),
        ({"roi_size": (32, 32, 32)}, "roi_size must be an int"),
        ({"margin": -1}, "margin must be an integer >= 0"),
        ({"amp_dtype": "int8"}, "amp_dtype"),
        ({"r": 0}, r"r \(sigmoid slope\)"),
        ({"r": float("inf")}, r"r \(sigmoid slope\)"),
        ({"r": "1"}, r"r \(sigmoid slope\)"),
    ],
)
def test_invalid_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TiledAttentionInferer(**kwargs)


def test_r_softens_the_map_and_keeps_its_ordering():
    net, x = _net(), _image(1, 3, 40, 36)
    sharp = TiledAttentionInferer(tta=False)(x, net)
    soft = TiledAttentionInferer(tta=False, r=1.0)(x, net)
    with torch.no_grad():
        expected = torch.sigmoid(net.logits(x) - net.activation.running_tau)
    assert torch.allclose(soft, expected, atol=1e-5)
    assert torch.equal(soft > 0.5, sharp > 0.5)
    r = net.activation.r  # the network's own slope is the default
    assert torch.allclose(TiledAttentionInferer(tta=False, r=r)(x, net), sharp)


def test_invalid_inputs():
    net, inferer = _net(), TiledAttentionInferer(roi_size=32, tta=False)
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        inferer(_image(3, 20, 20), net)
    with pytest.raises(ValueError, match="channels"):
        inferer(_image(1, 4, 20, 20), net)
    with pytest.raises(ValueError, match="float"):
        inferer(torch.zeros(1, 3, 20, 20, dtype=torch.uint8), net)
    with pytest.raises(TypeError, match="torch tensor"):
        inferer(np.zeros((1, 3, 20, 20), np.float32), net)
    with pytest.raises(ValueError, match="AttentionNet"):
        inferer(_image(1, 3, 20, 20), torch.nn.Conv2d(3, 1, 3))


def test_set_cpu_threads_leaves_a_core_per_worker_process(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    try:
        assert set_cpu_threads("auto", "cpu", worker_processes=1) == max(1, cores - 1) == torch.get_num_threads()
        assert set_cpu_threads("auto", "cpu", worker_processes=cores + 5) == 1 == torch.get_num_threads()
        assert set_cpu_threads(3, "cpu") == 3 == torch.get_num_threads()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun ranks share the cores
        assert set_cpu_threads("auto", "cpu", worker_processes=0) == max(1, cores // 2)
        torch.set_num_threads(2)
        assert set_cpu_threads("auto", "cuda", worker_processes=1) == 2 == torch.get_num_threads()  # a GPU: torch as it is
    finally:
        torch.set_num_threads(before)


def test_cpu_cores_is_this_process_share(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    assert cpu_cores() == cores
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(cores + 3))  # more ranks than cores: still one each
    assert cpu_cores() == 1


def test_auto_postprocess_workers_are_one_per_core(monkeypatch, tmp_path):
    from custom.wsi.writer import SlideNucleiWriter

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert SlideNucleiWriter(str(tmp_path), []).workers == cpu_cores()
    assert SlideNucleiWriter(str(tmp_path), [], workers=0).workers == 0
    with pytest.raises(ValueError, match="postprocess_workers must be 'auto' or an integer"):
        SlideNucleiWriter(str(tmp_path), [], workers="all")


@pytest.mark.parametrize("threads, workers, match", [(0, 0, "cpu_threads"), ("all", 0, "cpu_threads"), (True, 0, "cpu_threads"),
                                                     ("auto", -1, "worker_processes")])
def test_set_cpu_threads_refuses_bad_values(threads, workers, match):
    with pytest.raises(ValueError, match=match):
        set_cpu_threads(threads, "cpu", workers)
