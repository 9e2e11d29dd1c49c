"""Many processes, one run: torchrun's environment, the process group, each rank's shard, gathered predictions.

`torchrun --nproc_per_node N -m medclf train DATA` starts N copies of medclf; each finds RANK, WORLD_SIZE and
LOCAL_RANK in its environment (`World.from_environment`) and joins one process group (gloo on the CPU, NCCL
on CUDA). Every rank draws the same seeded epoch order and trains on its own slice of it (`shard`), so the N
ranks together take the steps one process would take with N times the batch. Validation is split in blocks
and gathered back in order (`predict_all`), so its metrics are those of all images, each once. Rank 0 alone
writes files; the others wait for it where they need what it wrote (`main_first`, `main_value`).
`medclf train --nproc N` starts the N processes itself (`launch`), through torch's elastic launcher.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import MedclfError

T = TypeVar("T")

# rank 0 may decode a large data set (or evaluate it) while the others wait at a barrier: hours, not torch's
# default half hour; a rank that dies is noticed by torchrun at once, not by this timeout
WAIT_FOR_MAIN = datetime.timedelta(hours=6)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes; World() is a run of one process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environment(cls) -> "World":
        """The world torchrun describes in RANK/WORLD_SIZE/LOCAL_RANK (and LOCAL_WORLD_SIZE); one process without them."""
        if not all(name in os.environ for name in TORCHRUN_VARIABLES):
            return cls()
        try:
            rank, size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARIABLES)
            local_size = int(os.environ.get("LOCAL_WORLD_SIZE", size))
        except ValueError:
            raise MedclfError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (they are set by torchrun)") from None
        if not 0 <= rank < size or not 0 <= local_rank < local_size:
            raise MedclfError(f"RANK {rank} / LOCAL_RANK {local_rank} out of range for WORLD_SIZE {size} "
                              f"(they are set by torchrun)")
        return cls(rank, size, local_rank, local_size)


SOLO = World()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def joined(device: torch.device) -> Iterator[World]:
    """The process group of a torchrun launch for the duration of a run (a World of one outside torchrun)."""
    world = World.from_environment()
    if not world.active:
        yield world
        return
    if dist.is_initialized():  # joined by an outer run (or by the caller's own script): keep their group
        yield dataclasses.replace(world, backend=dist.get_backend())
        return
    world = dataclasses.replace(world, backend=backend_for(device))
    if device.type == "cuda":
        if world.local_size > torch.cuda.device_count():
            raise MedclfError(f"{world.local_size} processes on this machine need a GPU each; it has "
                              f"{torch.cuda.device_count()} (start as many processes as GPUs, or --device cpu)")
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(world.backend, timeout=WAIT_FOR_MAIN)
    try:
        yield world
    finally:
        dist.destroy_process_group()


def rank_device(device: torch.device, world: World) -> torch.device:
    """Each rank on a node takes its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if world.active and device.type == "cuda":
        return torch.device("cuda", world.local_rank)
    return device


@contextlib.contextmanager
def quiet_unless_main(world: World) -> Iterator[None]:
    """Rank 0 speaks for the run: the others' progress messages would only repeat it (errors still show)."""
    if world.is_main:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def describe(world: World) -> str:
    return f" × {world.size} processes ({world.backend})" if world.active else ""


# --------------------------------------------------------------------------- sharding and gathering

def shard_length(n: int, world: World) -> int:
    """Images each rank trains on per epoch: equal on every rank (the last n mod size of an epoch's order wait
    for a later epoch), so every rank takes the same number of steps."""
    return n // world.size if world.active else n


def shard(order: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's part of an epoch's order: order[rank::size], cut to equal lengths. Batch j of every rank
    together are the images of batch j of one process with a size-times larger batch."""
    if not world.active:
        return order
    return order[world.rank:shard_length(len(order), world) * world.size:world.size]


def block(n: int, world: World) -> slice:
    """This rank's contiguous block of n items for prediction (blocks differ by one item at most)."""
    return slice(world.rank * n // world.size, (world.rank + 1) * n // world.size)


def predict_all(world: World, model: nn.Module, store, predict: Callable[[nn.Module, Any], np.ndarray]) -> np.ndarray:
    """`predict(model, store)` on all of `store`, each rank predicting one block: every image once, in order, on
    every rank (rank 0's model: the ranks' BatchNorm statistics are made rank 0's first)."""
    if not world.active:
        return predict(model, store)
    sync_buffers(world, model)
    probs = predict(model, store.block(block(len(store), world)))
    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, probs)
    return np.concatenate(parts)


def sync_buffers(world: World, model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: each rank updated its own on its last batches."""
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)


# --------------------------------------------------------------------------- agreeing with rank 0

def main_value(world: World, value: T) -> T:
    """Rank 0's `value` on every rank (e.g. its clock's reading, so every rank makes the same decision)."""
    if not world.active:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(world: World, make: Callable[[], T]) -> T:
    """`make()` on rank 0, then on the others: what rank 0 made (the decoded-store cache) is there for them."""
    if world.is_main:
        result = make()
        barrier(world)
        return result
    barrier(world)
    return make()


def from_main(world: World, make: Callable[[], T]) -> T:
    """`make()` on rank 0 only (it writes: the run directory), its result sent to every rank."""
    return main_value(world, make() if world.is_main else None)


def barrier(world: World) -> None:
    if world.active:
        dist.barrier()


def mean(world: World, value: float) -> float:
    """The mean of `value` over the ranks (each rank's training loss on its shard: the loss over all of them)."""
    if not world.active:
        return value
    on = torch.device("cuda", torch.cuda.current_device()) if world.backend == "nccl" else "cpu"  # NCCL: GPU only
    total = torch.tensor([value], dtype=torch.float64, device=on)
    dist.all_reduce(total)
    return float(total.item()) / world.size


def wrap(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """DistributedDataParallel around `model` (which stays the module that is saved and evaluated). On CUDA its
    BatchNorm layers are synchronised across ranks, so a step normalises over the whole global batch as one
    process would; SyncBatchNorm runs on GPUs only, so CPU ranks normalise over their own part of the batch."""
    if not world.active:
        return model
    if device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index])
    return nn.parallel.DistributedDataParallel(model)


# --------------------------------------------------------------------------- launching

def check_nproc(nproc: int) -> None:
    """`--nproc N` outside torchrun starts N processes; inside it, it must say what torchrun started."""
    if nproc < 1:
        raise MedclfError(f"--nproc must be at least 1 (got {nproc})")
    world = World.from_environment()
    if world.active and nproc != world.local_size:
        raise MedclfError(f"--nproc {nproc} inside torchrun, which started {world.local_size} process(es) on this "
                          f"node: drop --nproc, or start torchrun with --nproc_per_node {nproc}")


def launch(argv: list[str], nproc: int) -> int:
    """Run `python -m medclf ARGV` as nproc processes on this machine through torch's elastic launcher (what
    `torchrun --standalone --nproc_per_node N` does); the exit code of the first process that failed, else 0."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the processes share this machine's cores (torchrun would give each one thread)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    for name in list(logging.root.manager.loggerDict):  # the launcher's own log: failures are reported below
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "medclf", *argv)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code != 2:  # 2: the process said what was wrong in one line already
            print(f"medclf: training process {rank} of {nproc} failed (exit code {code}); the others were stopped",
                  file=sys.stderr)
        return code if code > 0 else 128 - code  # killed by signal S: exit 128 + S, as shells report it
    except SignalException as exc:
        print(f"medclf: interrupted ({exc.sigval.name}); every training process was stopped", file=sys.stderr)
        return 130
    return 0
