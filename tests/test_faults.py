"""Faults a real machine has: kills and Ctrl-C at any moment, a full disk, bad settings, odd --out values.

After each fault every file medclf left is complete and loadable or absent, and the next plain command
(a re-run or `--resume`) finishes. Kills run training as a separate process (tests/fault_runner.py).
"""
import csv
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from medclf import training
from medclf.cli import main
from medclf.data import cache as disk_cache
from medclf.data import store

from conftest import FAST_FLAGS, interrupt_second_epoch, make_split_folder

train_module = training
RUNNER = Path(__file__).with_name("fault_runner.py")
REPO = Path(__file__).resolve().parents[1]


def medclf(*argv, fault: str | None = None, kill_after: float | None = None) -> int:
    """Run `medclf ARGV` in a child process; `fault` arms fault_runner (and must fire), `kill_after` SIGKILLs the
    child after that many seconds."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    env.pop("MEDCLF_TEST_FAULT", None)
    fd, log = tempfile.mkstemp(prefix="medclf-fault-", suffix=".log")  # outside the test's folders
    os.close(fd)
    env["MEDCLF_TEST_FAULT_LOG"] = log
    if fault:
        env["MEDCLF_TEST_FAULT"] = fault
    child = subprocess.Popen([sys.executable, str(RUNNER), *map(str, argv)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = child.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        child.kill()
        _, err = child.communicate()
    fired = Path(log).read_text().split()
    os.unlink(log)
    if child.returncode not in (0, 130, -signal.SIGKILL):
        raise AssertionError(f"medclf {' '.join(map(str, argv))} exited {child.returncode}:\n{err[-3000:]}")
    if fault:  # the fault must have fired where it was meant to, not merely been armed
        point, nth, _ = fault.split(":")
        assert fired == [f"{point}:{nth}"], f"fault {fault} never fired (exit {child.returncode}):\n{err[-3000:]}"
    return child.returncode


def next_command(run: Path, data: Path, epochs: int) -> list:
    """What a user does next: resume when an epoch was saved, else the same command again."""
    if (run / "last.pt").is_file():
        return ["train", "--resume", run]
    return ["train", data, *FAST_FLAGS, "--epochs", epochs, "--out", run]


def assert_artifacts_whole(run: Path) -> None:
    """Every checkpoint present loads; no temporary file outlives a finished command."""
    for name in ("model.pt", "last.pt"):
        if (run / name).exists():
            ckpt = torch.load(run / name, weights_only=True)
            assert "state_dict" in ckpt, name
    for name in ("history.csv", "splits.csv"):
        if (run / name).exists():
            rows = list(csv.reader(open(run / name)))
            assert rows and rows[0][0] in ("epoch", "split"), name


def snapshot(root: Path, skip: list[Path]) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if p.is_file() and not any(s == p or s in p.parents for s in skip)}


def temporary_stores(stores: Path) -> list[Path]:
    return sorted(p for p in stores.iterdir() if p.name.startswith(disk_cache.TMP_PREFIX)) if stores.is_dir() else []


def finished_stores(stores: Path) -> list[Path]:
    return sorted(p for p in stores.iterdir() if disk_cache.is_store_folder(p)) if stores.is_dir() else []


def test_sigkill_at_chosen_and_random_moments_then_resume_finishes(tmp_path, monkeypatch):
    data = make_split_folder(tmp_path / "xray")
    run, cache = tmp_path / "run", tmp_path / "cache"
    monkeypatch.setenv("MEDCLF_DATA", str(cache))  # a cache of its own, so the cache writes happen here
    stores = cache / "stores"
    before = snapshot(tmp_path, [run, cache])
    # each fires (medclf() checks), in this order; what a user runs next follows from what the kill left
    chosen = ["decode:20:KILL",     # decoding train into the reserved images.npy of a temporary cache folder
              "cache:1:KILL",       # train's store flushed and described, just before its folder is renamed in
              "checkpoint:1:KILL",  # epoch 1's model.pt, cut short in its temporary file
              "batch:5:KILL",       # the second batch of epoch 2 (3 batches an epoch)
              "checkpoint:2:KILL"]  # the resumed run's second checkpoint
    for fault in chosen:
        assert medclf(*next_command(run, data, 3), fault=fault) == -signal.SIGKILL, fault
        assert_artifacts_whole(run)
        if fault.startswith("decode"):  # killed mid-write: a half-filled temporary store, no store
            (tmp,) = temporary_stores(stores)
            assert (tmp / "images.npy").is_file() and not (tmp / "meta.json").exists() and not finished_stores(stores)
        if fault.startswith("cache"):  # killed before the rename: complete-looking, but never taken as a store
            (tmp,) = temporary_stores(stores)  # the previous run's orphan is gone
            assert (tmp / "meta.json").is_file() and not finished_stores(stores)
    rng = random.Random(0)
    kills, finished = len(chosen), False
    for delay in (rng.uniform(4, 12), rng.uniform(4, 12)):  # then SIGKILL after a random delay, twice
        rc = medclf(*next_command(run, data, 3), kill_after=delay)
        assert_artifacts_whole(run)
        if rc == 0:
            finished = True
            break
        kills += 1
    assert kills >= 5
    if not finished:
        assert medclf(*next_command(run, data, 3)) == 0
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    assert (run / "metrics.json").is_file() and not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert_artifacts_whole(run)
    assert not temporary_stores(stores) and len(finished_stores(stores)) == 3  # orphans removed; every split cached
    assert snapshot(tmp_path, [run, cache]) == before  # nothing outside the run and the cache changed


RESUME_FLAGS = [*FAST_FLAGS, "--epochs", "3", "--augment", "strong"]  # strong: TrivialAugment draws on torch's global RNG


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The data and one uninterrupted 3-epoch run on it, shared by the interrupted runs compared with it."""
    base = tmp_path_factory.mktemp("uninterrupted")
    data = make_split_folder(base / "xray")
    with pytest.MonkeyPatch.context() as mp:  # module scope: conftest's per-test cache is not set up yet
        mp.setenv("MEDCLF_DATA", str(base / "medclf_data"))
        assert medclf("train", data, *RESUME_FLAGS, "--out", base / "whole") == 0
    return data, base / "whole"


@pytest.mark.parametrize("faults", [
    pytest.param([("batch:5:INT", 130)], id="sigint-in-epoch-2"),
    pytest.param([("last:2:KILL", -signal.SIGKILL)], id="sigkill-while-saving-last.pt-of-epoch-2"),
    pytest.param([("batch:8:KILL", -signal.SIGKILL)], id="sigkill-mid-batch-in-epoch-3"),
    pytest.param([("batch:5:INT", 130), ("checkpoint:2:KILL", -signal.SIGKILL)],
                 id="sigint-then-sigkill-while-the-resumed-run-saves"),
])
def test_resume_after_sigint_and_sigkill_matches_an_uninterrupted_run(tmp_path, uninterrupted, faults):
    data, whole = uninterrupted
    run = tmp_path / "cut"
    command = ["train", data, *RESUME_FLAGS, "--out", run]
    for fault, rc in faults:
        assert medclf(*command, fault=fault) == rc, fault
        assert (run / "last.pt").is_file()  # every point lies after epoch 1 was saved
        command = ["train", "--resume", run]
    assert medclf(*command) == 0
    a_rows = list(csv.DictReader(open(whole / "history.csv")))
    b_rows = list(csv.DictReader(open(run / "history.csv")))
    for column in ("epoch", "lr", "train_loss", "val_loss"):
        assert [r[column] for r in b_rows] == [r[column] for r in a_rows], column
    assert [r["epoch"] for r in b_rows] == ["1", "2", "3"]
    for name in ("last.pt", "model.pt"):
        a = torch.load(whole / name, weights_only=True)["state_dict"]
        b = torch.load(run / name, weights_only=True)["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# ---------------------------------------------------------------- Ctrl-C

def test_ctrl_c_in_the_first_epoch_says_the_truth_and_a_rerun_works(tmp_path, monkeypatch, capsys):
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    real = train_module.train_one_epoch

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train_one_epoch", interrupted)
    argv = ["train", str(data), *FAST_FLAGS, "--epochs", "1", "--out", str(run)]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "--resume" not in err
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    assert main(argv) == 0  # the same command again: the run without a finished epoch is replaced
    assert (run / "metrics.json").is_file()


# ---------------------------------------------------------------- a full disk

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _zip_writer_fails(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0: file write failed")


@pytest.mark.parametrize("failure", [_no_space, _zip_writer_fails])
def test_disk_full_during_a_checkpoint_then_resume(tmp_path, monkeypatch, capsys, failure):
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    real_save = torch.save
    saves = {"n": 0}

    def full_from_the_third_save(obj, path, *args, **kwargs):  # epoch 1's model.pt and last.pt fit, then no more
        saves["n"] += 1
        if saves["n"] >= 3:
            real_save(obj, path, *args, **kwargs)  # part of the file reaches the disk before the error
            os.truncate(path, 100)
            failure()
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_from_the_third_save)
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "3", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("medclf: error: disk full writing") and str(run) in err and "free" in err
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    assert_artifacts_whole(run)
    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", "--resume", str(run)]) == 0
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "history.csv"))] == [1, 2, 3]


def _meta_json_does_not_fit(monkeypatch) -> dict:
    """ENOSPC when a temporary store writes its meta.json (after images.npy was flushed)."""
    real, calls = Path.write_text, {"n": 0}

    def write_text(self, *args, **kwargs):
        if self.name == "meta.json" and self.parent.name.startswith(disk_cache.TMP_PREFIX):
            calls["n"] += 1
            _no_space()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    return calls


def _reserving_does_not_fit(monkeypatch) -> dict:
    """ENOSPC from os.posix_fallocate, as reserving a store's images.npy meets it on a full disk."""
    calls = {"n": 0}

    def posix_fallocate(*args):
        calls["n"] += 1
        _no_space()

    monkeypatch.setattr(os, "posix_fallocate", posix_fallocate)
    return calls


@pytest.mark.skipif(not hasattr(os, "posix_fallocate"), reason="reserving uses os.posix_fallocate")
@pytest.mark.parametrize("full_disk", [_reserving_does_not_fit, _meta_json_does_not_fit], ids=["reserve", "finish"])
def test_disk_full_in_the_image_cache_trains_in_memory_with_one_warning(tmp_path, monkeypatch, capsys, full_disk):
    data = make_split_folder(tmp_path / "d")
    cache = tmp_path / "cache"
    monkeypatch.setattr(store, "_warned_roots", set())  # the warning is once per cache folder and process
    argv = ["train", str(data), *FAST_FLAGS, "--epochs", "1", "--cache-dir", str(cache)]
    with monkeypatch.context() as full:
        failed = full_disk(full)
        assert main([*argv, "--out", str(tmp_path / "run")]) == 0  # training goes on, from memory
    assert failed["n"] >= 1  # the injected failure was met
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("medclf: ")]
    assert len(warnings) == 1 and "Traceback" not in err, err  # one line for all three splits
    assert warnings[0].startswith("medclf: warning: cannot write the decoded-image cache") and str(cache) in warnings[0]
    assert "No space left" in warnings[0]
    assert (tmp_path / "run" / "metrics.json").is_file()
    assert list(cache.iterdir()) == []  # no temporary store left holding the disk's space, and no store
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0  # the next plain run caches normally
    assert "warning" not in capsys.readouterr().err
    assert len(finished_stores(cache)) == 3 and not temporary_stores(cache)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few MB (root on Linux); skipped where it cannot be mounted (the injected cases cover it)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=False)  # lazy: a failed test may still hold a file open


def test_a_real_full_disk_then_a_rerun_once_space_is_freed(tmp_path, small_disk, capsys):
    data = make_split_folder(tmp_path / "d")
    run = small_disk / "run"
    argv = ["train", str(data), *FAST_FLAGS, "--epochs", "1", "--out", str(run)]
    assert main(argv) == 2  # a ResNet-18 checkpoint does not fit in 4 MB
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("medclf: error: disk full writing") and "MB free" in err
    assert not (run / "model.pt").exists() and not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    subprocess.run(["mount", "-o", "remount,size=512m", str(small_disk)], check=True)  # space freed
    assert main(argv) == 0
    assert_artifacts_whole(run)


# ---------------------------------------------------------------- settings and --out

def test_invalid_settings_leave_no_run_directory(tmp_path, capsys):
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--device", "cpu", "--precision", "fp16", "--out", str(run)]) == 2
    assert "fp16 needs a GPU" in capsys.readouterr().err and not run.exists()


def test_a_half_made_run_directory_is_replaced_without_force(tmp_path, capsys):
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "plan.yaml", "splits.csv", ".last.pt.x1y2.tmp"):
        (run / name).write_text("left by a run that never finished an epoch")
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    assert "holds no finished epoch; replacing it" in capsys.readouterr().out
    assert (run / "model.pt").is_file() and not (run / ".last.pt.x1y2.tmp").exists()


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    data = make_split_folder(tmp_path / "d")
    target = tmp_path / "results.txt"
    target.write_text("keep")
    assert main(["train", str(data), *FAST_FLAGS, "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and err.count("\n") == 1 and target.read_text() == "keep"


def test_resume_cleans_up_temporaries_of_a_failed_write(tmp_path, monkeypatch):
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    real = interrupt_second_epoch(monkeypatch)
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "2", "--out", str(run)]) == 130
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    (run / "last.pt.tmp").write_bytes(b"half")
    (run / ".model.pt.abc123.tmp").write_bytes(b"half")
    assert main(["train", "--resume", str(run)]) == 0
    assert not (run / "last.pt.tmp").exists() and not (run / ".model.pt.abc123.tmp").exists()
