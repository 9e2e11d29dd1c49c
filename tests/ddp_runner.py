"""Test-only: `medclf ARGS...` as one torchrun process, with what a DDP test arranges by environment variable.

`torchrun --nproc_per_node 2 tests/ddp_runner.py train DATA ...` runs `medclf train DATA ...` in each process.
  MEDCLF_TEST_NORM=group  every model's BatchNorm layers become GroupNorm: statistics per image, not per batch,
                          so one process and several compute the same (SyncBatchNorm, which would make BatchNorm
                          agree, runs on GPUs only)
  MEDCLF_TEST_DIE=R:E     the process of rank R exits at once (exit code 3, as a crash would) when epoch E starts
"""
from __future__ import annotations

import os
import sys

from torch import nn


def group_norm(model: nn.Module) -> nn.Module:
    """`model` with each BatchNorm2d replaced by a GroupNorm of one group over the same channels."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.GroupNorm(1, child.num_features))
        else:
            group_norm(child)
    return model


def use_group_norm(models_module) -> None:
    real = models_module.build_model
    models_module.build_model = lambda *args, **kwargs: group_norm(real(*args, **kwargs))


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


if __name__ == "__main__":
    from medclf import models
    from medclf.cli import main

    if os.environ.get("MEDCLF_TEST_NORM") == "group":
        use_group_norm(models)
    if os.environ.get("MEDCLF_TEST_DIE"):
        die_rank, die_epoch = map(int, os.environ["MEDCLF_TEST_DIE"].split(":"))
        die_at(die_rank, die_epoch)
    sys.exit(main(sys.argv[1:]))
