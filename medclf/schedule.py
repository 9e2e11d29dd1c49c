"""The learning-rate schedule, and the rules that bring it to an early end without cutting it mid-way.

A schedule completes however training ends: by its planned epochs, by the time budget, by early
stopping or because validation is saturated. Ending early does not stop at a high learning rate;
it *finishes* the schedule sooner: from the current step the rate anneals with a half cosine to
exactly 0 on the new last step (`Schedule.finish_at`). The state of that decision lives on the
schedule object, which LambdaLR saves with its state dict, so `--resume` continues it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .config import TrainConfig

SATURATED_VAL_IMAGES = 1000  # zero errors on this many validation images: the error rate is below 3/n (rule of three)
SATURATED_ERROR_RATE = 0.001  # on at least SATURATED_VAL_IMAGES: this share of errors or fewer is saturated
TAIL_FRACTION = 0.1  # an early end anneals over this share of the planned steps (see tail_steps for the bounds)
MIN_TAIL = 3  # steps: one at the current rate, one between, one at 0


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine",
              end: Sequence[float] | None = None) -> float:
    """The learning rate at optimizer step `step` (0-based) of `total`, as a fraction of the peak: linear
    warm-up over `warmup` steps, then constant or a cosine that reaches 0 exactly on the last step.

    `end` = (from_step, last_step, from_factor): training is being brought to an early end; from
    `from_step` the factor falls from `from_factor` along a half cosine to exactly 0 on `last_step`.
    """
    assert total >= 1 and 0 <= warmup < max(total, 1) and step >= 0
    if end is not None:
        start, last, f0 = int(end[0]), int(end[1]), float(end[2])
        assert 0 <= start <= last and 0.0 <= f0 <= 1.0
        if step >= start:
            progress = 1.0 if last == start else min(1.0, (step - start) / (last - start))
            return f0 * 0.5 * (1 + math.cos(math.pi * progress))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    decay_steps = total - warmup - 1  # the last step has decayed fully
    progress = min(1.0, (step - warmup) / decay_steps) if decay_steps > 0 else 1.0
    return 0.5 * (1 + math.cos(math.pi * progress))


class Schedule:
    """`lr_factor` as LambdaLR's function. An object, not a closure, so that LambdaLR.state_dict() saves its
    attributes (the early end included) and load_state_dict() restores them on --resume."""

    def __init__(self, total: int, warmup: int, kind: str):
        self.total, self.warmup, self.kind = total, warmup, kind
        self.end: list[float] | None = None

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.total, self.warmup, self.kind, self.end)

    @property
    def last_step(self) -> int:
        """The 0-based index of the schedule's final optimizer step."""
        return int(self.end[1]) if self.end is not None else self.total - 1

    def finish_at(self, step: int, last_step: int) -> None:
        """Anneal from optimizer step `step` (the next one to run) to 0 on `last_step`; never lengthens the schedule."""
        last_step = max(step, last_step)
        if last_step >= self.last_step:
            return
        step = min(max(step, self.warmup), last_step)  # an end inside the warm-up still reaches the peak first
        self.end = [step, last_step, self(step)]

    def done(self, steps_taken: int) -> bool:
        """True when the final step has run."""
        return steps_taken > self.last_step


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps: int):
    """`Schedule` per optimizer step (`steps` per epoch, from `steps_per_epoch`), or the plateau rule per epoch."""
    if cfg.schedule == "plateau":  # fed monitor_score, which is higher-is-better for every monitor (loss negated)
        return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.5,
                                                          patience=max(1, cfg.patience // 2))
    total = cfg.epochs * steps
    warmup = min(int(cfg.warmup_epochs * steps), total // 2)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, Schedule(total, warmup, cfg.schedule))


def schedule_of(scheduler) -> Schedule | None:
    """The Schedule that can be finished early (None for the plateau rule)."""
    fn = getattr(scheduler, "lr_lambdas", [None])[0]
    return fn if isinstance(fn, Schedule) else None


def tail_steps(planned_steps: int, steps_per_epoch: int) -> int:
    """How many steps an early end anneals over: a tenth of the plan, at most one epoch, at least MIN_TAIL steps
    (even when that spans epochs: the last step runs at rate 0, so one or two steps would anneal nothing)."""
    return max(MIN_TAIL, min(steps_per_epoch, math.ceil(TAIL_FRACTION * planned_steps)))


def epochs_that_fit(seconds_left: float, epoch_seconds: Sequence[float]) -> int:
    """Whole epochs that fit in the time left, at the pace of the epochs so far: the slowest of the last three,
    so one fast epoch does not promise time the next will not have, leaving out the first epoch once there are
    others (it carries one-off costs: allocation, kernel selection, compilation)."""
    assert epoch_seconds, "needs at least one finished epoch"
    pace = max((epoch_seconds[1:] or epoch_seconds)[-3:])
    return max(0, int(seconds_left // pace)) if pace > 0 else 1 << 30


def saturated(history: list[dict], n_val: int) -> bool:
    """Validation has nothing left to show. On fewer than SATURATED_VAL_IMAGES images: no errors now and in the
    epoch before. On more: at most SATURATED_ERROR_RATE of them wrong now (zero up to 1/rate images), because
    with thousands of validation images the last few errors are usually ambiguous images that further epochs do
    not fix, and the annealing tail still runs."""
    def errors(row: dict) -> float:
        acc = row.get("val_accuracy")
        return (1.0 - acc) * n_val if acc is not None and math.isfinite(acc) else math.inf

    if not history or n_val == 0:
        return False
    if n_val >= SATURATED_VAL_IMAGES:
        return errors(history[-1]) <= math.floor(SATURATED_ERROR_RATE * n_val) + 1e-6
    return len(history) >= 2 and errors(history[-1]) < 0.5 and errors(history[-2]) < 0.5
