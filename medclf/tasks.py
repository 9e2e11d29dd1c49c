"""The few places where a multi-label task (several findings per image) differs from a multi-class one.

Multi-class: one label per image (int64 N), a softmax over the K classes, cross-entropy, arg-max decision.
Multi-label: labels N×L of 0/1, one sigmoid per label, binary cross-entropy (`BCEWithLogitsLoss`), and a
label is decided present where its probability reaches its own threshold (chosen on validation).
The task is a property of the data (`Source.task`); checkpoints record it as `task` (absent: multi-class).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .data.sources import MULTICLASS, MULTILABEL
from .data.splits import label_text
from .errors import MedclfError

__all__ = ["MULTICLASS", "MULTILABEL", "task_of", "is_multilabel", "to_probabilities", "loss_function",
           "positive_weights", "imbalance_ratio", "validation_loss", "check_balance", "decision_threshold", "predicted_names"]


def task_of(ckpt_or_spec: dict[str, Any]) -> str:
    return ckpt_or_spec.get("task", MULTICLASS)


def is_multilabel(ckpt_or_spec: dict[str, Any]) -> bool:
    return task_of(ckpt_or_spec) == MULTILABEL


def decision_threshold(ckpt: dict[str, Any]) -> float | list[float] | None:
    """What the checkpoint decides with: the binary threshold, or multi-label's per-label thresholds."""
    return ckpt.get("thresholds") if is_multilabel(ckpt) else ckpt.get("threshold")


def predicted_names(probs: np.ndarray, ckpt: dict[str, Any]) -> list[str]:
    """Each image's decision as text: the most probable class, or the labels at or above their thresholds
    joined by "|" (empty: no finding)."""
    classes = ckpt["classes"]
    if is_multilabel(ckpt):
        from .metrics import decided_labels

        return [label_text(row, classes) for row in decided_labels(probs, ckpt.get("thresholds"))]
    return [classes[int(i)] for i in probs.argmax(1)]


def to_probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """The model's outputs as probabilities: softmax over classes, or each label's own sigmoid."""
    return logits.sigmoid() if task == MULTILABEL else logits.softmax(1)


def logits_of_mean(outputs: list[torch.Tensor], task: str) -> torch.Tensor:
    """Logits whose probabilities are the mean of the outputs' probabilities (test-time augmentation)."""
    mean = torch.stack([to_probabilities(o, task) for o in outputs]).mean(0)
    return torch.logit(mean) if task == MULTILABEL else mean.log()


def imbalance_ratio(labels: np.ndarray) -> float | None:
    """Multi-label: the largest negatives/positives ratio over labels with positives (what pos_weight corrects)."""
    labels = np.asarray(labels)
    positives = labels.sum(0)
    used = positives > 0
    return float(((len(labels) - positives[used]) / positives[used]).max()) if used.any() else None


def positive_weights(labels: torch.Tensor) -> torch.Tensor:
    """BCE `pos_weight` per label: negatives / positives, so each label's positives weigh as much as its negatives."""
    positives = labels.float().sum(0)
    return (len(labels) - positives) / positives.clamp(min=1)


class SmoothedBCE(nn.Module):
    """`BCEWithLogitsLoss` on targets smoothed towards 0.5 by `smoothing` (y(1 − ε) + ε/2), labels int 0/1."""

    def __init__(self, pos_weight: torch.Tensor | None, smoothing: float):
        super().__init__()
        self.bce = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = labels.float() * (1 - self.smoothing) + self.smoothing / 2
        return self.bce(logits, targets)


def loss_function(task: str, labels: torch.Tensor, balance: str, label_smoothing: float,
                  class_weights: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """The training loss: cross-entropy (weighted by `class_weights(labels)` when balance is "weight"), or BCE
    with `pos_weight` when balance is "weight". Move it to the model's device with `.to(device)`."""
    if task != MULTILABEL:
        weight = class_weights(labels) if balance == "weight" else None
        return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
    return SmoothedBCE(positive_weights(labels) if balance == "weight" else None, label_smoothing)


def check_balance(task: str, balance: str) -> None:
    if task == MULTILABEL and balance == "sample":
        raise MedclfError("--balance sample draws images by class, and a multi-label image has several; "
                          "use --balance weight (BCE pos_weight per label) or none")


def validation_loss(labels: np.ndarray, probs: np.ndarray, task: str) -> float:
    """Mean negative log-likelihood of the labels: cross-entropy, or binary cross-entropy averaged over labels."""
    if task == MULTILABEL:
        p = np.clip(probs, 1e-7, 1 - 1e-7)
        return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())
    p = np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)
    return float(-np.log(p).mean())
