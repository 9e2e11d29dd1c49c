"""The training loop's arithmetic and promises: LR schedule, plateau rule, plan facts, run directories, compare's split."""
import csv
import math
import os
import shutil
from datetime import datetime

import pytest
import torch

from medclf import rundir, schedule, training
from medclf.cli import main
from medclf.comparison import fixed_splits
from medclf.config import TrainConfig
from medclf.errors import MedclfError
from medclf.planning import make_plan, steps_per_epoch

from conftest import FAST_FLAGS, interrupt_second_epoch, make_split_folder, write_class_folders

train_module = training


# ---------------------------------------------------------------- schedule

@pytest.mark.parametrize("n,batch,expected", [(100, 64, 2), (300, 32, 10), (48, 16, 3), (49, 16, 3), (50, 16, 4),
                                              (1, 16, 1), (16, 16, 1), (17, 16, 1)])
def test_steps_per_epoch_counts_the_batches_trained(n, batch, expected):
    assert steps_per_epoch(n, batch) == expected


def test_plateau_lowers_the_rate_only_when_the_loss_stops_improving():
    cfg = TrainConfig(schedule="plateau", monitor="loss", patience=2)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedule.make_scheduler(cfg, optimizer, 10)
    for loss in (1.0, 0.8, 0.6, 0.5, 0.4):
        scheduler.step(train_module.monitor_score({"val_loss": loss}, "loss"))
    assert optimizer.param_groups[0]["lr"] == 1.0
    for _ in range(3):
        scheduler.step(train_module.monitor_score({"val_loss": 0.9}, "loss"))
    assert optimizer.param_groups[0]["lr"] == 0.5


def test_plan_sizes_the_ema_by_the_steps_actually_taken():
    fp = {"data": "x", "name": "x", "kind": "npz", "classes": ["a", "b"], "num_classes": 2,
          "images": {"train": 1000, "val": 100}, "imbalance_ratio": 1.0, "short_side": {"median": 28},
          "channels": 1, "bit_depth": 8}
    plan = make_plan(fp, fixed={"epochs": 50, "folds": 0})
    steps = 50 * steps_per_epoch(1000, plan["settings"]["batch_size"])
    assert steps == 1600
    assert plan["settings"]["ema"] == round(1 - 20 / steps, 4) and f"of {steps} steps" in plan["reasons"]["ema"]


# ---------------------------------------------------------------- the plan's facts

def test_balance_auto_uses_the_plans_imbalance_ratio():
    labels = torch.tensor([0, 0, 1, 1])
    assert train_module.resolve_balance(TrainConfig(balance="auto"), labels, 2, {"imbalance_ratio": 3.0}) == "weight"
    assert train_module.resolve_balance(TrainConfig(balance="auto"), labels, 2) == "none"
    assert train_module.resolve_balance(TrainConfig(balance="auto"), torch.tensor([0, 0, 0, 0, 1]), 2) == "weight"


def test_training_takes_channels_from_the_plan_instead_of_probing_again(tmp_path, monkeypatch):
    data = make_split_folder(tmp_path / "d")
    monkeypatch.setattr(train_module, "probe_channels", lambda *a, **k: pytest.fail("channels measured twice"))
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--out", str(tmp_path / "run")]) == 0


# ---------------------------------------------------------------- what --force may replace

@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    base = tmp_path_factory.mktemp("force")
    data = make_split_folder(base / "project" / "xray")
    run = base / "run"
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--out", str(run)]) == 0
    return data, run


def _tree(root):
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*"))}


def _refused(argv, capsys, message):
    assert main(argv) == 2
    err = capsys.readouterr().err  # progress bars may precede the error on stderr
    last = err.strip().splitlines()[-1]
    assert last.startswith("medclf: error: ") and message in last and "Traceback" not in err, err


def test_force_keeps_a_run_directory_with_a_user_file(finished, capsys):
    data, run = finished
    (run / "notes.txt").write_text("mine")
    before = _tree(run)
    try:
        _refused(["train", str(data), *FAST_FLAGS, "--out", str(run), "--force"], capsys, "notes.txt")
        assert _tree(run) == before
    finally:
        (run / "notes.txt").unlink()


def test_a_finished_run_without_last_pt_still_needs_force(finished, tmp_path, capsys):
    """Deleting last.pt to save space does not make a finished run replaceable without --force."""
    data, run = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "last.pt").unlink()
    before = _tree(copy)
    _refused(["train", str(data), *FAST_FLAGS, "--out", str(copy)], capsys, "--force")
    assert _tree(copy) == before


def test_force_never_replaces_the_current_folder(finished, tmp_path, monkeypatch, capsys):
    data, _ = finished
    (tmp_path / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(tmp_path)
    _refused(["train", str(data), *FAST_FLAGS, "--out", ".", "--force"], capsys, "--out .")
    assert (tmp_path / "thesis.tex").read_text() == "years of work"


def test_force_never_replaces_an_ancestor_of_data(finished, capsys):
    data, _ = finished
    project = data.parent
    before = _tree(project)
    _refused(["train", str(data), *FAST_FLAGS, "--out", str(project), "--force"], capsys, "holds DATA")
    assert _tree(project) == before


def test_force_replaces_a_finished_run(finished):
    data, run = finished
    old = (run / "model.pt").stat().st_mtime_ns
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "1", "--out", str(run), "--force"]) == 0
    assert (run / "model.pt").stat().st_mtime_ns != old


def test_default_run_names_differ_within_one_second(tmp_path, monkeypatch):
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime(2026, 1, 2, 3, 4, 5)

    monkeypatch.setattr(rundir, "datetime", Frozen)
    monkeypatch.chdir(tmp_path)
    first = rundir.prepare_run_dir(None, "xray", tmp_path / "data", False)
    second = rundir.prepare_run_dir(None, "xray", tmp_path / "data", False)
    assert first != second and first.is_dir() and second.is_dir()
    assert first.name.startswith("20260102-030405-xray-")


# ---------------------------------------------------------------- resume continues, and only on the same data

def test_resume_continues_the_time_budget(tmp_path, monkeypatch):
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    real = interrupt_second_epoch(monkeypatch)
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", "4", "--time-budget", "5", "--out", str(run)]) == 130
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    state = torch.load(run / "last.pt", weights_only=True)
    state["elapsed"] = 5 * 60 - 0.01  # as if the first session had used all but a moment of the budget
    torch.save(state, run / "last.pt")
    assert main(["train", "--resume", str(run)]) == 0
    history = list(csv.DictReader(open(run / "history.csv")))
    assert [int(r["epoch"]) for r in history] == [1, 2]  # one more epoch, then the budget ends the run


def _interrupted_in_epoch_2(tmp_path, monkeypatch, epochs: int):
    """A run stopped by Ctrl-C as its second epoch starts (one finished epoch to resume); returns (data, run)."""
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    real = interrupt_second_epoch(monkeypatch)
    assert main(["train", str(data), *FAST_FLAGS, "--epochs", str(epochs), "--out", str(run)]) == 130
    monkeypatch.setattr(train_module, "train_one_epoch", real)
    return data, run


def test_resume_refuses_data_that_changed(tmp_path, monkeypatch, capsys):
    data, run = _interrupted_in_epoch_2(tmp_path, monkeypatch, epochs=3)
    os.remove(sorted((data / "train" / "NORMAL").glob("*.png"))[0])
    capsys.readouterr()
    _refused(["train", "--resume", str(run)], capsys, "no longer matches its splits.csv")


def test_a_diverged_run_says_so(tmp_path, monkeypatch, capsys):
    data = make_split_folder(tmp_path / "d")
    real = train_module.predict_store
    monkeypatch.setattr(train_module, "predict_store", lambda *a, **k: real(*a, **k) * math.nan)
    _refused(["train", str(data), *FAST_FLAGS, "--out", str(tmp_path / "run")], capsys, "no usable checkpoint")
    assert not (tmp_path / "run" / "model.pt").exists()


# ---------------------------------------------------------------- compare's shared split

def test_compare_split_is_refused_for_other_data_and_rebuilt_with_force(tmp_path):
    a = write_class_folders(tmp_path / "a", {"Hand": 20, "CXR": 20})
    b = write_class_folders(tmp_path / "b", {"Hand": 20, "CXR": 20}, seed=5)
    out = tmp_path / "out"
    fixed_splits(str(a), out, 0, 0.1, 0.1)
    with pytest.raises(MedclfError, match="--force"):
        fixed_splits(str(b), out, 0, 0.1, 0.1)
    with pytest.raises(MedclfError, match="seed 0"):
        fixed_splits(str(a), out, 1, 0.1, 0.1)
    used, _ = fixed_splits(str(b), out, 0, 0.1, 0.1, force=True)
    linked = {os.path.dirname(os.path.realpath(p)) for p in (out / "data").rglob("*.png")}
    assert linked == {str((b / c).resolve()) for c in ("Hand", "CXR")}
    assert fixed_splits(str(b), out, 0, 0.1, 0.1)[0] == used  # the same data and seed: reused


def test_compare_never_deletes_a_data_folder_it_did_not_make(tmp_path):
    a = write_class_folders(tmp_path / "a", {"Hand": 20, "CXR": 20})
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "scan.dcm").write_text("patient")
    for force in (False, True):
        with pytest.raises(MedclfError, match="not a split made by medclf compare"):
            fixed_splits(str(a), out, 0, 0.1, 0.1, force=force)
    assert (out / "data" / "scan.dcm").read_text() == "patient"


def test_compare_npz_split_records_its_data(tmp_path, npz_file):
    import numpy as np

    arrays = dict(np.load(npz_file))
    del arrays["val_images"], arrays["val_labels"]  # no val: compare makes one
    other = tmp_path / "other.npz"
    np.savez(other, **arrays)
    np.savez(tmp_path / "other2.npz", **arrays)
    out = tmp_path / "out"
    used, _ = fixed_splits(str(other), out, 0, 0.1, 0.1)
    assert set(np.load(used).files) >= {"train_images", "val_images", "test_images"}
    with pytest.raises(MedclfError, match="other data"):
        fixed_splits(str(tmp_path / "other2.npz"), out, 0, 0.1, 0.1)


def test_resume_state_that_does_not_fit_is_one_line(tmp_path, monkeypatch, capsys):
    """last.pt that passes the schema but that PyTorch's loaders refuse (a foreign scheduler state) is one line."""
    _, run = _interrupted_in_epoch_2(tmp_path, monkeypatch, epochs=2)
    state = torch.load(run / "last.pt", weights_only=True)
    state["scheduler"] = {"bogus": 1}
    torch.save(state, run / "last.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"medclf: error: cannot resume {run}: last.pt does not fit this run"), err


def test_a_kill_between_last_pt_and_history_csv_loses_no_epoch(tmp_path, monkeypatch):
    """The epoch's last.pt is saved, then history.csv is written: a process killed between the two leaves
    history.csv an epoch behind, and a resume that finds training finished must still bring it up to date."""
    data = make_split_folder(tmp_path / "d")
    run = tmp_path / "run"
    real = training.write_history

    def killed_after_the_last_checkpoint(path, history):
        if len(history) == 2:
            raise KeyboardInterrupt  # the run dies here: last.pt already holds epoch 2, finished
        real(path, history)

    monkeypatch.setattr(training, "write_history", killed_after_the_last_checkpoint)
    assert main(["train", str(data), *FAST_FLAGS, "--out", str(run)]) == 130
    assert len(list(csv.DictReader(open(run / "history.csv")))) == 1
    monkeypatch.setattr(training, "write_history", real)
    assert main(["train", "--resume", str(run)]) == 0
    assert [int(r["epoch"]) for r in csv.DictReader(open(run / "history.csv"))] == [1, 2]
