import pytest
import torch
import torchvision

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
    """ResNets at 32-64 px end on 1x1-2x2 maps, where SmallMapConv2d computes the weight gradient by one GEMM:
    the same gradients (fp32 summation order aside) as torchvision's plain Conv2d, on every parameter."""
    from medclf.cpu_conv import SmallMapConv2d, _SmallMapConv

    torch.manual_seed(0)
    fast = models.build_model(name, num_classes=3, in_chans=1, stem="imagenet")
    plain = models.build_model(name, num_classes=3, in_chans=1, stem="imagenet")
    for module in plain.modules():  # back to torch's own convolution everywhere
        if isinstance(module, SmallMapConv2d):
            module.__class__ = torch.nn.Conv2d
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(6, 1, size, size)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    calls = []
    original = _SmallMapConv.forward
    try:
        _SmallMapConv.forward = staticmethod(lambda ctx, *a: calls.append(a[1].shape) or original(ctx, *a))
        for model in (fast, plain):
            model.to(memory_format=fmt).train()
            model(x.contiguous(memory_format=fmt)).logsumexp(1).sum().backward()
    finally:
        _SmallMapConv.forward = staticmethod(original)
    assert calls, "no convolution took the small-map path"
    assert all(shape[-1] in (1, 3) for shape in calls)
    grads = dict(plain.named_parameters())
    for key, p in fast.named_parameters():
        ref = grads[key].grad
        assert torch.allclose(p.grad, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item()), key
    assert models.build_model(name, 3, 1).state_dict().keys() == plain.state_dict().keys()


def test_small_map_path_only_while_training_fp32_on_cpu():
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
