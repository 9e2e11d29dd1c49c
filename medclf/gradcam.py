"""Grad-CAM heatmaps and overlays for medclf classifiers."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .models import Ensemble


def default_target_layer(model: nn.Module) -> nn.Module:
    """Return the last convolutional block: ``layer4`` for ResNets, else the last Conv2d."""
    layer4 = getattr(model, "layer4", None)
    if isinstance(layer4, nn.Module):
        return layer4
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("model has no nn.Conv2d layer to use for Grad-CAM")
    return convs[-1]


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout noise, no BatchNorm statistic updates), every module's mode restored after."""
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode


def _cam_from(act: torch.Tensor, grad: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Weight activations by spatially averaged gradients, upsample, scale each map to [0, 1]."""
    weights = grad.float().mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act.float()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)[:, 0]
    peak = cam.amax(dim=(1, 2), keepdim=True)
    # All-zero maps stay zero instead of becoming 0/0 = NaN.
    cam = cam / torch.where(peak > 0, peak, torch.ones_like(peak))
    return cam.clamp_(0.0, 1.0).contiguous()


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    target: torch.Tensor | None = None,
    layer: nn.Module | None = None,
) -> torch.Tensor:
    """Grad-CAM heatmaps (N×H×W, float32 in [0, 1]) for normalised N×C×H×W ``images``.

    ``target`` holds class indices (N,); None explains the arg-max prediction.
    Runs in fp32 with gradients on, even under inference_mode/no_grad/autocast,
    and leaves the model's modes, requires_grad flags and ``.grad`` untouched.
    An ``Ensemble``'s map is the mean of its members' maps, each for the ensemble's class.
    """
    if images.ndim != 4:
        raise ValueError(f"expected an N×C×H×W batch, got shape {tuple(images.shape)}")
    if isinstance(model, Ensemble):
        return _ensemble_cam(model, images, target, layer)
    layer = default_target_layer(model) if layer is None else layer
    flags = {p: p.requires_grad for p in model.parameters()}
    captured: dict[str, torch.Tensor] = {}

    def keep_activation(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        captured["act"] = output

    handle = layer.register_forward_hook(keep_activation)
    device = _model_device(model, images.device)
    try:
        with (
            _eval_mode(model),
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(device_type=device.type, enabled=False),
        ):
            # Cloning outside inference mode turns an inference tensor into a normal one;
            # an input that requires grad keeps the graph alive through a frozen backbone.
            x = images.detach().to(device=device, dtype=torch.float32).clone().requires_grad_(True)
            logits = model(x).float()
            if target is None:
                target = logits.argmax(dim=1)
            target = torch.as_tensor(target, device=logits.device).long().reshape(-1)
            if target.numel() != logits.shape[0]:
                raise ValueError(f"target has {target.numel()} entries for {logits.shape[0]} images")
            score = logits.gather(1, target[:, None]).sum()
            act = captured["act"]
            # autograd.grad w.r.t. the activation only, so parameters' .grad stays untouched.
            (grad,) = torch.autograd.grad(score, act)
            return _cam_from(act.detach(), grad, tuple(images.shape[-2:])).detach()
    finally:
        handle.remove()
        for param, flag in flags.items():
            param.requires_grad_(flag)


def _ensemble_cam(model: Ensemble, images: torch.Tensor, target: torch.Tensor | None,
                  layer: nn.Module | None) -> torch.Tensor:
    """The mean of the members' Grad-CAMs, all for one class per image: `target`, else the ensemble's arg-max."""
    if layer is not None:  # a layer belongs to one member; each member is explained at its own last block
        raise ValueError("an ensemble's Grad-CAM uses each member's default layer; give no layer")
    if target is None:
        device = _model_device(model, images.device)
        with _eval_mode(model), torch.no_grad(), torch.autocast(device_type=device.type, enabled=False):
            target = model(images.detach().to(device=device, dtype=torch.float32)).argmax(dim=1)
    return torch.stack([grad_cam(member, images, target) for member in model.members]).mean(0)


def _to_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"image must be H×W, H×W×1 or H×W×3, got shape {image.shape}")


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped ``cam`` (H×W in [0, 1]) over a uint8 image; returns H×W×3 uint8."""
    rgb = _to_rgb(image)
    cam = np.ascontiguousarray(cam, dtype=np.float32)
    height, width = rgb.shape[:2]
    if cam.shape != (height, width):
        cam = np.asarray(Image.fromarray(cam).resize((width, height), Image.Resampling.BILINEAR))
    import matplotlib  # imported where drawn: `import medclf` stays free of plotting code

    heat = matplotlib.colormaps[cmap](np.clip(cam, 0.0, 1.0))[..., :3] * 255.0
    blend = (1.0 - alpha) * rgb.astype(np.float32) + alpha * heat
    return np.clip(np.rint(blend), 0, 255).astype(np.uint8)


def save_overlay(path: str | Path, image: np.ndarray, cam: np.ndarray, title: str | None = None) -> None:
    """Write the overlay as a PNG; with ``title``, image and overlay side by side under it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blend = overlay(image, cam)
    if title is None:
        Image.fromarray(blend).save(path, format="PNG")
        return
    from .reporting.figures import overlay_figure, save_png  # class names in the title are drawn literally

    save_png(overlay_figure(_to_rgb(image), blend, title), path, dpi=100)
