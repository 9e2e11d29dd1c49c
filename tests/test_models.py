import pytest
import torch
import torchvision
import torch.nn.functional as F

from medclf import models
from medclf.errors import MedclfError


@pytest.mark.parametrize("name", list(models.REGISTRY))
@pytest.mark.parametrize("stem,chans", [("small", 1), ("imagenet", 3)])
def test_every_model_runs_and_learns(name, stem, chans):
    torch.manual_seed(0)
    model = models.build_model(name, num_classes=3, in_chans=chans, stem=stem)
    x = torch.randn(2, chans, 16 if stem == "small" else 32, 16 if stem == "small" else 32)
    out = model(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_small_stem_keeps_resolution():
    model = models.build_model("resnet18", 2, 1, "small")
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)


def test_resolve_stem():
    assert models.resolve_stem("auto", 28) == "small"
    assert models.resolve_stem("auto", 64) == "imagenet"
    assert models.resolve_stem("auto", 224) == "imagenet"
    assert models.resolve_stem("imagenet", 28) == "imagenet"


def test_unknown_model():
    with pytest.raises(MedclfError, match="unknown model"):
        models.build_model("vgg", 2)


def test_gray_conv1_sums_rgb_kernels():
    rgb = torch.randn(64, 3, 7, 7)
    gray = models.adapt_conv1(rgb, 1, "imagenet")
    assert torch.allclose(gray, rgb.sum(1, keepdim=True))
    x = torch.rand(1, 1, 9, 9)
    same = torch.nn.functional.conv2d(x.expand(-1, 3, -1, -1), rgb)
    assert torch.allclose(torch.nn.functional.conv2d(x, gray), same, atol=1e-5)


def test_imagenet_weights_through_torchvision_api(monkeypatch):
    """The weights API is used as is; here it returns a state dict made by the test (no download)."""
    reference = torchvision.models.resnet18()
    calls = {}

    def fake_get_state_dict(self, progress=True, check_hash=True):
        calls["url"] = self.url
        return reference.state_dict()

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_get_state_dict)
    model = models.build_model("resnet18", 2, 1, "imagenet")
    missing = models.load_backbone(model, models.imagenet_state_dict("resnet18"), 1, "imagenet")
    assert "resnet18" in calls["url"] and set(missing) == {"fc.weight", "fc.bias"}
    assert torch.allclose(model.conv1.weight, reference.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(model.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)


def test_imagenet_weights_offline_is_one_line(monkeypatch):
    def fail(self, progress=True, check_hash=True):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fail)
    with pytest.raises(MedclfError, match="cannot download ImageNet weights for resnet18 .*offline.*place resnet18-"):
        models.imagenet_state_dict("resnet18")


def test_checkpoint_self_describes_and_loads_into_torchvision(tmp_path):
    model = models.build_model("resnet18", 2, 1, "small")
    spec = models.model_spec("resnet18", ["a", "b"], 1, "small", 28, [0.5], [0.5])
    torch.save(models.checkpoint_dict(model, spec), tmp_path / "model.pt")
    ckpt = torch.load(tmp_path / "model.pt", weights_only=True)
    assert ckpt["classes"] == ["a", "b"] and ckpt["input_size"] == 28 and ckpt["stem"] == "small"
    plain = torchvision.models.resnet18(num_classes=2)
    plain.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    plain.maxpool = torch.nn.Identity()
    plain.load_state_dict(ckpt["state_dict"])  # strict: every key and shape matches
    loaded, _ = models.load_model(tmp_path)
    x = torch.randn(1, 1, 28, 28)
    assert torch.allclose(loaded(x), plain.eval()(x))


def test_not_a_medclf_checkpoint(tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "model.pt")
    with pytest.raises(MedclfError, match="not a medclf model"):
        models.read_checkpoint(tmp_path / "model.pt")
    with pytest.raises(MedclfError, match="model not found"):
        models.read_checkpoint(tmp_path / "nothing")


def test_mismatched_checkpoint(tmp_path):
    model = models.build_model("resnet18", 2, 1, "small")
    spec = models.model_spec("resnet34", ["a", "b"], 1, "small", 28, [0.5], [0.5])
    torch.save(models.checkpoint_dict(model, spec), tmp_path / "model.pt")
    with pytest.raises(MedclfError, match="does not match"):
        models.load_model(tmp_path / "model.pt")


# ---- the checkpoint schema (issue #14): any damage is one MedclfError line, anything accepted loads ----

from hypothesis import given, settings, strategies as st  # noqa: E402


@pytest.fixture(scope="module")
def good_checkpoint():
    model = models.build_model("resnet18", 2, 1, "small")
    return models.checkpoint_dict(model, models.model_spec("resnet18", ["a", "b"], 1, "small", 12, [0.5], [0.5]))


ODD_VALUES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=4),
                       st.lists(st.one_of(st.text(max_size=3), st.floats(0, 1), st.integers(0, 3)), max_size=4),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@given(key=st.sampled_from(list(models.CHECKPOINT_SCHEMA) + ["format"]), value=ODD_VALUES, drop=st.booleans())
@settings(max_examples=60, deadline=None)
def test_damaged_checkpoint_is_named_or_loads(good_checkpoint, key, value, drop):
    ckpt = dict(good_checkpoint)
    if drop:
        ckpt.pop(key, None)
    else:
        ckpt[key] = value
    problem = models.checkpoint_problem(ckpt)
    if problem is None:  # accepted: it must build, load strictly and answer one probability per class
        model = models.build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_chans"], ckpt["stem"])
        model.load_state_dict(ckpt["state_dict"])
        assert model.eval()(torch.zeros(1, ckpt["in_chans"], 12, 12)).shape == (1, len(ckpt["classes"]))
    else:
        assert "\n" not in problem and (key in problem or "format" in problem or "fc.weight" in problem)


@given(cuts=st.lists(st.integers(0, 10**6), min_size=1, max_size=8), byte=st.integers(0, 255),
       keep=st.floats(0, 1))
@settings(max_examples=40, deadline=None)
def test_damaged_file_is_one_line(tmp_path_factory, cuts, byte, keep):
    """Flipped bytes or a cut-off file: a checkpoint that passes the schema, or one MedclfError line."""
    import io

    buffer = io.BytesIO()
    torch.save({"format": models.FORMAT, "classes": ["a"], "w": torch.arange(4.0)}, buffer)
    data = bytearray(buffer.getvalue())
    for cut in cuts:
        data[cut % len(data)] = byte
    path = tmp_path_factory.mktemp("damaged") / "model.pt"
    path.write_bytes(bytes(data[: max(0, int(len(data) * keep))]))
    with pytest.raises(MedclfError) as error:
        models.read_checkpoint(path)  # never a complete model: the file lacks most of the schema
    assert "\n" not in str(error.value) and str(path) in str(error.value)


@pytest.mark.parametrize("name", list(models.REGISTRY))
@pytest.mark.parametrize("size,channels_last", [(32, False), (32, True), (64, True)])
def test_small_map_convs_give_the_plain_gradients(name, size, channels_last):
    """ResNets at 32-64 px end on 1x1-2x2 maps, where SmallMapConv2d computes convolutions as GEMMs (1x1 outputs
    with only the taps that meet data): the same outputs and gradients as torchvision's plain Conv2d on every
    parameter. In float64, so that a wrong tap or position cannot hide in fp32 rounding, which a BatchNorm over a
    few 1x1 maps amplifies."""
    from medclf.cpu_conv import SmallMapConv2d, _SinglePositionConv, _SmallMapConv

    torch.manual_seed(0)
    fast = models.build_model(name, num_classes=3, in_chans=1, stem="imagenet").double()
    plain = models.build_model(name, num_classes=3, in_chans=1, stem="imagenet").double()
    for module in plain.modules():  # back to torch's own convolution everywhere
        if isinstance(module, SmallMapConv2d):
            module.__class__ = torch.nn.Conv2d
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(6, 1, size, size, dtype=torch.float64)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    calls = {"single": [], "small": []}
    originals = {"single": _SinglePositionConv.forward, "small": _SmallMapConv.forward}

    def spy(kind):
        return staticmethod(lambda ctx, *a: calls[kind].append(a[1].shape) or originals[kind](ctx, *a))
    try:
        _SinglePositionConv.forward, _SmallMapConv.forward = spy("single"), spy("small")
        outputs = []
        for model in (fast, plain):
            model.to(memory_format=fmt).train()
            outputs.append(model(x.contiguous(memory_format=fmt)))
            outputs[-1].logsumexp(1).sum().backward()
    finally:
        _SinglePositionConv.forward = staticmethod(originals["single"])
        _SmallMapConv.forward = staticmethod(originals["small"])
    assert calls["single"] or size == 64, "no convolution took the single-position path"  # 64 px ends on 2x2 maps
    assert calls["small"], "no convolution took the small-map path"
    assert torch.allclose(outputs[0], outputs[1], rtol=1e-10, atol=1e-12)
    grads = dict(plain.named_parameters())
    for key, p in fast.named_parameters():
        ref = grads[key].grad
        assert torch.allclose(p.grad, ref, rtol=1e-8, atol=1e-10 * ref.abs().max().item()), key
        assert p.grad.stride() == p.stride() or p.shape[-2:] == (1, 1), key  # the kernel's own layout: no copy
    assert models.build_model(name, 3, 1).state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("size,kernel,stride,padding", [(1, 3, 1, 1), (2, 3, 2, 1), (2, 1, 2, 0), (3, 3, 1, 0),
                                                        (2, 3, 1, 1), (4, 3, 2, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_tiny_map_convolutions_equal_conv2d(size, kernel, stride, padding, channels_last):
    """Each geometry the GEMM paths handle (taps on padding, strides, 1x1 kernels), alone, against F.conv2d."""
    from medclf.cpu_conv import SmallMapConv2d

    torch.manual_seed(size * 10 + kernel)
    conv = SmallMapConv2d(5, 7, kernel, stride=stride, padding=padding, bias=False).double().train()
    x = torch.randn(4, 5, size, size, dtype=torch.float64)
    if channels_last:
        conv, x = conv.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    fast_x, plain_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = conv(fast_x)
    ref = F.conv2d(plain_x, conv.weight, None, stride, padding)
    grad = torch.randn_like(ref)
    out.backward(grad)
    weight_grad = conv.weight.grad.clone()
    conv.weight.grad = None
    ref.backward(grad)
    assert out.shape == ref.shape and torch.allclose(out, ref, atol=1e-12)
    assert torch.allclose(fast_x.grad, plain_x.grad, atol=1e-12)
    assert torch.allclose(weight_grad, conv.weight.grad, atol=1e-12)


def test_small_map_path_only_while_training_on_cpu():
    from medclf.cpu_conv import SmallMapConv2d, _SmallMapConv

    conv = SmallMapConv2d(8, 8, 3, padding=1, bias=False)
    calls = []
    original = _SmallMapConv.apply
    try:
        _SmallMapConv.apply = lambda *a: calls.append(1) or original(*a)
        x = torch.randn(2, 8, 2, 2)
        conv.eval()(x)
        with torch.no_grad():
            conv.train()(x)
        conv.train()(torch.randn(2, 8, 4, 4))  # 16 output positions: oneDNN's own is faster there
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv.train()(x)
        assert calls == []
        conv.train()(x)
        assert calls == [1]
    finally:
        _SmallMapConv.apply = original
