import numpy as np
import pytest
import torch

from custom.model.losses import ScaleAttentionLoss
from custom.model.networks import AttentionNet, PercentileSigmoid, ScaleAttentionModel, scale_classifier
from custom.model.precision import autocast_context


def test_batch_tau_matches_numpy_percentile():
    torch.manual_seed(0)
    logits = torch.randn(5, 1, 17, 23)
    act = PercentileSigmoid(eta=7.0)
    expected = np.mean([np.percentile(logits[b].numpy().ravel(), 93.0) for b in range(5)])
    assert act.batch_tau(logits).item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    # eta = 7 %: about 7 % of each image's pixels lie above its own percentile
    for b in range(5):
        tau_b = np.percentile(logits[b].numpy().ravel(), 93.0)
        assert abs((logits[b].numpy() > tau_b).mean() - 0.07) < 1.0 / (17 * 23) + 1e-9


def test_running_tau_first_batch_sets_then_momentum():
    act = PercentileSigmoid(eta=10.0, r=20.0, momentum=0.1).train()
    a1, a2 = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8) + 3.0
    act(a1)
    t1 = act.batch_tau(a1).item()
    assert act.running_tau.item() == pytest.approx(t1, abs=1e-6)
    act(a2)
    t2 = act.batch_tau(a2).item()
    assert act.running_tau.item() == pytest.approx(0.9 * t1 + 0.1 * t2, abs=1e-5)
    # the equivariance branch uses the running tau and does not update it
    before = act.running_tau.clone()
    out = act(a1, use_running_tau=True)
    assert torch.equal(act.running_tau, before)
    assert torch.allclose(out, torch.sigmoid(20.0 * (a1 - before)))
    # evaluation uses the running tau
    act.eval()
    assert torch.allclose(act(a2), torch.sigmoid(20.0 * (a2 - before)))


def test_tau_is_detached_and_sigmoid_compressed():
    act = PercentileSigmoid(eta=7.0, r=20.0).train()
    a = torch.randn(2, 1, 10, 10, requires_grad=True)
    out = act(a)
    out.sum().backward()
    tau = act.last_tau
    s = torch.sigmoid(20.0 * (a.detach() - tau))
    # d/da sigmoid(r (a - tau)) with tau constant = r s (1 - s)
    assert torch.allclose(a.grad, 20.0 * s * (1 - s), atol=1e-5)


def test_plain_sigmoid_without_sparsity():
    act = PercentileSigmoid(sparse=False).train()
    a = torch.randn(2, 1, 6, 6)
    assert torch.allclose(act(a), torch.sigmoid(a))
    assert act.last_tau is None and act.num_batches_tracked.item() == 0


def test_slope_override_keeps_the_half_level_set():
    act = PercentileSigmoid(eta=20.0, r=20.0)
    act.running_tau.fill_(0.3)
    act.eval()
    a = torch.randn(1, 1, 16, 16)
    soft = act(a, r=1.0)
    assert torch.allclose(soft, torch.sigmoid(a - 0.3))
    assert torch.equal(soft > 0.5, act(a) > 0.5)  # a > tau either way
    assert torch.allclose(PercentileSigmoid(sparse=False)(a, r=2.0), torch.sigmoid(2.0 * a))
    for bad in (0.0, -1.0, float("nan"), True):
        with pytest.raises(ValueError, match="r \\(sigmoid slope\\)"):
            act(a, r=bad)


@pytest.mark.parametrize("kwargs", [{"eta": 0}, {"eta": 100}, {"r": 0}, {"momentum": 0}])
def test_percentile_sigmoid_rejects_out_of_range(kwargs):
    with pytest.raises(ValueError):
        PercentileSigmoid(**kwargs)


def test_attention_net_structure_and_shape():
    net = AttentionNet(width=8)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.dilation[0] for c in convs[1:-1]] == [1, 1, 2, 2, 3, 3, 5, 5, 10, 10, 20, 20]
    assert all(c.stride == (1, 1) for c in convs)
    assert convs[0].bias is None and convs[-1].bias is not None and convs[-1].out_channels == 1
    x = torch.randn(2, 3, 37, 41)
    net.eval()
    a = net(x)
    assert a.shape == (2, 1, 37, 41) and a.min() >= 0 and a.max() <= 1
    # receptive field radius: 1 (stem) + 2 * (1+2+3+5+10+20) = 83 px (167 px across): nothing further
    # away reaches the centre; the dilated blocks do reach far (exact edge taps may be cut by ReLUs)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 221, 221, requires_grad=True)
    net.logits(x)[0, 0, 110, 110].backward()
    rows = torch.nonzero(x.grad.abs().sum(dim=(0, 1, 3)))[:, 0]
    assert rows.min().item() >= 110 - 83 and rows.max().item() <= 110 + 83
    assert rows.max().item() - 110 >= 60


def test_scale_classifier_is_resnet34():
    g = scale_classifier(num_classes=3)
    n_params = sum(p.numel() for p in g.parameters())
    assert 21_000_000 < n_params < 21_500_000  # ResNet-34 with a 3-way head: 21.29 M
    assert g.conv1.kernel_size == (7, 7) and g.conv1.stride == (2, 2)
    assert g(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_scale_classifier_loads_user_checkpoint(tmp_path):
    src = scale_classifier(num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "g.pt")
    g = scale_classifier(num_classes=3, pretrained_path=str(tmp_path / "g.pt"))
    assert torch.equal(g.conv1.weight, src.conv1.weight)
    torch.save({"nonsense.weight": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt"):
        scale_classifier(pretrained_path=str(tmp_path / "bad.pt"))


def _make_isotropic(net: AttentionNet) -> AttentionNet:
    """Give every 3x3 kernel D4 symmetry (centre, edge and corner weights shared),
    which makes F exactly equivariant to flips, transposes and quarter turns."""
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3):
                w = m.weight
                sym = sum(torch.rot90(w, k, dims=(-2, -1)) for k in range(4))
                sym = sym + sym.transpose(-1, -2)
                m.weight.copy_(sym / 8)
    return net


def test_equivariance_loss_zero_for_equivariant_network():
    torch.manual_seed(0)
    f = _make_isotropic(AttentionNet(width=4, dilations=(1, 2)))
    model = ScaleAttentionModel(f, scale_classifier(), equivariance=True, amp_dtype=None, channels_last=False).train()
    loss = ScaleAttentionLoss()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 3, (4,))
    for _ in range(6):  # every batch draws a transform; the first batch sets the running tau
        f.activation.running_tau.zero_()
        f.activation.num_batches_tracked.zero_()
        out = model(x)
        assert out["equiv_transform"] in (1, 2, 3, 4, 5, 6)
        assert loss(out, y)["loss_equiv"].item() < 1e-10
    # and clearly non-zero for an ordinary (non-symmetric) network
    model2 = ScaleAttentionModel(AttentionNet(width=4, dilations=(1, 2)), scale_classifier(), amp_dtype=None, channels_last=False)
    assert loss(model2(x), y)["loss_equiv"].item() > 1e-4


def test_scale_attention_model_outputs_and_gradients():
    torch.manual_seed(0)
    model = ScaleAttentionModel(AttentionNet(width=4), scale_classifier(), amp_dtype="bfloat16", channels_last=True).train()
    x, y = torch.randn(3, 3, 48, 48), torch.tensor([0, 1, 2])
    out = model(x)
    assert out["scale_logits"].shape == (3, 3) and out["attention"].shape == (3, 1, 48, 48)
    assert out["attention"].dtype == torch.float32 and out["equiv_target"].shape == (3, 1, 48, 48)
    assert not out["equiv_target"].requires_grad
    ScaleAttentionLoss()(out, y)["loss"].backward()
    assert model.attention.stem[0].weight.grad.abs().sum() > 0
    model.eval()
    out = model(x)
    assert "equiv_target" not in out and out["tau"] == model.attention.activation.running_tau


def test_autocast_context_validates():
    with pytest.raises(ValueError, match="amp_dtype"):
        autocast_context("cpu", "int8")
    with autocast_context("cpu", None):
        pass


def test_auto_amp_dtype_is_bf16_only_where_native(monkeypatch):
    import custom.model.precision as networks

    for native in (True, False):
        monkeypatch.setattr(networks, "_cpu_bf16", lambda native=native: native)
        assert networks.resolve_amp_dtype("cpu", "auto") == ("bfloat16" if native else None)
        assert networks.resolve_amp_dtype("cpu", "AUTO") == ("bfloat16" if native else None)
        x = torch.randn(2, 3, 8, 8)
        with networks.autocast_context("cpu", "auto"):
            y = torch.nn.functional.conv2d(x, torch.randn(4, 3, 3, 3))
        assert y.dtype == (torch.bfloat16 if native else torch.float32)
    # explicit names are kept whatever the CPU; fp32 spellings become None
    assert networks.resolve_amp_dtype("cpu", "bf16") == "bf16"
    assert all(networks.resolve_amp_dtype("cpu", v) is None for v in (None, "float32", "fp32", "None", ""))
    assert networks.resolve_amp_dtype("cuda", "auto") == ("bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else None)
    with pytest.raises(ValueError, match="'auto'"):
        networks.resolve_amp_dtype("cpu", "automatic")


def test_explicit_bf16_warns_on_a_cpu_without_native_bf16(monkeypatch):
    import warnings

    import custom.model.precision as networks

    monkeypatch.setattr(networks, "_cpu_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="slower than float32"):
        networks.autocast_context("cpu", "bfloat16")
    monkeypatch.setattr(networks, "_cpu_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        networks.autocast_context("cpu", "bfloat16")


def test_load_attention_weights_from_model_or_checkpoint(tmp_path):
    from custom.model.checkpoint import load_attention_weights

    f = AttentionNet(width=4)
    f.train()(torch.randn(2, 3, 16, 16))
    model = ScaleAttentionModel(f, scale_classifier(), channels_last=False)
    torch.save(f.state_dict(), tmp_path / "model.pt")
    torch.save({"network": model.state_dict(), "optimizer": {}}, tmp_path / "ckpt.pt")
    for name in ("model.pt", "ckpt.pt"):
        g = load_attention_weights(AttentionNet(width=4), str(tmp_path / name))
        assert torch.equal(g.head.weight, f.head.weight) and g.activation.running_tau == f.activation.running_tau
    torch.save({"network": {"classifier.fc.weight": torch.zeros(1)}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt"):
        load_attention_weights(AttentionNet(width=4), str(tmp_path / "other.pt"))


# ---------------------------------------------------------------------------------------------------------
# stain prior, hematoxylin density, extra state and the saved model file
# ---------------------------------------------------------------------------------------------------------

SMALL = {"width": 4, "dilations": (1, 2)}
STAIN_TARGET = [[70.0, 10.0, -10.0], [15.0, 8.0, 6.0]]


def _normalised(rgb) -> torch.Tensor:
    """uint8-valued RGB (..., 3) -> ImageNet-normalised (1, 3, H, W)."""
    from custom.transforms import IMAGENET_MEAN, IMAGENET_STD

    x = torch.as_tensor(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return ((x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1))[None]


@pytest.mark.parametrize("prior", ["none", "input", "logit"])
def test_every_stain_prior_builds_and_keeps_shape(prior):
    net = AttentionNet(stain_prior=prior, **SMALL)
    assert net.stem[0].in_channels == (4 if prior == "input" else 3)
    assert (net.hematoxylin is None) == (prior == "none")
    x = torch.randn(2, 3, 19, 23)
    assert net.train()(x).shape == (2, 1, 19, 23)
    a = net.eval()(x)
    assert a.shape == (2, 1, 19, 23) and torch.isfinite(a).all() and a.min() >= 0 and a.max() <= 1


def test_stain_prior_arguments_are_checked():
    with pytest.raises(ValueError, match="stain_prior"):
        AttentionNet(stain_prior="hed", **SMALL)
    with pytest.raises(ValueError, match="in_channels"):
        AttentionNet(in_channels=1, stain_prior="logit", **SMALL)


def test_logit_prior_starts_from_the_hematoxylin_map():
    from custom.model.networks import HematoxylinDensity

    torch.manual_seed(0)
    gain = 2.5
    net = AttentionNet(stain_prior="logit", stain_prior_gain=gain, **SMALL).eval()
    assert not net.head.weight.any() and not net.head.bias.any()  # zero-initialised head
    x = torch.randn(2, 3, 16, 16)
    expected = gain * HematoxylinDensity()(x)
    assert expected.abs().max() > 0.1  # the prior is not trivially zero on this input
    torch.testing.assert_close(net.logits(x), expected, rtol=1e-6, atol=1e-6)
    # the other priors do not start from the map: the plain network's head is random
    assert not torch.allclose(AttentionNet(stain_prior="none", **SMALL).eval().logits(x), expected)


def test_hematoxylin_density_white_and_purple():
    from custom.model.networks import HematoxylinDensity

    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0] = (255, 255, 255)
    rgb[1] = (90, 50, 140)  # dark purple: a hematoxylin-stained nucleus
    h = HematoxylinDensity()(_normalised(rgb))
    assert h.shape == (1, 1, 2, 2)
    assert h[0, 0, 0].abs().max() < 1e-4  # white: no optical density
    assert h[0, 0, 1].min() > 0.3
    pink = HematoxylinDensity()(_normalised(np.full((1, 1, 3), (235, 170, 200), np.uint8)))
    assert pink.item() < h[0, 0, 1].min().item()  # eosin background has less hematoxylin than the nucleus
    # the sum of the channels' densities, in float32 under bf16 autocast and in a channels-last batch too
    x = _normalised(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    module = HematoxylinDensity()
    expected = (-torch.log((x * module.std + module.mean).clamp(1e-6, 1.0)) * module.weights).sum(1, keepdim=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_amp = module(x.contiguous(memory_format=torch.channels_last))
    assert under_amp.dtype == torch.float32
    torch.testing.assert_close(under_amp, expected, rtol=0, atol=1e-6)


def test_receptive_radius():
    assert AttentionNet(width=4).receptive_radius == 1 + 2 * (1 + 2 + 3 + 5 + 10 + 20)
    assert AttentionNet(**SMALL).receptive_radius == 7


def test_extra_state_survives_save_and_load(tmp_path):
    from custom.model.checkpoint import load_attention_weights, save_attention_network

    settings = {"brightness_percentile": None, "max_std_ratio": 1.5}
    f = AttentionNet(stain_prior="logit", stain_target=STAIN_TARGET, stain_settings=settings, **SMALL)
    f.train()(torch.randn(2, 3, 16, 16))  # sets the running tau
    f.postprocess = {"threshold": 0.35, "footprint_radius": 5, "min_size": 10, "tuned_on": {"split": "val", "n_images": 11}}
    path = save_attention_network(f, tmp_path / "sub" / "model.pt")
    assert path == tmp_path / "sub" / "model.pt" and path.is_file()
    assert not (tmp_path / "sub" / "model.pt.tmp").exists()
    g = load_attention_weights(AttentionNet(stain_prior="logit", **SMALL), str(path))
    assert g.stain_target == STAIN_TARGET and g.postprocess == f.postprocess and g.stain_settings == settings
    assert torch.equal(g.stem[0].weight, f.stem[0].weight) and g.activation.running_tau == f.activation.running_tau != 0
    # the same through a training checkpoint (F's keys, extra state included, under "attention.")
    model = ScaleAttentionModel(f, scale_classifier(), channels_last=False)
    torch.save({"network": model.state_dict(), "optimizer": {}}, tmp_path / "ckpt.pt")
    h = load_attention_weights(AttentionNet(stain_prior="logit", **SMALL), str(tmp_path / "ckpt.pt"))
    assert h.stain_target == STAIN_TARGET and h.postprocess == f.postprocess and h.stain_settings == settings


def test_precision_modes_by_name_in_order_spaces_ignored():
    from custom.model.precision import PRECISION_MODES, precision_modes

    assert precision_modes("fp32") == [("fp32", None, False)]
    assert precision_modes(["bf16+channels_last", "fp32 + channels_last"]) == [
        ("bf16 + channels_last", "bfloat16", True), ("fp32 + channels_last", None, True)]
    assert [m[0] for m in precision_modes(tuple(PRECISION_MODES))] == list(PRECISION_MODES)
    for bad in (["fp16"], [], [3]):
        with pytest.raises(ValueError, match="choose from"):
            precision_modes(bad)


def test_stored_postprocess_reads_the_tuned_values_or_says_how_to_tune(tmp_path):
    from custom.model.checkpoint import save_attention_network, stored_postprocess

    f = AttentionNet(**SMALL)
    untuned = save_attention_network(f, tmp_path / "untuned.pt")
    with pytest.raises(ValueError, match=r"untuned\.pt: stores no tuned post-processing; run scripts/tune_postprocess\.py"):
        stored_postprocess(untuned)
    f.postprocess = {"threshold": "otsu", "sigma": 2.0, "r": 1.0, "tuned_on": {"split": "val", "n_images": 11}}
    tuned = save_attention_network(f, tmp_path / "tuned.pt")
    assert stored_postprocess(tuned) == f.postprocess
    model = ScaleAttentionModel(f, scale_classifier(), channels_last=False)  # a training checkpoint carries it too
    torch.save({"network": model.state_dict()}, tmp_path / "ckpt.pt")
    assert stored_postprocess(tmp_path / "ckpt.pt") == f.postprocess
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.pt: not a readable PyTorch checkpoint"):
        stored_postprocess(tmp_path / "broken.pt")
    with pytest.raises(FileNotFoundError, match="none.pt: no such file"):
        stored_postprocess(tmp_path / "none.pt")


def test_stored_prior_gain_wins_and_another_prior_is_refused(tmp_path):
    from custom.model.checkpoint import load_attention_weights, save_attention_network

    f = AttentionNet(stain_prior="logit", stain_prior_gain=4.0, stain_target=STAIN_TARGET, **SMALL).eval()
    path = save_attention_network(f, tmp_path / "m.pt")
    g = load_attention_weights(AttentionNet(stain_prior="logit", stain_prior_gain=2.0, **SMALL), str(path)).eval()
    x = torch.randn(1, 3, 16, 16)
    assert g.stain_prior_gain == 4.0 and torch.equal(g.logits(x), f.logits(x))
    assert load_attention_weights(AttentionNet(stain_prior="none", **SMALL), str(path)).stain_prior == "logit"  # the file's record wins
    state = torch.load(path, weights_only=False)
    del state["_extra_state"]["architecture"]  # exported before 0.14.0: the config's network, checked against the file
    torch.save(state, tmp_path / "unrecorded.pt")
    with pytest.raises(ValueError, match="stain_prior='logit'") as info:  # same weights, another prior: by name
        load_attention_weights(AttentionNet(stain_prior="none", **SMALL), str(tmp_path / "unrecorded.pt"))
    assert "unrecorded.pt" in str(info.value)
    del state["_extra_state"]["stain_prior_gain"], state["_extra_state"]["stain_prior"]  # exported before 0.6.0
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="old.pt: stores no stain_prior_gain"):  # the gain is unknown: refused, not guessed
        load_attention_weights(AttentionNet(stain_prior="logit", stain_prior_gain=4.0, **SMALL), str(tmp_path / "old.pt"))


def test_state_without_extra_state_still_loads(tmp_path):
    from custom.model.checkpoint import load_attention_weights

    f = AttentionNet(**SMALL)
    f.train()(torch.randn(2, 3, 16, 16))
    state = f.state_dict()
    del state["_extra_state"]  # a file saved before the stain target was stored
    torch.save(state, tmp_path / "old.pt")
    g = load_attention_weights(AttentionNet(stain_target=STAIN_TARGET, **SMALL), str(tmp_path / "old.pt"))
    assert torch.equal(g.head.weight, f.head.weight) and g.activation.running_tau == f.activation.running_tau
    assert g.stain_target == STAIN_TARGET and g.postprocess == {}  # the network's own extra state is kept


def test_wrong_width_names_the_file_and_width(tmp_path):
    from custom.model.checkpoint import load_attention_weights, save_attention_network

    path = save_attention_network(AttentionNet(width=8, dilations=(1, 2)), tmp_path / "wide.pt")
    state = torch.load(path, weights_only=False)
    del state["_extra_state"]["architecture"]  # exported before 0.14.0: the config's network, checked against the file
    torch.save(state, path)
    with pytest.raises(ValueError, match="width") as info:
        load_attention_weights(AttentionNet(**SMALL), str(path))
    assert str(path) in str(info.value) and "'width': 4" in str(info.value)


@pytest.mark.parametrize("where", ["head.bias", "activation.running_tau"])
def test_save_refuses_non_finite_and_keeps_the_old_file(tmp_path, where):
    from custom.model.checkpoint import load_attention_weights, save_attention_network

    f = AttentionNet(**SMALL)
    fresh = tmp_path / "fresh.pt"
    with torch.no_grad():
        if where == "head.bias":
            f.head.bias.fill_(float("nan"))
        else:
            f.activation.running_tau.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match=where):
        save_attention_network(f, fresh)
    assert not fresh.exists() and not (tmp_path / "fresh.pt.tmp").exists()
    # over an existing good file: it stays as it was
    good = AttentionNet(**SMALL)
    path = save_attention_network(good, tmp_path / "model.pt")
    with pytest.raises(FloatingPointError):
        save_attention_network(f, path)
    g = load_attention_weights(AttentionNet(**SMALL), str(path))
    assert torch.equal(g.head.weight, good.head.weight) and torch.isfinite(g.head.bias).all()


def test_compact_network_pads_any_size_and_starts_from_the_hematoxylin_map():
    from custom.model.networks import CompactAttentionNet, HematoxylinDensity

    net = CompactAttentionNet(stride=2, features=(4, 4, 4, 4, 4, 4), stain_prior="logit", stain_prior_gain=3.0).eval()
    assert net.size_multiple == 32 and net.receptive_radius == 64
    x = torch.randn(2, 3, 45, 70)
    with torch.no_grad():
        logits = net.logits(x)
    assert logits.shape == (2, 1, 45, 70)
    torch.testing.assert_close(logits, 3.0 * HematoxylinDensity()(x))  # zero head: the prior alone
    net.unet.final_conv.bias.data.fill_(0.5)
    with torch.no_grad():
        torch.testing.assert_close(net.logits(x), 3.0 * HematoxylinDensity()(x) + 0.5)


@pytest.mark.parametrize("kwargs", [dict(stride=0), dict(features=(4, 4, 4)), dict(context=-1), dict(stain_prior="input")])
def test_compact_network_arguments_are_checked(kwargs):
    from custom.model.networks import CompactAttentionNet

    with pytest.raises(ValueError):
        CompactAttentionNet(**kwargs)


def test_a_file_records_its_architecture_and_loading_builds_it(tmp_path):
    """model.pt names its class and arguments: loading it into another network_def gives the recorded
    network (the student through a config that builds F, F through one that builds the student)."""
    from custom.model.checkpoint import load_attention_weights, save_attention_network
    from custom.model.networks import CompactAttentionNet

    student = CompactAttentionNet(stride=2, features=(4, 4, 8, 8, 8, 4), context=16, eta=20.0, stain_prior_gain=4.0)
    torch.nn.init.normal_(student.unet.final_conv.weight)
    save_attention_network(student, tmp_path / "student.pt")
    loaded = load_attention_weights(AttentionNet(width=2, dilations=(1,), stain_prior="logit"), str(tmp_path / "student.pt"))
    assert isinstance(loaded, CompactAttentionNet) and loaded.architecture() == student.architecture()
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().logits(x), student.eval().logits(x))

    f = AttentionNet(width=3, dilations=(1, 2), stain_prior="logit", stain_prior_gain=2.0)
    save_attention_network(f, tmp_path / "f.pt")
    back = load_attention_weights(CompactAttentionNet(), str(tmp_path / "f.pt"))
    assert isinstance(back, AttentionNet) and back.width == 3 and back.dilations == (1, 2)


def test_an_architecture_record_naming_another_class_is_refused(tmp_path):
    from custom.model.checkpoint import build_attention_network

    with pytest.raises(ValueError, match="m.pt: its architecture record names 'os.system'"):
        build_attention_network({"_target_": "os.system", "command": "true"}, "m.pt")
    with pytest.raises(ValueError, match="cannot build its AttentionNet"):
        build_attention_network({"_target_": "custom.model.networks.AttentionNet", "depth": 3}, "m.pt")
