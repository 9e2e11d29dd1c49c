"""Training settings as one dataclass, written to and read from YAML, and the one place their rules live.

`TrainConfig.validate` checks every setting against its annotation (type) and its range, so flags,
`--config` files and the Python API reject the same values with the same one-line message.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, get_args, get_type_hints

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
    "channels": (1, 3),
    "checkpoint": ("final", "best"),
    "backend": ("gloo", "nccl"),
}


@dataclass(frozen=True)
class Interval:
    """The finite values a numeric setting may take: from `low` up (to `high`), each end included unless open."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if not isinstance(value, numbers.Integral) and not math.isfinite(value):  # ints: finite, maybe too big for a float
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")  # checked before any data is read; availability later

RANGES = {
    "size": Interval(8),
    "epochs": Interval(1),
    "batch_size": Interval(1),
    "lr": Interval(0, low_open=True),
    "weight_decay": Interval(0),
    "warmup_epochs": Interval(0),
    "label_smoothing": Interval(0, 1, high_open=True),  # 1 would make every target uniform: nothing to learn
    "grad_clip": Interval(0),
    "patience": Interval(0),
    "ema": Interval(0, 1, high_open=True),  # a decay of 1 never moves the average off its initial weights
    "intensity": Interval(0, 1),
    "seed": Interval(0, 2**32 - 1),  # what NumPy's and PyTorch's generators accept
    "folds": Interval(0, 100),  # 0: no cross-validation; 1 is refused in validate
    "time_budget": Interval(0, low_open=True),
    "val_fraction": Interval(0, 1, low_open=True, high_open=True),  # training selects on a validation split
    "test_fraction": Interval(0, 1, high_open=True),
    "world_size": Interval(1),
}

# settings that are no flag of their own (--no-plan, --no-cache) or no flag at all: named as in config.yaml
NOT_FLAGS = {"data": "DATA", "plan": "plan", "cache": "cache", "val_fraction": "val_fraction",
             "test_fraction": "test_fraction", "world_size": "world_size", "backend": "backend"}
TYPE_WORDS = {int: "an integer", float: "a number", str: "text", bool: "true or false", type(None): "null"}


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
    intensity: float = 0.0  # strength of brightness/contrast/gamma/blur/noise augmentation in [0, 1]; 0: off
    balance: str = "auto"  # auto: weighted loss when classes differ by > 1.5x
    ema: float = 0.0  # decay of an exponential moving average of the weights; 0: off
    checkpoint: str = "final"  # final: the weights the completed schedule ends with; best: the best validation epoch
    stop_saturated: bool = True  # finish the schedule early once validation has no errors left
    folds: int = 0  # K >= 2: K-fold cross-validation on train+val; the run's model is the fold ensemble
    refit: bool = False  # with folds: retrain one model on all of train+val instead of keeping the ensemble
    tta: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool | None = None
    compile: bool = False
    time_budget: float | None = 10.0  # minutes; the schedule is finished early to end there; None: no limit
    plan: bool = True  # settings the user did not set come from the data's plan (medclf/plan.py)
    skip_bad: bool = False
    cache: bool = True
    cache_dir: str | None = None
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    out: str | None = None
    # how to read DATA beyond its path (sources.DATA_OPTIONS); None: detected
    images: str | None = None  # folder a label file's relative paths start from (default: the file's folder)
    path_col: str | None = None  # label-file columns, by header name
    label_col: str | None = None
    split_col: str | None = None
    group_col: str | None = None
    group_pattern: str | None = None  # regex on file names whose first group (or match) is the patient
    no_finding: str | None = None  # multi-label label file: the label of an image without findings (default No Finding)
    # how the run was run, recorded (not chosen: torchrun decides): processes training together, their backend
    world_size: int = 1
    backend: str | None = None  # gloo (CPU) or nccl (CUDA) when world_size > 1

    def validate(self) -> "TrainConfig":
        """Every setting checked for type and range (paths become text); MedclfError names the first bad one."""
        for f in fields(self):
            setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))
        if self.folds == 1:
            raise MedclfError("--folds must be 0 (no cross-validation) or at least 2 (got 1)")
        if self.group_pattern is not None:
            from .data.groups import compile_pattern  # the pattern is checked before any data is read

            compile_pattern(self.group_pattern)
        if self.val_fraction + self.test_fraction >= 1:
            raise MedclfError(f"val_fraction + test_fraction must be < 1, to leave images to train on "
                              f"(got {self.val_fraction:g} + {self.test_fraction:g})")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        reject_unknown(values)
        return cls(**values)


def setting_label(name: str) -> str:
    """How messages name a setting: its flag, or its config.yaml key where it has no flag of its own."""
    return NOT_FLAGS.get(name, "--" + name.replace("_", "-"))


def reject_unknown(names: Iterable[Any]) -> None:
    unknown = sorted(str(n) for n in set(names) - set(_FIELD_TYPES))
    if unknown:
        raise MedclfError(f"unknown setting(s) in config: {', '.join(unknown)}")


def check_setting(name: str, value: Any) -> Any:
    """`value` if it suits setting `name` (its annotated type, choices and range), a path as text; else MedclfError."""
    allowed = _FIELD_TYPES[name]
    if str in allowed and isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not any(_is_a(value, t) for t in allowed):
        expected = " or ".join(TYPE_WORDS[t] for t in allowed)
        raise MedclfError(f"{setting_label(name)} must be {expected} (got {_shown(value)})")
    if value is None:
        return value
    if name in CHOICES and value not in CHOICES[name]:
        raise MedclfError(f"{setting_label(name)} must be one of {', '.join(map(str, CHOICES[name]))} "
                          f"(got {_shown(value)})")
    if name in RANGES and value not in RANGES[name]:
        raise MedclfError(f"{setting_label(name)} must be {RANGES[name]} (got {_shown(value)})")
    if name == "device" and not DEVICE_PATTERN.fullmatch(value):
        raise MedclfError(f"{setting_label(name)} must be auto, cpu, cuda, cuda:N or mps (got {_shown(value)})")
    return value


def check_settings(**values: Any) -> None:
    """The rules of `TrainConfig.validate` for settings given one by one (None: unset), e.g. plan's flags."""
    reject_unknown(values)
    for name, value in values.items():
        if value is not None:
            check_setting(name, value)


def _is_a(value: Any, kind: type) -> bool:
    """isinstance for the annotation's types; True and False are no numbers here, NumPy scalars are."""
    if kind in (int, float) and isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, numbers.Integral)
    if kind is float:
        return isinstance(value, numbers.Real)
    return isinstance(value, kind)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    name: get_args(hint) or (hint,) for name, hint in get_type_hints(TrainConfig).items()
}


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that 1e-3 is a number (YAML 1.1 wants 1.0e-3) as users expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def save_yaml(data: dict[str, Any], path: str | Path) -> None:
    atomic.write_text(path, yaml.safe_dump(data, sort_keys=False))  # never a half-written config


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise MedclfError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader) or {}
    except UnicodeDecodeError:
        raise MedclfError(f"cannot parse {path}: not a YAML text file (it is not UTF-8 text)") from None
    except yaml.YAMLError as exc:
        raise MedclfError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise MedclfError(f"{path} must hold a mapping of settings")
    return data


def config_field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


__all__ = ["TrainConfig", "CHOICES", "RANGES", "Interval", "check_setting", "check_settings", "setting_label",
           "save_yaml", "load_yaml", "config_field_names"]
