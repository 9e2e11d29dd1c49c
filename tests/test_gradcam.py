"""Tests for medclf.gradcam."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.models import resnet18

from medclf.gradcam import default_target_layer, grad_cam, overlay, save_overlay


def _resnet(in_ch: int, small_stem: bool) -> nn.Module:
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=3)
    if small_stem:
        model.conv1 = nn.Conv2d(in_ch, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_ch != 3:
        model.conv1 = nn.Conv2d(in_ch, 64, 7, stride=2, padding=3, bias=False)
    return model.eval()


def _tiny_cnn() -> nn.Sequential:
    """conv→relu→conv→relu→GAP→linear; class 1 = bright pixels, class 0 = dark pixels."""
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model[0].weight[0, 0, 1, 1] = 1.0  # channel 0: x (bright)
        model[0].weight[1, 0, 1, 1] = -1.0  # channel 1: 1 - x (dark)
        model[0].bias[1] = 1.0
        model[2].weight[:, :, 0, 0] = torch.eye(2)
        model[6].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    return model.eval()


def _quadrant_image(size: int = 16) -> torch.Tensor:
    img = torch.zeros(1, 1, size, size)
    img[..., : size // 2, : size // 2] = 1.0
    return img


def _check_maps(cam: torch.Tensor, shape: tuple[int, ...]) -> None:
    assert cam.shape == shape and cam.dtype == torch.float32
    assert torch.isfinite(cam).all()
    assert cam.min() >= 0 and cam.max() <= 1


@pytest.mark.parametrize("in_ch,small_stem,size", [(1, True, 28), (3, False, 64)])
def test_resnet_heatmap_shape_and_range(in_ch: int, small_stem: bool, size: int) -> None:
    model = _resnet(in_ch, small_stem)
    cam = grad_cam(model, torch.randn(2, in_ch, size, size))
    _check_maps(cam, (2, size, size))
    assert torch.allclose(cam.amax(dim=(1, 2)), torch.ones(2))  # each map peaks at 1


def test_default_target_layer() -> None:
    model = _resnet(1, True)
    assert default_target_layer(model) is model.layer4
    tiny = _tiny_cnn()
    assert default_target_layer(tiny) is tiny[2]
    with pytest.raises(ValueError):
        default_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_frozen_backbone_and_state_restored() -> None:
    model = _resnet(1, True).train()
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("fc."))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    running_mean = model.bn1.running_mean.clone()
    cam = grad_cam(model, torch.randn(2, 1, 28, 28), target=torch.tensor([0, 2]))
    _check_maps(cam, (2, 28, 28))
    assert cam.std() > 0.01  # non-trivial map despite the frozen backbone
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.bn1.running_mean, running_mean)  # ran in eval mode
    assert all(p.grad is None for p in model.parameters())


def test_inside_inference_mode_matches_normal_call() -> None:
    model = _resnet(1, True)
    x = torch.randn(2, 1, 28, 28)
    expected = grad_cam(model, x)
    with torch.inference_mode():
        inf_x = x.clone()
        cam = grad_cam(model, inf_x)
    _check_maps(cam, (2, 28, 28))
    assert torch.allclose(cam, expected, atol=1e-5)


def test_channels_last_and_bf16_autocast_run_in_fp32() -> None:
    model = _resnet(3, False)
    x = torch.randn(2, 3, 64, 64)
    expected = grad_cam(model, x)
    model = model.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cam = grad_cam(model, x.to(memory_format=torch.channels_last))
    _check_maps(cam, (2, 64, 64))
    assert torch.allclose(cam, expected, atol=1e-4)


def test_gradcam_localises_bright_quadrant() -> None:
    model, img = _tiny_cnn(), _quadrant_image()
    bright = grad_cam(model, img, target=torch.tensor([1]))[0]
    dark = grad_cam(model, img, target=torch.tensor([0]))[0]
    assert bright[:8, :8].sum() / bright.sum() > 0.9
    assert dark[:8, :8].sum() / dark.sum() < 0.1


def test_dead_relu_gives_zero_map_not_nan() -> None:
    model = _tiny_cnn()
    with torch.no_grad():
        model[2].bias.fill_(-10.0)  # second ReLU kills everything
    cam = grad_cam(model, _quadrant_image(), target=torch.tensor([1]))
    assert torch.isfinite(cam).all() and torch.count_nonzero(cam) == 0


def test_target_length_mismatch_raises() -> None:
    with pytest.raises(ValueError):
        grad_cam(_tiny_cnn(), _quadrant_image(), target=torch.tensor([0, 1]))


@pytest.mark.parametrize("shape", [(20, 24), (20, 24, 1), (20, 24, 3)])
def test_overlay_shape_and_dtype(shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    cam = np.linspace(0, 1, 10 * 12, dtype=np.float32).reshape(10, 12)  # resized to 20×24
    out = overlay(image, cam)
    assert out.shape == (20, 24, 3) and out.dtype == np.uint8
    rgb = np.broadcast_to(image.reshape(20, 24, -1), (20, 24, 3))
    assert np.array_equal(overlay(image, cam, alpha=0.0), rgb)
    assert not np.array_equal(out, rgb)


def test_overlay_uses_colormap() -> None:
    image = np.zeros((4, 4), dtype=np.uint8)
    out = overlay(image, np.ones((4, 4)), alpha=1.0, cmap="gray")
    assert (out == 255).all()


@pytest.mark.parametrize("title", [None, "case 7: pneumonia (0.91)"])
def test_save_overlay_writes_png(tmp_path, title: str | None) -> None:
    image = np.full((32, 32), 128, dtype=np.uint8)
    cam = np.zeros((32, 32), dtype=np.float32)
    cam[:16, :16] = 1.0
    path = tmp_path / "out" / "cam.png"
    save_overlay(path, image, cam, title=title)
    with Image.open(path) as png:
        assert png.format == "PNG"
        png.load()
        if title is None:
            assert png.size == (32, 32)
            assert np.array_equal(np.asarray(png.convert("RGB")), overlay(image, cam))
        else:
            assert png.size[0] > 2 * 32  # side-by-side figure
