"""Test-only: what a DDP test arranges in every training process it starts, by environment variable.

Python imports tests/ddp_site/sitecustomize.py at start-up when that folder is on PYTHONPATH (as coverage.py
reaches subprocesses), and it calls `install()` in each torchrun worker (RANK is set), however the worker was
started: `torchrun ... -m medclf` or `medclf train --nproc N`.
  MEDCLF_TEST_NORM=group  every model's BatchNorm layers become GroupNorm: statistics per image, not per batch,
                          so one process and several compute the same (SyncBatchNorm, which would make BatchNorm
                          agree, runs on GPUs only)
  MEDCLF_TEST_DIE=R:E     the process of rank R exits at once (exit code 3, as a crash would) when epoch E starts
"""
from __future__ import annotations

import os

from torch import nn


def group_norm(model: nn.Module) -> nn.Module:
    """`model` with each BatchNorm2d replaced by a GroupNorm of one group over the same channels."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.GroupNorm(1, child.num_features))
        else:
            group_norm(child)
    return model


def use_group_norm() -> None:
    from medclf import models

    real = models.build_model
    models.build_model = lambda *args, **kwargs: group_norm(real(*args, **kwargs))


def die_at(rank: int, epoch: int) -> None:
    from medclf import training

    real = training.train_one_epoch
    started = [0]

    def train_one_epoch(*args, **kwargs):
        started[0] += 1
        if started[0] == epoch and int(os.environ["RANK"]) == rank:
            os._exit(3)
        return real(*args, **kwargs)

    training.train_one_epoch = train_one_epoch


def install() -> None:
    if os.environ.get("MEDCLF_TEST_NORM") == "group":
        use_group_norm()
    if os.environ.get("MEDCLF_TEST_DIE"):
        rank, epoch = map(int, os.environ["MEDCLF_TEST_DIE"].split(":"))
        die_at(rank, epoch)
