"""Training settings as one dataclass, written to and read from YAML."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from . import atomic
from .errors import MedclfError

CHOICES = {
    "model": ("resnet18", "resnet34", "resnet50"),
    "stem": ("auto", "small", "imagenet"),
    "finetune": ("full", "head"),
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("cosine", "plateau", "constant"),
    "augment": ("none", "light", "strong"),
    "balance": ("auto", "weight", "sample", "none"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "monitor": ("auc", "accuracy", "balanced_accuracy", "f1_macro", "loss"),
}


@dataclass
class TrainConfig:
    """Every setting of a training run. `None` means "resolve automatically"."""

    data: str = ""
    model: str = "resnet18"
    weights: str = "none"  # none | imagenet | PATH to a medclf model.pt
    finetune: str = "full"
    size: int | None = None  # input side in pixels; None: the data's own size
    channels: int | None = None  # 1 or 3; None: 1 for grayscale data
    stem: str = "auto"
    epochs: int = 20
    batch_size: int = 64
    lr: float | None = None  # None: 1e-3 (adam/adamw), 0.05 (sgd)
    weight_decay: float = 1e-4
    optimizer: str = "adamw"
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0  # max gradient norm; 0 turns clipping off
    patience: int = 5  # epochs without improvement before stopping; 0: off
    monitor: str = "auc"
    augment: str = "light"
    balance: str = "auto"  # auto: weighted loss when classes differ by > 1.5x
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0: off
    tta: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    time_budget: float | None = 10.0  # minutes; training stops there, best checkpoint kept; None: no limit
    plan: bool = True  # settings the user did not set come from the data's plan (medclf/plan.py)
    skip_bad: bool = False
    cache: bool = True
    cache_dir: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    out: str | None = None

    def validate(self) -> "TrainConfig":
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise MedclfError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)} (got {value!r})")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise MedclfError(f"--{name.replace('_', '-')} must be >= 1")
        if self.size is not None and self.size < 8:
            raise MedclfError("--size must be >= 8 pixels")
        if self.channels not in (None, 1, 3):
            raise MedclfError("--channels must be 1 or 3")
        if self.time_budget is not None and self.time_budget <= 0:
            raise MedclfError("--time-budget must be > 0 minutes")
        if self.patience < 0:
            raise MedclfError("--patience must be >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise MedclfError(f"unknown setting(s) in config: {', '.join(unknown)}")
        return cls(**values)


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    atomic.write_text(path, yaml.safe_dump(data, sort_keys=False))  # never a half-written config


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MedclfError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MedclfError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MedclfError(f"{path} must hold a mapping of settings")
    return data


def config_field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


__all__ = ["TrainConfig", "CHOICES", "save_yaml", "load_yaml", "config_field_names"]
