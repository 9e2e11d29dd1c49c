"""Model registry, stems, weights and the self-describing checkpoint format.

A medclf `model.pt` is a plain dict (loads with `torch.load`, weights_only) holding the
architecture, class names and preprocessing, so loading needs no flags; its `state_dict`
loads into the torchvision model with the same stem and channel count (`build_model`).
An ensemble's `model.pt` is the same dict with `"ensemble": K`; its state dict is an `Ensemble`'s
(`members.0.conv1.weight`, ...), so every consumer loads it through `load_model` unchanged.
"""
from __future__ import annotations

import math
import pickle
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
import torchvision
from torch import nn

from .config import RANGES, check_setting
from .cpu_conv import use_small_map_convs
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
    return use_small_map_convs(model)


class Ensemble(nn.Module):
    """K classifiers of one spec answering as one: the log of their mean softmax probabilities.

    Consumers apply softmax to a model's output, so they get the members' mean probability, the
    deep-ensemble rule (averaging logits instead would sharpen the average and spoil calibration)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.stack([member(x).float().log_softmax(1) for member in self.members])
        return torch.logsumexp(log_probs, 0) - math.log(len(self.members))  # log(mean p) without underflow to -inf


def build_for_checkpoint(ckpt: dict[str, Any]) -> nn.Module:
    """The untrained module a checkpoint's state dict loads into: one classifier, or an Ensemble of them."""
    def member() -> nn.Module:
        return build_model(ckpt["arch"], ckpt["num_classes"], ckpt["in_chans"], ckpt["stem"])

    return Ensemble([member() for _ in range(ckpt["ensemble"])]) if "ensemble" in ckpt else member()


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
    if any(k.startswith("members.") for k in state):  # an ensemble's: no one backbone to copy
        raise MedclfError("pretrained weights are an ensemble's; fine-tune from one of its members' model.pt")
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
    """A medclf checkpoint (model.pt or last.pt), loaded with weights_only=True and checked against the schema."""
    path = resolve_model_path(run_or_model)
    ckpt = _torch_load(path)
    problem = checkpoint_problem(ckpt)
    if problem:
        raise MedclfError(f"{path}: {problem}")
    return ckpt


def read_base(path: str | Path) -> dict[str, Any]:
    """The single model that `--weights PATH` fine-tunes from; an ensemble is refused, naming a member to use."""
    ckpt = read_checkpoint(path)
    if "ensemble" in ckpt:
        folder = resolve_model_path(path).parent
        member = next((p for p in sorted(folder.glob("*/model.pt")) if _is_single_model(p)), None)
        instead = f"e.g. {member}" if member else "a member's model.pt"
        raise MedclfError(f"--weights {path} is an ensemble of {ckpt['ensemble']} models; fine-tune from one of "
                          f"them instead ({instead})")
    return ckpt


def _is_single_model(path: Path) -> bool:
    try:
        return "ensemble" not in read_checkpoint(path)
    except MedclfError:  # a damaged neighbour is simply not suggested
        return False


def ensemble_checkpoint(members: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """K single-model checkpoints of one spec → one ensemble checkpoint.

    Keys all members agree on (spec, config, ...) are kept; member-specific ones (epoch, val scores,
    threshold) are dropped, for `extra` to give the ensemble's own."""
    if len(members) < 2:
        raise MedclfError(f"an ensemble needs at least 2 models (got {len(members)})")
    for i, member in enumerate(members, 1):
        problem = checkpoint_problem(member) or ("it is an ensemble itself" if "ensemble" in member else None)
        if problem:
            raise MedclfError(f"ensemble member {i}: {problem}")
        for key in ENSEMBLE_SPEC_KEYS:
            if member.get(key) != members[0].get(key):
                raise MedclfError(f"ensemble members 1 and {i} differ in {key!r} ({_shown(members[0].get(key))} "
                                  f"vs {_shown(member.get(key))}); an ensemble's members share one spec")
    shared = {key: value for key, value in members[0].items()
              if key != "state_dict" and all(key in m and m[key] == value for m in members)}
    state = {f"members.{i}.{key}": value for i, m in enumerate(members) for key, value in m["state_dict"].items()}
    ckpt = {**shared, **(extra or {}), "ensemble": len(members), "state_dict": state}
    problem = checkpoint_problem(ckpt)
    if problem:  # only `extra` can cause this: a caller's bug, not the user's input
        raise ValueError(f"ensemble checkpoint: {problem}")
    return ckpt


def read_resume_state(path: str | Path) -> dict[str, Any]:
    """last.pt: a checkpoint plus the optimizer, scheduler, history and generator state to continue from."""
    state = read_checkpoint(path)
    for key, (fits, expected) in RESUME_SCHEMA.items():
        if key not in state:
            raise MedclfError(f"{path}: not a resume state (no {key!r})")
        if not fits(state[key]):
            raise MedclfError(f"{path}: {key!r} must be {expected} (got {_shown(state[key])})")
    return state


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # a damaged file also warns (e.g. of an odd pickle protocol): one line is enough
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refused a global it does not allow: the file holds objects a plain checkpoint never
        # does, and loading it any other way would run code from it
        detail = re.search(r"WeightsUnpickler error:\s*([^\n]*?)(?:\.\s|\.?$)", str(exc), re.M)
        reason = detail.group(1)[:120] if detail else str(exc).strip().split("\n")[0][:120]
        raise MedclfError(f"{path}: refused to load ({reason}); a medclf checkpoint holds only tensors and "
                          f"plain values, and medclf never unpickles anything else") from None
    except Exception as exc:  # noqa: BLE001 - only torch.load runs here; damaged bytes surface as any of a dozen
        # exception types (RuntimeError, EOFError, KeyError, IndexError, TypeError, AssertionError, ...)
        first = str(exc).strip().split("\n")[0][:200]
        raise MedclfError(f"cannot load {path}: not a PyTorch checkpoint or a damaged one "
                          f"({type(exc).__name__}{': ' + first if first else ''})") from None


def checkpoint_problem(ckpt: Any) -> str | None:
    """What is wrong with a loaded checkpoint, in a few words (None: it is a usable medclf model).

    One schema for every loader (evaluate, predict, explain, report, plan and train --weights/--resume):
    the keys and value types, and that the state dict is the one the spec describes, head size included."""
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        return f"not a medclf model (no '{FORMAT}' format tag)"
    for key, (required, fits, expected) in CHECKPOINT_SCHEMA.items():
        if key not in ckpt:
            if required:
                return f"no {key!r}: not a complete medclf model"
            continue
        if not fits(ckpt[key]):
            return f"{key!r} must be {expected} (got {_shown(ckpt[key])})"
    return _consistency_problem(ckpt) or _state_dict_problem(ckpt)


def _consistency_problem(ckpt: dict[str, Any]) -> str | None:
    k = len(ckpt["classes"])
    if ckpt["num_classes"] != k:
        return f"'num_classes' is {ckpt['num_classes']} but 'classes' lists {k} names"
    if "thresholds" in ckpt and len(ckpt["thresholds"]) != k:
        return f"'thresholds' has {len(ckpt['thresholds'])} value(s) for {k} labels"
    for key in ("mean", "std"):
        if len(ckpt[key]) != ckpt["in_chans"]:
            return f"{key!r} has {len(ckpt[key])} value(s) for {ckpt['in_chans']} channel(s)"
    for name in ("seed", "val_fraction", "test_fraction"):  # evaluate and report rebuild the run's splits from them
        if name in ckpt.get("config", {}):
            try:
                check_setting(name, ckpt["config"][name])
            except MedclfError as exc:
                return f"'config': {exc}"
    return None


def _state_dict_problem(ckpt: dict[str, Any]) -> str | None:
    state, k = ckpt["state_dict"], len(ckpt["classes"])
    prefixes = [""]
    if "ensemble" in ckpt:
        found = {key.split(".")[1] for key in state if key.startswith("members.") and key.count(".") >= 2}
        if len(found) != ckpt["ensemble"]:  # checked first: K sizes the model built below
            return f"'ensemble' is {ckpt['ensemble']} but 'state_dict' holds {len(found)} member(s)"
        prefixes = [f"members.{i}." for i in range(ckpt["ensemble"])]
    for prefix in prefixes:
        head = state.get(f"{prefix}fc.weight")
        if head is None or head.ndim != 2:
            return f"'state_dict' has no classifier head ('{prefix}fc.weight')"
        if head.shape[0] != k:
            return (f"'classes' lists {k} names but the head ('{prefix}fc.weight' in 'state_dict') "
                    f"has {head.shape[0]} outputs")
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = build_for_checkpoint(ckpt).state_dict()
    wrong = [key for key, value in expected.items() if key not in state or state[key].shape != value.shape]
    wrong += [key for key in state if key not in expected]
    if wrong:
        what = f"an ensemble of {ckpt['ensemble']} " if "ensemble" in ckpt else "a "
        return (f"'state_dict' does not match {what}{ckpt['arch']} with a {ckpt['stem']} stem and "
                f"{ckpt['in_chans']} channel(s): {', '.join(wrong[:3])}{' ...' if len(wrong) > 3 else ''}")
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def _is_class_list(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0 and all(isinstance(c, str) and c for c in value)
            and len(set(value)) == len(value))


def _is_numbers(value: Any, positive: bool = False) -> bool:
    return (isinstance(value, list) and len(value) > 0 and all(_is_number(v) for v in value)
            and (not positive or all(v > 0 for v in value)))


def _is_tensor_mapping(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _shown(value: Any) -> str:
    text = type(value).__name__ if isinstance(value, (Mapping, torch.Tensor)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# key: (required, check, what it must be)
CHECKPOINT_SCHEMA: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "arch": (True, lambda v: isinstance(v, str) and v in REGISTRY, f"one of {', '.join(REGISTRY)}"),
    "classes": (True, _is_class_list, "a non-empty list of distinct class names"),
    "num_classes": (True, _is_int, "an integer"),
    "in_chans": (True, lambda v: _is_int(v) and v in (1, 3), "1 or 3"),
    "stem": (True, lambda v: isinstance(v, str) and v in ("small", "imagenet"), "small or imagenet"),
    "input_size": (True, lambda v: _is_int(v) and v in RANGES["size"], f"an integer {RANGES['size']} (pixels)"),
    "store_size": (False, lambda v: _is_int(v) and v in RANGES["size"], f"an integer {RANGES['size']} (pixels)"),
    "mean": (True, _is_numbers, "a list of numbers, one per channel"),
    "std": (True, lambda v: _is_numbers(v, positive=True), "a list of positive numbers, one per channel"),
    "crop": (False, lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "threshold": (False, lambda v: v is None or (_is_number(v) and 0 <= v <= 1), "a number in [0, 1]"),
    "task": (False, lambda v: v in ("multi-class", "multi-label"), "multi-class or multi-label"),
    "thresholds": (False, lambda v: isinstance(v, list) and all(_is_number(t) and 0 <= t <= 1 for t in v),
                   "a list of numbers in [0, 1], one per label"),
    "config": (False, lambda v: isinstance(v, dict), "a mapping of settings"),
    "ensemble": (False, lambda v: _is_int(v) and v >= 2, "an integer >= 2 (the number of member models)"),
    "state_dict": (True, _is_tensor_mapping, "a mapping of parameter names to tensors"),
}
# what every member of an ensemble must agree on: the architecture and how its input is made
ENSEMBLE_SPEC_KEYS = ("arch", "classes", "num_classes", "in_chans", "stem", "input_size", "mean", "std", "crop",
                      "store_size")
RESUME_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "optimizer": (lambda v: isinstance(v, dict), "a mapping"),
    "scheduler": (lambda v: isinstance(v, dict), "a mapping"),
    "history": (lambda v: isinstance(v, list) and all(isinstance(row, dict) for row in v), "a list of rows"),
    "best": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "epoch": (lambda v: _is_int(v) and v >= 0, "an epoch count"),
    "generator": (lambda v: isinstance(v, torch.Tensor), "a tensor"),
}


def load_model(run_or_model: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The trained model (eval mode, CPU, fp32; an Ensemble for an ensemble checkpoint) and its checkpoint dict."""
    ckpt = read_checkpoint(run_or_model)  # the schema check makes the state dict fit the model built here
    model = build_for_checkpoint(ckpt)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
