"""Model registry, stems, weights and the self-describing checkpoint format.

A medclf `model.pt` is a plain dict (loads with `torch.load`, weights_only) holding the
architecture, class names and preprocessing, so loading needs no flags; its `state_dict`
loads into the torchvision model with the same stem and channel count (`build_model`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from .errors import MedclfError

FORMAT = "medclf-model/1"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SMALL_STEM_MAX_SIZE = 48  # inputs up to this side keep full resolution in the stem (MedMNIST practice at 28 px)

# name -> (torchvision builder, ImageNet weights enum member name)
REGISTRY: dict[str, tuple[Any, str]] = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
}


def resolve_stem(stem: str, size: int) -> str:
    if stem == "auto":
        return "small" if size <= SMALL_STEM_MAX_SIZE else "imagenet"
    return stem


def data_config(weights: str, channels: int) -> dict[str, list[float]]:
    """Normalisation: ImageNet statistics for ImageNet weights (gray: their mean), 0.5/0.5 otherwise."""
    if weights == "imagenet":
        if channels == 1:
            return {"mean": [sum(IMAGENET_MEAN) / 3], "std": [sum(IMAGENET_STD) / 3]}
        return {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    return {"mean": [0.5] * channels, "std": [0.5] * channels}


def build_model(name: str, num_classes: int, in_chans: int = 3, stem: str = "imagenet") -> nn.Module:
    """A torchvision ResNet with the given stem, input channels and class count (random init)."""
    if name not in REGISTRY:
        raise MedclfError(f"unknown model {name!r}; choose from {', '.join(REGISTRY)}")
    model = REGISTRY[name][0](num_classes=num_classes)
    if stem == "small":
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_chans != 3:
        model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # fan_in: with one input channel, torchvision's fan_out init makes conv1's outputs ~100x too small
    # in variance, and BatchNorm's running variance (initialised to 1, momentum 0.1) then stays far off
    # for hundreds of steps, so eval-mode predictions collapse to one class in short runs.
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_in", nonlinearity="relu")
    return model


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights through torchvision's weights API (cached in the torch hub folder)."""
    weights_enum = getattr(torchvision.models, REGISTRY[name][1]).DEFAULT
    try:
        return weights_enum.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:
        hub = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights_enum.url).name
        raise MedclfError(f"cannot download ImageNet weights for {name} ({type(exc).__name__}); offline? "
                          f"place {weights_enum.url.rsplit('/', 1)[-1]} at {hub}") from None


def adapt_conv1(weight: torch.Tensor, in_chans: int, stem: str) -> torch.Tensor:
    """Pretrained 7×7 RGB conv1 kernels for another channel count or the 3×3 small stem."""
    if in_chans == 1 and weight.shape[1] == 3:
        weight = weight.sum(1, keepdim=True)  # a gray image equals R=G=B: summing keeps the response
    elif in_chans == 3 and weight.shape[1] == 1:
        weight = weight.repeat(1, 3, 1, 1) / 3
    if stem == "small" and weight.shape[-1] != 3:
        weight = torch.nn.functional.interpolate(weight, size=(3, 3), mode="bilinear", antialias=True) * (3 * 3) / (7 * 7)
    return weight


def load_backbone(model: nn.Module, state: dict[str, torch.Tensor], in_chans: int, stem: str) -> list[str]:
    """Copy pretrained weights into model, except the classifier head. Returns keys left at init."""
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" in state:
        state["conv1.weight"] = adapt_conv1(state["conv1.weight"], in_chans, stem)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        raise MedclfError(f"pretrained weights do not match the model: {', '.join(mismatched[:3])}")
    missing, _ = model.load_state_dict(state, strict=False)
    return list(missing)


def freeze_backbone(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = name.startswith("fc.")


def checkpoint_dict(model: nn.Module, spec: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    state = {k: v.detach().to("cpu", torch.float32).contiguous() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    return {"format": FORMAT, **spec, "state_dict": state, **(extra or {})}


def model_spec(name: str, classes: list[str], in_chans: int, stem: str, input_size: int,
               mean: list[float], std: list[float]) -> dict[str, Any]:
    """What a checkpoint says about itself: enough to rebuild and feed the model."""
    return {"arch": name, "classes": list(classes), "num_classes": len(classes), "in_chans": in_chans,
            "stem": stem, "input_size": input_size, "mean": list(mean), "std": list(std)}


def resolve_model_path(run_or_model: str | Path) -> Path:
    path = Path(run_or_model).expanduser()
    if path.is_dir():
        path = path / "model.pt"
    if not path.is_file():
        raise MedclfError(f"model not found: {path} (give a run directory or a model.pt)")
    return path


def read_checkpoint(run_or_model: str | Path) -> dict[str, Any]:
    path = resolve_model_path(run_or_model)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise MedclfError(f"cannot load {path}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise MedclfError(f"{path} is not a medclf model (no '{FORMAT}' format tag)")
    return ckpt


def load_model(run_or_model: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model (eval mode, CPU, fp32) and its checkpoint dict."""
    ckpt = read_checkpoint(run_or_model)
    model = build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_chans"], ckpt["stem"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise MedclfError(f"checkpoint does not match its architecture: {str(exc).splitlines()[0]}") from None
    return model.eval(), ckpt
