"""Training with DistributedDataParallel: 2 gloo processes on the CPU (torchrun, and `medclf train --nproc 2`),
compared with 1 process at the same global batch and seed; a rank that dies; resuming; the plan per process."""
import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import medclf
from medclf import distributed, models, planning
from medclf.cli import main
from medclf.distributed import World
from medclf.errors import MedclfError

from conftest import write_class_folders
from ddp_hooks import group_norm

REPO = Path(__file__).resolve().parents[1]
HOOKS = Path(__file__).resolve().parent  # ddp_hooks.py, and ddp_site/sitecustomize.py that installs it in workers
# fixed epochs, no augmentation, no class weights (a weighted mean over a rank's part is not the global one)
FLAGS = ["--no-plan", "--epochs", "2", "--augment", "none", "--intensity", "0", "--balance", "none", "--patience", "0",
         "--folds", "0", "--seed", "0"]
TIMEOUT = 300  # seconds: a hang fails the test instead of stalling CI


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """64 training images of 16 px in two classes, 20 validation and 16 test images."""
    root = tmp_path_factory.mktemp("ddp") / "tiny"
    write_class_folders(root / "train", {"A": 32, "B": 32}, size=16, seed=1)
    write_class_folders(root / "val", {"A": 10, "B": 10}, size=16, seed=2)
    write_class_folders(root / "test", {"A": 8, "B": 8}, size=16, seed=3)
    return root


def python(args: list[str], **env: str) -> subprocess.CompletedProcess:
    """`python ARGS` as a separate process, with the test hooks (ddp_hooks.py) in its torchrun workers."""
    paths = os.pathsep.join([str(REPO), str(HOOKS), str(HOOKS / "ddp_site"), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": paths, **env})


def history(run: Path) -> list[dict]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def config(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict:
    """One process with batch 32; then 2 processes with batch 16 each (`medclf train --nproc 2`) whose rank 1
    dies when epoch 2 starts; then `torchrun -m medclf train --resume` finishing that run on 2 processes.

    BatchNorm would normalise over each rank's half batch only (SyncBatchNorm, which would fix that, runs on
    GPUs only), so every run here uses GroupNorm (statistics per image) and the 2-process runs can be held to
    the 1-process one; README states what BatchNorm changes on the CPU."""
    root = tmp_path_factory.mktemp("runs")
    one, two = root / "one", root / "two"
    with pytest.MonkeyPatch.context() as patch:
        real_build = models.build_model
        patch.setattr(models, "build_model", lambda *a, **k: group_norm(real_build(*a, **k)))
        medclf.train(data=str(data), out=str(one), plan=False, epochs=2, augment="none", intensity=0.0, balance="none",
                     patience=0, folds=0, seed=0, batch_size=32, progress=False)  # FLAGS, as the API takes them
        died = python(["-m", "medclf", "train", str(data), *FLAGS, "--batch-size", "16", "--out", str(two),
                       "--nproc", "2"], MEDCLF_TEST_NORM="group", MEDCLF_TEST_DIE="1:2")
        after_death = {"history": history(two), "last": models.read_resume_state(two / "last.pt")["epoch"],
                       "files": sorted(p.name for p in two.iterdir())}
    resumed = python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "medclf", "train",
                      "--resume", str(two)], MEDCLF_TEST_NORM="group", OMP_NUM_THREADS="1")
    return {"one": one, "two": two, "died": died, "after_death": after_death, "resumed": resumed}


def test_a_rank_that_dies_stops_every_rank_and_leaves_the_last_finished_epoch(runs):
    died, state = runs["died"], runs["after_death"]
    assert died.returncode == 3, died.stderr[-3000:]  # rank 1's exit code, reported by `--nproc`'s launcher
    assert "medclf: training process 1 of 2 failed (exit code 3); the others were stopped" in died.stderr
    assert len(state["history"]) == 1 and state["last"] == 1  # rank 0's last complete writes: epoch 1
    assert "metrics.json" not in state["files"] and not [name for name in state["files"] if name.endswith(".tmp")]


def test_two_gloo_processes_train_as_one_process_with_the_same_global_batch(runs):
    """Two ranks with batch 16 take the steps one process takes with batch 32: the same images per step (each
    rank half of them), gradients averaged, validation gathered; this through a rank's death and --resume.
    The two differ only in the order floating-point sums are taken (the gradient all-reduce), which Adam carries
    into the last digits: measured |Δ loss| ≈ 1e-3 after 2 epochs, allowed 0.01, and at most one of the 20
    validation images classified differently."""
    resumed, one, two = runs["resumed"], runs["one"], runs["two"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows_one, rows_two = history(one), history(two)
    assert len(rows_one) == len(rows_two) == 2
    for a, b in zip(rows_one, rows_two):
        for column in ("train_loss", "val_loss"):
            assert math.isclose(float(a[column]), float(b[column]), abs_tol=0.01), (column, a, b)
        for column in ("val_accuracy", "val_auc"):
            assert abs(float(a[column]) - float(b[column])) <= 1 / 20 + 1e-9, (column, a, b)
        assert a["lr"] == b["lr"]
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    recorded_one, recorded_two = config(one), config(two)
    assert (recorded_one["world_size"], recorded_one["backend"]) == (1, None)
    assert (recorded_two["world_size"], recorded_two["backend"]) == (2, "gloo")
    assert recorded_two["batch_size"] == 16 and "× 2 processes (gloo)" in resumed.stdout
    card_row = next(line for line in (two / "model_card.md").read_text().splitlines() if "world_size" in line)
    assert "`2`" in card_row
    assert resumed.stdout.count("completed:") == 1  # rank 0 speaks for the run


def test_a_run_of_two_processes_resumes_only_with_two(runs, capsys, monkeypatch):
    real_build = models.build_model  # its last.pt holds a GroupNorm model, checked before the process count
    monkeypatch.setattr(models, "build_model", lambda *a, **k: group_norm(real_build(*a, **k)))
    assert main(["train", "--resume", str(runs["two"])]) == 2
    assert "it was trained by 2 process(es), this is 1" in capsys.readouterr().err


def test_nproc_errors_are_one_line(data, tmp_path, monkeypatch, capsys):
    assert main(["train", str(data), "--nproc", "0"]) == 2
    assert capsys.readouterr().err.strip() == "medclf: error: --nproc must be at least 1 (got 0)"
    assert main(["train", str(tmp_path / "missing"), "--nproc", "2"]) == 2  # checked before any process starts
    err = capsys.readouterr().err.strip()
    assert err.startswith("medclf: error: data not found") and "\n" not in err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert main(["train", str(data), "--nproc", "3"]) == 2
    assert "--nproc 3 inside torchrun, which started 2 process(es)" in capsys.readouterr().err


def test_the_torchrun_environment_is_read_and_checked(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert World.from_environment() == World() and not World().active
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert World.from_environment() == World(rank=3, size=4, local_rank=1, local_size=2)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(MedclfError, match="RANK 4 / LOCAL_RANK 1 out of range for WORLD_SIZE 4"):
        World.from_environment()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(MedclfError, match="must be integers"):
        World.from_environment()


@pytest.mark.parametrize("n", [12, 13, 15])
def test_each_rank_takes_an_equal_interleaved_shard_of_the_order(n):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    ranks = [World(rank=r, size=3, local_rank=r, local_size=3) for r in range(3)]
    shards = [distributed.shard(order, w) for w in ranks]
    assert {len(s) for s in shards} == {n // 3}
    together = torch.stack(shards, 1).flatten()  # step by step: rank 0's image, rank 1's, rank 2's
    assert torch.equal(together, order[:n // 3 * 3])  # batch j of the ranks = batch j of one process, 3x larger
    assert distributed.shard(order, World()) is order


@pytest.mark.parametrize("n", [0, 1, 7, 20])
def test_prediction_blocks_cover_every_image_once_in_order(n):
    blocks = [distributed.block(n, World(rank=r, size=3, local_rank=r, local_size=3)) for r in range(3)]
    assert [i for b in blocks for i in range(n)[b]] == list(range(n))


def _fingerprint(n_train: int) -> dict:
    return {"data": "x", "name": "x", "kind": "npz", "classes": ["a", "b"], "num_classes": 2,
            "images": {"train": n_train, "val": n_train // 10}, "imbalance_ratio": 1.0, "short_side": {"median": 28},
            "channels": 1, "bit_depth": 8, "counts": {"train": {"a": n_train // 2, "b": n_train // 2}}}


def test_the_plan_scales_the_rate_with_the_global_batch_and_fits_each_process_share(monkeypatch):
    def probe(arch, k, channels, stem, size, store_size, batch_size, *args, **kwargs):
        return {"train_img_per_s": 100.0, "infer_img_per_s": 500.0, "steps": 1, "batch_size": batch_size,
                "warmup_s": 0.0, "device": "fake"}

    monkeypatch.setattr(planning, "probe", probe)
    one = planning.make_plan(_fingerprint(2000), time_budget=10)
    two = planning.make_plan(_fingerprint(2000), time_budget=10, world_size=2)
    batch = two["settings"]["batch_size"]
    assert batch == one["settings"]["batch_size"]  # per process
    assert math.isclose(two["settings"]["lr"], 1e-3 * math.sqrt(2 * batch / 64))
    assert f"{batch} × 2 processes = {2 * batch}" in two["reasons"]["lr"]
    assert two["settings"]["epochs"] >= 2 * one["settings"]["epochs"] - 1  # each process trains half of every epoch
    small_one = planning.make_plan(_fingerprint(400), time_budget=60)
    small_two = planning.make_plan(_fingerprint(400), time_budget=60, world_size=2)
    assert small_one["settings"]["folds"] >= 2 and small_two["settings"]["folds"] == 0
    assert "2 processes train one model" in small_two["reasons"]["folds"]


def test_cross_validation_is_refused_with_many_processes():
    from medclf.config import TrainConfig
    from medclf.training import _check_world

    two = World(rank=0, size=2, local_rank=0, local_size=2)
    with pytest.raises(MedclfError, match="--folds 5: cross-validation .* with 2 processes train one model"):
        _check_world(TrainConfig(data="x", folds=5), two, None)
    _check_world(TrainConfig(data="x", folds=0), two, None)
    _check_world(TrainConfig(data="x", folds=5), World(), None)


def test_more_processes_than_gpus_is_one_line(monkeypatch):
    for name, value in (("RANK", "1"), ("WORLD_SIZE", "2"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "2")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MedclfError, match="2 processes on this machine need a GPU each; it has 1"):
        with distributed.joined(torch.device("cuda")):
            pass
